"""Checkpoints: written atomically, found again on resume.

A checkpoint is one file `ckpt_{step:08d}.pt` (student, teacher, optimizer, step, RNG states,
and whatever else the caller puts in), plus one `ckpt_{step:08d}.rank{r}.pt` per rank for state
each rank owns (its CropBank), written before the main file. It is written to a temporary file in the same folder,
flushed to disk, then renamed over its final name, so a run killed mid-write leaves either the
old set of checkpoints or the new one, never a partial file under a checkpoint's name. The
newest complete checkpoint is the one with the highest step.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def rank_state_path(run_dir: str | Path, step: int, rank: int) -> Path:
    """A rank's own part of checkpoint `step` (its CropBank), beside the main file."""
    return Path(run_dir) / f"ckpt_{step:08d}.rank{rank}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), run_dir / n) for n in os.listdir(run_dir) if (m := _NAME.match(n))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, with their per-rank parts."""
    for step, p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
        for part in Path(run_dir).glob(f"ckpt_{step:08d}.rank*.pt"):
            part.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"{path}: cannot read checkpoint: {exc}") from None
