"""End to end on a GPU (skipped without one): a few training steps with ACRST, bf16 autocast and each data
stage, and the trainer's collectives under NCCL (one process, the group forced on)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from acrst_fast.engine import checkpoint as ckpt
from conftest import REPO, tiny_config_dict, write_config

ACRST_ON = {"fbr": True, "selective_supervision": True, "n_range": [1, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _gpu_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
    return env


def _config(tmp_path, tiny_demo, pipeline: str):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=6, pretrain_steps=2, batch_labeled=4,
                           batch_unlabeled=4, amp="bf16")
    raw["data"].update({"pipeline": pipeline, "num_workers": 2})
    raw["acrst"] = ACRST_ON
    raw["mean_teacher"]["tau_cls"] = 0.0
    raw["eval"] = {"period": 3, "report": False}
    raw["run"].update({"device": "cuda", "log_period": 2})
    return write_config(tmp_path / "c.yaml", raw)


def _check_run(run) -> None:
    state = ckpt.load(ckpt.latest_checkpoint(run))
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["runner"]["teacher"].values() if v.is_floating_point())
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["acrst/pasted_per_image_labeled"] >= 1 and "unsup/loss_box_reg" in last
    assert {(r["step"], r["model"]) for r in records if r["kind"] == "eval"} >= {(6, "teacher"), (6, "student")}


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_cuda_training_with_acrst_and_bf16(tmp_path, tiny_demo, pipeline):
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = _config(tmp_path, tiny_demo, pipeline)
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg)], cwd=REPO, env=_gpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "device cuda" in proc.stdout
    _check_run(tmp_path / "run")


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_collectives_under_nccl(tmp_path, tiny_demo):
    """NCCL refuses CPU tensors: every CPU-side collective must go through the gloo group."""
    cfg = _config(tmp_path, tiny_demo, "torch")
    env = dict(_gpu_env(), ACRST_DIST_FORCE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           "-m", "acrst_fast.train", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _check_run(tmp_path / "run")
