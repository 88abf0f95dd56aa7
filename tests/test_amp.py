"""Mixed precision: mode resolution, and real bf16/fp16 training steps (autocast runs on CPU too)."""
import pytest
import torch

from acrst_fast.config import ConfigError, load_config
from acrst_fast.engine.amp import Precision, resolve_amp
from conftest import tiny_config_dict, write_config
from test_train import _runner


def test_resolve_amp_modes():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    with pytest.raises(ValueError, match="solver.amp must be one of"):
        resolve_amp("fp8", cpu)
    assert Precision("fp16", cpu).scaler is not None and Precision("bf16", cpu).scaler is None


def test_config_rejects_unknown_amp(tmp_path, tiny_demo):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", amp="half")
    with pytest.raises(ConfigError, match="solver.amp.*must be one of auto, off, bf16, fp16"):
        load_config(write_config(tmp_path / "c.yaml", raw))


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_mutual_step_trains(tmp_path, tiny_demo, mode):
    runner = _runner(tmp_path, tiny_demo, solver={"total_steps": 8, "pretrain_steps": 1, "amp": mode,
                                                  "grad_clip_norm": 10.0})
    runner.cfg = runner.cfg.__class__(**{**runner.cfg.__dict__,
                                         "mean_teacher": runner.cfg.mean_teacher.__class__(tau_cls=0.0, ema_decay=0.5)})
    runner.start(0)
    runner.run_step(0)
    before = {n: p.detach().clone() for n, p in runner.student.named_parameters()}
    for step in range(1, 7):  # teacher forward and student forward/backward under autocast
        out = runner.run_step(step)
        assert out.phase == "mutual" and bool(torch.isfinite(out.total)) and out.pseudo_per_image > 0
    after = dict(runner.student.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())  # master weights stay float32
    name = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(after[name], before[name])  # the optimizer stepped (fp16: the scaler skips overflowing steps, not all)
    if mode == "fp16":
        fresh = Precision("fp16", torch.device("cpu"))
        fresh.load_state_dict(runner.precision.state_dict())
        assert fresh.scaler.get_scale() == runner.precision.scaler.get_scale()
