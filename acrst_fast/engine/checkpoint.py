"""Checkpoints: written atomically, found again on resume.

A checkpoint is one file `ckpt_{step:08d}.pt` (student, teacher, optimizer, step, RNG states, the
world size, and whatever else the caller puts in), plus, with a CropBank, `ckpt_{step:08d}.bank.pt`
(what every rank shares, written once) and one `ckpt_{step:08d}.rank{r}.pt` per rank for what each
rank owns (`rank_state.py`), all written before the main file. It is written to a temporary file in the same folder,
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

from acrst_fast import dist
from acrst_fast.errors import UserError, one_line
from acrst_fast.safe_io import atomic_write, claim_dir

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")
# everything the trainer and train_ssmll write into a run folder (and their temporary files)
_RUN_FILES = (r"config\.yaml|metrics\.jsonl|dataset_stats\.json|final_metrics\.json|last_good\.json|"
              r"ssmll_teacher\.pt|ssmll_metrics\.json|ckpt_\d{8}(\.rank\d+|\.bank)?\.pt")
_RUN_ENTRY = re.compile(rf"^({_RUN_FILES}|tensorboard|report|ssmll|supervised|diverged|\.({_RUN_FILES})\.tmp\d+)$")


def claim_run_dir(run_dir: str | Path, what: str = "run.output_dir") -> Path:
    """Create the run folder, or accept an existing one that holds only what runs write; anything
    else in it is an OutputError naming it (the engine never overwrites what it did not create)."""
    return claim_dir(run_dir, lambda name: _RUN_ENTRY.match(name) is not None, what)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete the temporary files a killed run left in its run folder (`.NAME.tmpPID`, written by
    safe_io.atomic_write for the run folder's own files: never complete, never read)."""
    for p in Path(run_dir).iterdir():
        if _RUN_ENTRY.match(p.name) and p.name.startswith(".") and p.is_file():
            p.unlink(missing_ok=True)


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
    """torch.save to a temporary file, fsync, rename (safe_io.atomic_write). A failed save (disk full,
    permissions) raises OutputError with the path and the free space, and leaves no temporary file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _parts(run_dir: Path, pattern: str) -> list[tuple[int, Path]]:
    found = [(int(p.name[5:13]), p) for p in run_dir.glob(pattern) if p.name[5:13].isdigit()]
    return sorted(found)


def prune(run_dir: str | Path, keep: int, protect: tuple[int, ...] = (), world: int = 1) -> None:
    """Rank 0: delete all but the newest `keep` checkpoints and those of the steps in `protect` (the last
    good one), with their shared CropBank part and the parts of ranks a larger world left (each rank
    below `world` prunes its own: `prune_rank_parts`)."""
    run_dir = Path(run_dir)
    for step, p in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if step in protect:
            continue
        p.unlink(missing_ok=True)
        Path(run_dir / f"ckpt_{step:08d}.bank.pt").unlink(missing_ok=True)
        for r, part in ((int(q.name.split(".rank")[1][:-3]), q) for q in run_dir.glob(f"ckpt_{step:08d}.rank*.pt")):
            if r >= world:
                part.unlink(missing_ok=True)


def prune_rank_parts(run_dir: str | Path, rank: int, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Every rank: delete its own parts (`ckpt_*.rank{rank}.pt`) but the newest `keep` and those of the
    steps in `protect`: the rule `prune` applies to the main files, on this rank's own disk."""
    for step, p in _parts(Path(run_dir), f"ckpt_*.rank{rank}.pt")[:-keep] if keep > 0 else []:
        if step not in protect:
            p.unlink(missing_ok=True)


def rng_state() -> dict:
    """The global RNG states of this process, as tensors and plain Python values only (NumPy's key array
    becomes a tensor), so a checkpoint loads with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]  # keys: a tensor (this format) or a NumPy array (older checkpoints)
    np.random.set_state((name, np.asarray(keys).astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global RNGs from one 63-bit seed (a branch's own randomness)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


def load(path: str | Path) -> dict:
    """Read a checkpoint (on the CPU); CheckpointError in one line if it is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read checkpoint ({one_line(str(exc))[:160]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not an acrst_fast checkpoint (no 'step')")
    return state


def read_everywhere(path: str | Path, have: dict | None = None) -> dict:
    """`load(path)` on every rank (collective). Ranks that do not see the file (a run folder on node-local
    disks) receive rank 0's copy; `have`: rank 0's copy already read."""
    path = Path(path)
    if dist.world_size() == 1:
        return have if have is not None else load(path)
    seen = dist.all_gather_object(path.is_file())
    if not seen[0]:
        raise CheckpointError(f"{path}: not found on rank 0")
    if all(seen):
        return have if have is not None and dist.rank() == 0 else load(path)
    mine = (have if have is not None else load(path)) if dist.rank() == 0 else None
    return dist.broadcast_from_main(mine)


def load_newest_readable(run_dir: str | Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that can be read, with its state; an unreadable newer one is named in a
    warning and skipped (a truncated file, a disk that filled up). None when there is none."""
    skipped = []
    for _step, p in reversed(list_checkpoints(run_dir)):
        try:
            state = load(p)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        for msg in skipped:
            warn(f"warning: {msg}; falling back to {p.name}")
        return p, state
    if skipped:
        raise CheckpointError(f"{run_dir}: no readable checkpoint ({skipped[0]})")
    return None
