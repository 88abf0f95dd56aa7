"""Every config value checked before anything starts, and every tool's error: stderr, one line naming the
file and the problem, exit code 2."""
import os

import pytest
import torch

from acrst_fast.config import ConfigError, load_config
from conftest import tiny_config_dict, write_config
from faults_helpers import _assert_one_line_error, _cli, _user_folder


# ---------------------------------------------------------------- 2. every config value, before anything starts

@pytest.mark.parametrize("override, key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("run.log_period=0", "run.log_period"),
    ("solver.momentum=-0.5", "solver.momentum"),
    ("model.trainable_backbone_layers=9", "model.trainable_backbone_layers"),
    ("augment.jitter=[0.4,0.4,0.4,0.8]", "augment.jitter (hue)"),
    ("augment.flip_prob=1.5", "augment.flip_prob"),
    ("acrst.pr_threshold=2", "acrst.pr_threshold"),
    ("ssmll.lr=0", "ssmll.lr"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("eval.period=-5", "eval.period"),
])
def test_out_of_range_values_name_key_file_and_range(tmp_path, tiny_demo, override, key):
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, [override])
    msg = str(info.value)
    assert str(cfg) in msg and f"'{key}'" in msg and "must be" in msg and "\n" not in msg


def test_numbers_as_people_write_them(tmp_path, tiny_demo):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(write_config(tmp_path / "base.yaml", raw).read_text().replace("lr: 0.01", "lr: 1e-3"))
    assert load_config(path).solver.lr == pytest.approx(1e-3)
    assert load_config(path, ["solver.weight_decay=1E-4", "solver.total_steps=6"]).solver.weight_decay == 1e-4
    assert load_config(path, ["solver.divergence_factor=1E+6"]).solver.divergence_factor == 1e6


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path, cpu_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  lr: [0.01\n  momentum: 0.9\n")
    _assert_one_line_error(_cli("acrst_fast.train", str(bad), env=cpu_env), f"{bad}:", "not valid YAML")


def test_cuda_device_without_gpu_is_one_line(tmp_path, tiny_demo, cpu_env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run.device=cuda is valid here")
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), "run.device=cuda", env=cpu_env), "'run.device'",
                           "no CUDA device")


def test_ssmll_checkpoint_that_is_not_one(tmp_path, tiny_demo, cpu_env):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), "ssmll.filter=two_stage", f"ssmll.checkpoint={junk}",
                                env=cpu_env), str(junk), "not an SSMLL classifier")


# ---------------------------------------------------------------- 8. every tool: stderr, one line, exit 2

@pytest.mark.parametrize("module, args, needle", [
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "150", "--out", "{tmp}/s"],
     "--percent must be in (0, 100]"),
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "10", "--fold", "-1", "--out",
                                "{tmp}/s"], "--fold must be >= 0"),
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "1", "--out", "{tmp}/s"],
     "fold file was made for another annotation file"),
    ("acrst_fast.data.splits", ["additional", "{tmp}/empty", "--out", "{tmp}/u.json"], "no image files"),
    ("acrst_fast.data.voc", ["{tmp}/novoc", "--year", "2007", "--split", "trainval", "--out", "{tmp}/v.json"],
     "image list not found"),
    ("acrst_fast.report", ["{tmp}/no_run"], "run folder not found"),
    ("acrst_fast.train_ssmll", ["{tmp}/missing.yaml"], "config file not found"),
    ("acrst_fast.data.check", ["{tmp}/missing.yaml"], "config file not found"),
    ("acrst_fast.data.demo", ["{tmp}/userdir"], "not written by the demo generator"),
])
def test_tools_report_errors_in_one_line(tmp_path, tiny_demo, cpu_env, module, args, needle):
    (tmp_path / "empty").mkdir()
    _user_folder(tmp_path / "userdir")
    args = [a.format(demo=tiny_demo, tmp=tmp_path) for a in args]
    proc = _cli(module, *args, env=cpu_env)
    _assert_one_line_error(proc, needle)
    assert not (tmp_path / "u.json").exists()  # an empty folder writes no empty json
