"""SSMLL classifier, its training, and two-stage pseudo-label filtering."""
import itertools
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from acrst_fast.config import load_config
from acrst_fast.models.weights import WeightsError
from acrst_fast.pseudo_labels import filter_pseudo_labels
from acrst_fast.ssmll import focal_bce, focal_bce_ref, image_labels, load_classifier, negative_metrics
from acrst_fast.ssmll.model import build_ssmll, preprocess, save_classifier
from acrst_fast.engine.ssmll_runner import SSMLLRunner
from acrst_fast.engine import checkpoint as ckpt
from conftest import REPO, run_group, tiny_config_dict, write_config

TINY_SSMLL = {"backbone": "resnet18", "input_size": 64, "dim": 32, "layers": 1, "heads": 2, "total_steps": 4,
              "pretrain_steps": 2, "batch_labeled": 2, "batch_unlabeled": 2, "lr": 1e-3, "checkpoint_period": 2,
              "ema_decay": 0.9}


def _preds():
    """Image 0: a 0.95 'class 2' box, a 0.9 'class 1' box, a 0.5 'class 3' box, a 0.4 'class 1' box."""
    return [{"boxes": torch.arange(16.0).reshape(4, 4).cumsum(1), "labels": torch.tensor([2, 1, 3, 1]),
             "scores": torch.tensor([0.95, 0.9, 0.5, 0.4])}]


def test_two_stage_drops_high_score_boxes_of_negative_classes():
    probs = torch.tensor([[0.9, 0.1, 0.8]])  # class 2 negative (0.1 < 0.2), classes 1 and 3 positive
    single = filter_pseudo_labels(_preds(), 0.7)
    assert single[0]["labels"].tolist() == [2, 1]
    two = filter_pseudo_labels(_preds(), 0.7, probs, mode="two_stage", tau_ml=0.2)
    assert two[0]["labels"].tolist() == [1] and two[0]["scores"].tolist() == [pytest.approx(0.9)]
    assert two[0]["boxes"].tolist() == _preds()[0]["boxes"][1:2].tolist()
    # at tau_ml 0.05 the classifier marks nothing negative: two-stage equals single-stage
    loose = filter_pseudo_labels(_preds(), 0.7, probs, mode="two_stage", tau_ml=0.05)
    assert loose[0]["labels"].tolist() == [2, 1]


def test_mining_keeps_the_union():
    probs = torch.tensor([[0.9, 0.1, 0.8]])
    mined = filter_pseudo_labels(_preds(), 0.7, probs, mode="mining", tau_pos=0.7, mining_min_score=0.45)
    # high score (2, 1) OR classifier-positive with score >= 0.45 (the 0.5 class-3 box); not the 0.4 box
    assert mined[0]["labels"].tolist() == [2, 1, 3]
    assert filter_pseudo_labels(_preds(), 0.7, probs, mode="mining", tau_pos=0.7,
                                mining_min_score=0.3)[0]["labels"].tolist() == [2, 1, 3, 1]


def test_filter_rejects_bad_use():
    with pytest.raises(ValueError, match="needs the classifier's image_probs"):
        filter_pseudo_labels(_preds(), 0.7, mode="two_stage")
    with pytest.raises(ValueError, match="mode must be one of"):
        filter_pseudo_labels(_preds(), 0.7, torch.ones(1, 3), mode="both")
    with pytest.raises(ValueError, match="labels must lie in 1..2"):
        filter_pseudo_labels(_preds(), 0.7, torch.ones(1, 2), mode="two_stage")
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    assert len(filter_pseudo_labels(empty, 0.7, torch.ones(1, 3), mode="two_stage")[0]["boxes"]) == 0


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_bce_matches_float64_reference(gamma):
    seed = random.SystemRandom().randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 7, generator=gen) * 4
    logits[0, :3] = torch.tensor([40.0, -40.0, 0.0])  # saturated and neutral
    targets = (torch.rand(5, 7, generator=gen) < 0.4).float()
    targets[1] = torch.rand(7, generator=gen)  # soft targets
    got = focal_bce(logits, targets, gamma)
    torch.testing.assert_close(got.double(), focal_bce_ref(logits, targets, gamma), atol=1e-6, rtol=1e-5,
                               msg=lambda m: f"seed {seed}: {m}")
    assert torch.isfinite(got)
    if gamma == 0:
        torch.testing.assert_close(got, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    mask = torch.rand(5, 7, generator=gen) < 0.6  # label-mask training: the loss on unknown labels only
    pos_weight = torch.rand(7, generator=gen) * 3  # class rebalancing of the positive terms
    got = focal_bce(logits, targets, gamma, mask=mask, pos_weight=pos_weight)
    torch.testing.assert_close(got.double(), focal_bce_ref(logits, targets, gamma, mask, pos_weight), atol=1e-6,
                               rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert focal_bce(logits, targets, gamma, mask=torch.zeros(5, 7, dtype=torch.bool)) == 0  # nothing to learn


def test_label_mask_training_states():
    """C-Tran's label-mask training: revealed labels become positive/negative states, the rest are
    unknown and carry the loss; a revealed state changes the prediction (the state embedding is used)."""
    from acrst_fast.ssmll.model import STATE_NEGATIVE, STATE_POSITIVE, STATE_UNKNOWN, SSMLLNet, known_label_states

    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(64, 10, generator=gen) < 0.3).float()
    states, unknown = known_label_states(labels, 0.75, gen)
    known = ~unknown
    assert torch.equal(states[known] == STATE_POSITIVE, labels[known] == 1)
    assert bool((states[known] != STATE_UNKNOWN).all()) and bool((states[unknown] == STATE_UNKNOWN).all())
    frac = known.float().mean(1)
    assert frac.max() <= 0.75 and 0.2 < frac.mean() < 0.55  # r ~ U[0, 0.75] per image
    net = SSMLLNet("resnet18", 4, dim=16, layers=1, heads=2).eval()
    x = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        plain = net(x)
        torch.testing.assert_close(net(x, torch.zeros(2, 4, dtype=torch.int64)), plain)  # None = all unknown
        told = net(x, torch.full((2, 4), STATE_NEGATIVE))
    assert not torch.allclose(told, plain)


def test_image_labels_and_negative_metrics():
    t = image_labels([torch.tensor([1, 1, 3]), torch.zeros(0, dtype=torch.int64)], 3)
    assert t.tolist() == [[1, 0, 1], [0, 0, 0]]
    probs = torch.tensor([[0.9, 0.05, 0.1], [0.3, 0.01, 0.15]])
    m = negative_metrics(probs, t, 0.2)
    # predicted negative: (0,1) absent, (0,2) present!, (1,1) absent, (1,2) absent -> 3 of 4 right
    # absent: (0,1), (1,0), (1,1), (1,2) -> 3 of 4 predicted negative
    assert m["neg_accuracy"] == pytest.approx(0.75) and m["neg_recall"] == pytest.approx(0.75)


def _tiny_cfg(tmp_path, tiny_demo, **ssmll):
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(tiny_demo, tmp_path / "run")
    raw["ssmll"] = {**TINY_SSMLL, "output_dir": str(tmp_path / "ssmll"), **ssmll}
    return write_config(tmp_path / "c.yaml", raw)


def test_ssmll_training_step_lowers_loss(tmp_path, tiny_demo):
    cfg = load_config(_tiny_cfg(tmp_path, tiny_demo), ["ssmll.pretrain_steps=20", "ssmll.total_steps=21"])
    gen = torch.Generator().manual_seed(0)
    lab = {"strong": torch.rand(4, 3, 64, 64, generator=gen), "labels": (torch.rand(4, 4, generator=gen) < 0.5).float()}
    unl = {"weak": lab["strong"], "strong": lab["strong"]}
    runner = SSMLLRunner(cfg, 4, torch.device("cpu"), lambda split, first, end: itertools.repeat(
        lab if split == "labeled" else unl))
    losses = [float(runner.run_step(s).total) for s in range(20)]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    teacher_before = [p.clone() for p in runner.teacher.parameters()]
    out = runner.run_step(cfg.ssmll.pretrain_steps)  # mutual: the teacher is copied from the student first
    runner.update_teacher()  # (the EMA hook's call)
    assert out.phase == "mutual" and set(out.unsup) == {"loss_focal"}
    assert out.resolve()["ssmll/positives_per_image"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, runner.teacher.parameters()))


def test_classifier_file_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"ssmll.{k}={v}" for k, v in TINY_SSMLL.items()]
                      + ["ssmll.backbone_weights=''"])
    model = build_ssmll(cfg.ssmll, 3).eval()
    names = ("a", "b", "c")
    save_classifier(tmp_path / "cls.pt", model, cfg.ssmll, names)
    loaded, size = load_classifier(tmp_path / "cls.pt", names)
    x = preprocess([torch.rand(3, 50, 70), torch.rand(3, 64, 64)], size)
    assert size == 64 and x.shape == (2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(WeightsError, match="differ from the dataset"):
        load_classifier(tmp_path / "cls.pt", ("a", "b", "z"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt: not an SSMLL classifier"):
        load_classifier(tmp_path / "other.pt", names)
    with pytest.raises(WeightsError, match="no ssmll.checkpoint is named"):
        load_classifier("", names)


@pytest.mark.slow
def test_train_ssmll_cli_resumes_exactly(tmp_path, tiny_demo, cpu_env):
    """4 steps straight vs 2 steps, stop, --resume to 4: the same classifier, bit for bit."""
    def run(cfg, *extra):
        proc = subprocess.run([sys.executable, "-m", "acrst_fast.train_ssmll", str(cfg), *extra], env=cpu_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    straight = _tiny_cfg(tmp_path / "a", tiny_demo)
    out = run(straight)
    assert "neg accuracy" in out and (tmp_path / "a" / "ssmll" / "ssmll_teacher.pt").is_file()
    split = _tiny_cfg(tmp_path / "b", tiny_demo)
    run(split, "ssmll.total_steps=2")  # as if stopped after the step-2 checkpoint
    (tmp_path / "b" / "ssmll" / "ssmll_teacher.pt").unlink()
    again = subprocess.run([sys.executable, "-m", "acrst_fast.train_ssmll", str(split)], env=cpu_env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # never silently overwrites
    assert "[resume]" in run(split, "--resume")
    a = torch.load(tmp_path / "a" / "ssmll" / "ssmll_teacher.pt", weights_only=False)["state"]
    b = torch.load(tmp_path / "b" / "ssmll" / "ssmll_teacher.pt", weights_only=False)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ssmll_cmd(cfg, *extra):
    return [sys.executable, "-m", "acrst_fast.train_ssmll", str(cfg), *extra]


def _classifier_state(run: Path) -> dict:
    return torch.load(run / "ssmll" / "ssmll_teacher.pt", weights_only=False)["state"]


@pytest.mark.slow
def test_train_ssmll_killed_then_resumed_is_bit_identical(tmp_path, tiny_demo, cpu_env):
    """SIGKILL right after the step-2 checkpoint (the trainer's kill shim), then --resume: the classifier,
    the log (each step once) and the checkpoint equal an uninterrupted run's."""
    from test_train import KILL_SHIM

    straight = _tiny_cfg(tmp_path / "a", tiny_demo)
    assert run_group(_ssmll_cmd(straight), 600, env=cpu_env, cwd=REPO).returncode == 0
    killed = _tiny_cfg(tmp_path / "b", tiny_demo)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM)
    env = dict(cpu_env, ACRST_TEST_KILL="after_checkpoint:2", PYTHONPATH=f"{shim}{os.pathsep}{cpu_env.get('PYTHONPATH', '')}")
    proc = run_group(_ssmll_cmd(killed), 600, env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b" / "ssmll")] == [2]
    resumed = run_group(_ssmll_cmd(killed, "--resume"), 600, env=cpu_env, cwd=REPO)
    assert resumed.returncode == 0 and "[resume]" in resumed.stdout, resumed.stderr[-2000:]
    a, b = _classifier_state(tmp_path / "a"), _classifier_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (ckpt.load(ckpt.latest_checkpoint(tmp_path / r / "ssmll"))["runner"] for r in ("a", "b"))
    assert all(torch.equal(ca["student"][k], cb["student"][k]) for k in ca["student"])
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "ssmll" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_train_ssmll_two_gloo_processes(tmp_path, tiny_demo, cpu_env):
    """torchrun with 2 processes: each takes half of each step's batch, DDP averages the gradients, rank 0
    writes the log, checkpoints (with both ranks' RNG states) and the classifier."""
    cfg = _tiny_cfg(tmp_path, tiny_demo)
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      *_ssmll_cmd(cfg)[1:]], 600, env=cpu_env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and proc.stdout.count("neg accuracy") == 1  # printed by rank 0 only
    out = tmp_path / "ssmll"
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [(r["step"], r["model"]) for r in records if r["kind"] == "eval"] == [(2, "student"), (4, "teacher")]
    state = ckpt.load(ckpt.latest_checkpoint(out))
    assert len(state["rng"]) == 2 and state["step"] == 4
    assert not any(k.startswith("module.") for k in state["runner"]["student"])
    assert (out / "ssmll_teacher.pt").is_file() and json.loads((out / "ssmll_metrics.json").read_text())["step"] == 4


@pytest.mark.slow
def test_detector_run_trains_its_ssmll_stage_first(tmp_path, tiny_demo, cpu_env):
    """Two-stage filtering with no classifier named: the detector's command trains the SSMLL stage into
    RUN/ssmll, then the detector filters with it; --resume reuses the finished stage."""
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=2)
    raw["ssmll"] = {**TINY_SSMLL, "filter": "two_stage"}
    raw["mean_teacher"]["tau_cls"] = 0.0
    cfg = write_config(tmp_path / "c.yaml", raw)
    cmd = [sys.executable, "-m", "acrst_fast.train", str(cfg)]
    proc = run_group(cmd, 600, env=cpu_env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert proc.stdout.index("neg accuracy") < proc.stdout.index("[data]")  # the stage came before the detector
    assert (run / "ssmll" / "ssmll_teacher.pt").is_file() and ckpt.list_checkpoints(run / "ssmll")[-1][0] == 4
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("pseudo/stage1/num_pseudo" in r for r in records)  # the detector used the classifier
    state = ckpt.load(ckpt.latest_checkpoint(run))
    assert state["config"]["ssmll"]["checkpoint"] == str(run / "ssmll" / "ssmll_teacher.pt")
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["ssmll"]["checkpoint"] == state["config"]["ssmll"]["checkpoint"]  # the folder's config agrees
    again = run_group(cmd + ["--resume", "solver.total_steps=5"], 600, env=cpu_env, cwd=REPO)
    assert again.returncode == 0 and "[ssmll] stage done" in again.stdout, again.stderr[-3000:]
    assert "neg accuracy" not in again.stdout  # not trained again


def test_two_stage_mutual_step_logs_both_stages(tmp_path, tiny_demo):
    from test_train import _runner

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"ssmll.{k}={v}" for k, v in TINY_SSMLL.items()]
                      + ["ssmll.backbone_weights=''"])
    runner = _runner(tmp_path, tiny_demo, solver={"total_steps": 4, "pretrain_steps": 1})
    classifier = build_ssmll(cfg.ssmll, 4).eval()
    with torch.no_grad():
        classifier.head_bias.fill_(-20.0)  # every class negative: stage 2 removes every pseudo-label
    runner.classifier, runner.classifier_size, runner.filter_mode = classifier, 64, "two_stage"
    runner.hidden_gt = True
    runner.cfg = runner.cfg.__class__(**{**runner.cfg.__dict__,
                                         "mean_teacher": runner.cfg.mean_teacher.__class__(tau_cls=0.0, ema_decay=0.5)})
    runner.start(0)
    runner.run_step(0)
    out = runner.run_step(1)
    values = out.resolve()  # the deferred metrics, as the logger computes them at its flush
    assert values["pseudo/stage1/num_pseudo"] > 0 and values["pseudo/num_pseudo"] == 0
    assert out.pseudo_per_image == 0 and values["ssmll/neg_predicted"] == 2 * 4


def test_ssmll_class_rebalancing_weights():
    """The positive term of a class weighs (its labeled image frequency)^-beta, normalised to mean 1."""
    from acrst_fast.engine.ssmll_runner import class_weights

    labels = torch.zeros(100, 3)
    labels[:80, 0], labels[:20, 1] = 1, 1  # class 3 never present: counted as 1 / N
    w = class_weights(labels, 0.6)
    f = torch.tensor([0.8, 0.2, 0.01])
    torch.testing.assert_close(w, f.pow(-0.6) / f.pow(-0.6).mean())
    assert w[2] > w[1] > w[0] and abs(float(w.mean()) - 1) < 1e-6
    assert class_weights(labels, 0.0) is None
