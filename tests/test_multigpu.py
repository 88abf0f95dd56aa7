"""Multi-GPU correctness, checked on CPU: collectives that would reach NCCL with a CPU tensor, collective
stops (SIGTERM or NaN on one rank), float32 boxes under bf16 autocast, one Labeled bank on every rank,
and CropBank writes without duplicate indices."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from acrst_fast.augment.cropbank import LABELED, PSEUDO, CropBank
from acrst_fast.config import ModelConfig
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.resume import rank_state_of
from acrst_fast.engine.amp import float_outputs
from acrst_fast.models.detector import build_detector
from conftest import REPO, fault_env, finish_group, rank_pid, start_group, tiny_config_dict, write_config

ACRST_ON = {"fbr": True, "selective_supervision": True, "n_range": [1, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _torchrun(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "acrst_fast.train", str(cfg), *extra]


def _finish(proc, timeout=600) -> tuple[str, str]:
    done = finish_group(proc, timeout)
    return done.stdout, done.stderr


def _labeled_part(state: dict, num_classes: int) -> dict:
    bank = state["acrst"]["bank"]
    _, capacity, _ = bank["shape"]
    n = num_classes * capacity
    return {k: bank[k][:n] for k in ("pixels", "size_hw", "valid")} | {"seen": bank["seen"][LABELED]}


@pytest.mark.slow
def test_cuda_only_default_group_two_processes(tmp_path, tiny_demo, cpu_env):
    """The default group started as `cuda:gloo` refuses CPU tensors like NCCL does. The run passes only if
    every CPU-side collective (Pseudo Recall and pseudo-label counts, the stop flag, the log flush, the
    checkpoint gather, the Labeled-bank gather, evaluation) goes through the explicit gloo group."""
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=6, pretrain_steps=3)
    raw["eval"]["period"] = 3
    raw["acrst"] = ACRST_ON
    raw["mean_teacher"]["tau_cls"] = 0.0
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = start_group(_torchrun(cfg), cwd=REPO, env=dict(cpu_env, ACRST_DIST_BACKEND="cuda:gloo"))
    out, err = _finish(proc)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    assert "world size 2" in out
    run = tmp_path / "run"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7)) and "pseudo/tp" in train[-1]
    assert {(r["step"], r["model"]) for r in records if r["kind"] == "eval"} >= {(3, "student"), (6, "teacher")}
    # item 4: after the first pass over the labeled set, both ranks hold the same Labeled bank
    parts = [rank_state_of(run, 6, r) for r in (0, 1)]
    a, b = (_labeled_part(p, 4) for p in parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    per_class = torch.bincount(torch.tensor([x["category_id"] for x in json.loads(
        (tiny_demo / "labeled.json").read_text())["annotations"]]) - 1, minlength=4)
    assert torch.equal(a["seen"], per_class)  # every rank's shard was offered, none twice
    assert int(a["valid"].sum()) == int(per_class.clamp(max=ACRST_ON["capacity_per_class"]).sum())
    assert torch.equal(parts[0]["acrst"]["recall"]["history"], parts[1]["acrst"]["recall"]["history"])


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=300, pretrain_steps=300)
    raw["run"]["checkpoint_period"] = 1000
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = start_group(_torchrun(cfg), cwd=REPO, env=cpu_env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3):
        assert proc.poll() is None and time.time() < deadline, _finish(proc)
        time.sleep(0.05)
    os.kill(rank_pid(1, str(cfg)), signal.SIGTERM)  # rank 1 only
    out, err = _finish(proc)
    assert err.count("interrupted: stopped at step") == 2, err[-3000:]  # both ranks, the same step
    steps = {int(x) for x in __import__("re").findall(r"interrupted: stopped at step (\d+)", err)}
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert len(steps) == 1 and [s for s, _ in found] == list(steps)
    stop = found[0][0]
    assert all(ckpt.rank_state_path(tmp_path / "run", stop, r).exists() is False for r in (0, 1))  # no ACRST here
    resumed = subprocess.run(_torchrun(cfg, "--resume", f"solver.total_steps={stop + 2}",
                                       f"solver.pretrain_steps={stop + 2}"),
                             cwd=REPO, env=cpu_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == stop + 2


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=10, pretrain_steps=10)
    cfg = write_config(tmp_path / "c.yaml", raw)
    # step index 4 (the 5th step) on rank 1 only
    proc = start_group(_torchrun(cfg), cwd=REPO, env=fault_env(cpu_env, ACRST_TEST_NAN="4:1"))
    out, err = _finish(proc)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if "training diverged" in ln]
    assert len(lines) == 2 and all("step 5: loss is not finite on rank 1" in ln for ln in lines), err[-3000:]
    assert any("(loss nan; sup {loss_objectness: " in ln for ln in lines)  # rank 1 names the loss terms
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2, 4]  # nothing written after the NaN
    resumed = subprocess.run(_torchrun(cfg, "--resume"), cwd=REPO, env=cpu_env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == 10


def test_boxes_stay_float32_under_bf16_autocast():
    """torchvision's box coder casts boxes to the regression output's dtype; under bf16 autocast every
    detection would be a bf16 number (2 px steps above 256 px). Ours decodes in float32."""
    torch.manual_seed(0)
    model = build_detector(ModelConfig(backbone="mobilenet_v2", box_score_thresh=0.0, fpn_channels=16,
                                       representation_size=32), 4).eval()
    images = [torch.rand(3, 600, 700)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = float_outputs(model(images))[0]["boxes"]
    coords = boxes.flatten()
    inner = coords[(coords > 0) & (coords < 600)]  # not clipped to a border
    assert boxes.dtype == torch.float32 and inner.numel() > 100
    representable = (inner == inner.to(torch.bfloat16).float()).float().mean()
    assert representable < 0.5, f"{float(representable):.2f} of the coordinates are bf16 numbers"


class _IndexWrites(TorchDispatchMode):
    """Records the index tensors of every index_put_ (what `t[idx] = v` dispatches to)."""

    def __init__(self):
        super().__init__()
        self.indices = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
            self.indices.append([i.clone() for i in args[1] if i is not None])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("source", [PSEUDO, LABELED])
def test_cropbank_writes_have_no_duplicate_slots(source):
    """64 offers into 2 slots in one call: each slot must hold ONE offer's pixels, size and score, the
    last one as if offered one by one, and no index_put_ may repeat an index (undefined on CUDA)."""
    bank = CropBank(num_classes=1, capacity=2, crop_size=16)
    img = torch.zeros(3, 256, 256)
    boxes = []
    for i in range(64):  # offer i: colour (i + 1) / 255, size (8 + i // 8) x (8 + i % 8)
        y, x, h, w = (i // 8) * 32, (i % 8) * 32, 8 + i // 8, 8 + i % 8
        img[:, y:y + h, x:x + w] = (i + 1) / 255.0
        boxes.append([x, y, x + w, y + h])
    gen = torch.Generator().manual_seed(3)
    with _IndexWrites() as writes:
        bank.add(source, [img], [torch.tensor(boxes, dtype=torch.float32)], [torch.ones(64, dtype=torch.int64)],
                 [torch.arange(64, dtype=torch.float32)], generator=gen)
    assert writes.indices
    for idx in writes.indices:
        for t in idx:
            flat = t.flatten() if t.dtype != torch.bool else torch.nonzero(t).flatten()
            assert len(flat.unique()) == len(flat), f"duplicate slots written: {flat.tolist()}"
    base = bank.slot_base(source, 1)
    for slot in (base, base + 1):
        colour = bank.pixels[slot, :, 1:7, 1:7].flatten().unique().tolist()  # inside every stored crop (>= 8 px)
        h, w = bank.size_hw[slot].tolist()
        by_size = (int(h) - 8) * 8 + (int(w) - 8)
        assert colour == [by_size + 1] == [int(bank.score[slot]) + 1]
    if source == PSEUDO:  # the ring keeps the last two offers
        assert sorted(int(bank.score[s]) for s in (base, base + 1)) == [62, 63]
