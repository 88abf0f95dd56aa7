import pytest

from acrst_fast.config import Config, ConfigError, check_paths, dump_config, load_config


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "data: {train_json: a.json, val_json: v.json, unlabeled_json: u.json}\n"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = _write(tmp_path, BASE + "solver: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "'solver.lrr'" in msg and "solver.lr" in msg


def test_unknown_section(tmp_path):
    p = _write(tmp_path, BASE + "solvr: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'solvr'.*did you mean 'solver'"):
        load_config(p)


@pytest.mark.parametrize("text,key", [
    ("solver: {lr: fast}", "solver.lr"),
    ("solver: {total_steps: 1.5}", "solver.total_steps"),
    ("run: {progress_bar: 1}", "run.progress_bar"),
    ("augment: {scales: 640}", "augment.scales"),
    ("augment: {scales: [640, x]}", "augment.scales[1]"),
    ("model: {backbone: 3}", "model.backbone"),
])
def test_wrong_type_names_key(tmp_path, text, key):
    p = _write(tmp_path, BASE + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"'{key}'" in str(e.value) and str(p) in str(e.value)


def test_value_checks(tmp_path):
    p = _write(tmp_path, BASE + "solver: {total_steps: 10, pretrain_steps: 20}\n")
    with pytest.raises(ConfigError, match="solver.pretrain_steps"):
        load_config(p)
    p = _write(tmp_path, BASE + "model: {backbone: vgg16}\n")
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    p = _write(tmp_path, "data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides_bases_and_round_trip(tmp_path):
    _write(tmp_path, BASE + "solver: {lr: 0.01, batch_labeled: 32}\nmodel: {backbone: resnet18}\n", "base.yaml")
    p = _write(tmp_path, "_base_: base.yaml\nsolver: {lr: 0.02}\n")
    cfg = load_config(p, ["solver.batch_unlabeled=8", "augment.scales=[100, 200]", "data.demo.seed=4"])
    assert isinstance(cfg, Config)
    assert cfg.solver.lr == 0.02 and cfg.solver.batch_labeled == 32 and cfg.solver.batch_unlabeled == 8
    assert cfg.model.backbone == "resnet18" and cfg.augment.scales == [100, 200] and cfg.data.demo.seed == 4
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["solver.lr"])
    with pytest.raises(ConfigError, match="unknown key 'solver.nope'"):
        load_config(p, ["solver.nope=1"])


def test_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(Exception):
        cfg.solver.lr = 1.0


def test_check_paths_names_key(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    cfg = load_config(_write(tmp_path, BASE), [f"data.train_json={tmp_path / 'a.json'}",
                                               f"data.val_json={tmp_path / 'missing.json'}"])
    with pytest.raises(ConfigError, match=r"'data.val_json': file not found: .*missing.json"):
        check_paths(cfg, "c.yaml")


def test_shipped_configs_load():
    from conftest import REPO

    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    for pct in ("0.5", "1", "2", "5", "10"):
        assert f"coco_standard_{pct}p.yaml" in names
    for name in ("demo.yaml", "coco_additional.yaml", "voc.yaml"):
        assert name in names
    for name in names:
        if name.startswith("_"):
            continue
        cfg = load_config(REPO / "configs" / name)
        if name != "demo.yaml":  # paper hyper-parameters
            assert (cfg.solver.batch_labeled, cfg.solver.batch_unlabeled) == (32, 32), name
            assert (cfg.solver.lr, cfg.solver.momentum) == (0.01, 0.9), name
            assert (cfg.mean_teacher.ema_decay, cfg.mean_teacher.tau_cls, cfg.mean_teacher.lambda_unsup) == \
                (0.9996, 0.7, 4.0), name
            assert cfg.model.backbone == "resnet50", name


PAPER_SSMLL_STEPS = {"coco_standard": (2000, 36000), "coco_additional": (6000, 96000), "voc": (2000, 18000)}


@pytest.mark.parametrize("name", ["coco_standard_0.5p", "coco_standard_1p", "coco_standard_2p", "coco_standard_5p",
                                  "coco_standard_10p", "coco_additional", "voc"])
def test_paper_configs_resolve_to_the_papers_method(name):
    """A shipped paper config is the paper's method and protocol: FBR + AFFR (beta 0.6) + selective supervision
    + two-stage filtering (tau_ml 0.2, its SSMLL stage trained first with the paper's settings), ImageNet
    backbones, burn-in without pasting, the published COCO-standard fold; its _mean_teacher twin is the baseline."""
    from conftest import REPO

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    a, m = cfg.acrst, cfg.ssmll
    assert (a.fbr, a.beta, a.selective_supervision, a.paste_during_pretrain) == (True, 0.6, True, False)
    assert (m.filter, m.tau_ml, m.checkpoint) == ("two_stage", 0.2, "")  # no classifier named: the stage runs first
    assert (m.input_size, m.batch_labeled, m.batch_unlabeled, m.lr, m.backbone) == (576, 64, 64, 1e-5, "resnet50")
    assert (m.pretrain_steps, m.total_steps) == PAPER_SSMLL_STEPS[name.split("_")[0] if name == "voc" else
                                                                  "_".join(name.split("_")[:2])]
    assert cfg.model.backbone_weights == "imagenet" and m.backbone_weights == "imagenet"
    if name.startswith("coco_standard"):
        assert cfg.data.split_folds == "published" and cfg.data.split_fold == 1
        assert cfg.data.split_percent == float(name.split("_")[-1][:-1])
    baseline = load_config(REPO / "configs" / f"{name}_mean_teacher.yaml")
    assert (baseline.acrst.fbr, baseline.acrst.selective_supervision, baseline.ssmll.filter) == (False, False, "single")
    assert baseline.solver == cfg.solver and baseline.data == cfg.data and baseline.model == cfg.model


def test_yaml_off_is_the_off_mode(tmp_path):
    """YAML 1.1 reads a bare `off` as False: `solver.amp=off` and `amp: off` still mean the mode 'off'."""
    p = _write(tmp_path, BASE + "solver: {amp: off}\n")
    assert load_config(p).solver.amp == "off"
    assert load_config(_write(tmp_path, BASE, "d.yaml"), ["solver.amp=off"]).solver.amp == "off"
    with pytest.raises(ConfigError, match="solver.amp"):  # 'yes' is no AMP mode: the check names the key
        load_config(p, ["solver.amp=yes"])
    assert load_config(p, ["run.progress_bar=off"]).run.progress_bar is False  # a boolean key takes off/on
    assert load_config(p, ["run.progress_bar=Yes"]).run.progress_bar is True
