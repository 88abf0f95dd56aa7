"""Weights files: reading a detector's or a backbone's state dict safely, checking torchvision's hash in a
file name, loading what matches, and naming the file of `backbone_weights` (`models/pretrained.py`).
Every problem is one `WeightsError` line naming the file.

`weights` (a detector state dict, or an acrst_fast checkpoint: its teacher, or its student for a checkpoint at
or before the end of burn-in: `checkpoint_weights`) is read with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from torch import nn

from acrst_fast.errors import UserError, one_line
from acrst_fast.models import pretrained

log = logging.getLogger(__name__)


class WeightsError(UserError):
    """A weights file is missing, corrupt, or does not fit the model; the message names the file."""



def verify_torchvision_hash(path: Path) -> None:
    m = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if not m:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(m.group(1)):
        raise WeightsError(f"{path}: sha256 {digest[:12]}... does not start with {m.group(1)} "
                           "(the hash in the file name); the file is corrupt or not what it claims")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _safe_load(path: Path):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects. NumPy
    arrays (the RNG state of checkpoints written before it was stored as a tensor) are allowed as data."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def in_burn_in(obj: dict) -> bool:
    """Whether an acrst_fast checkpoint (`Trainer.state_dict()` with its run's config) is at or before the end
    of its run's burn-in: its teacher is then still the copy made at construction (mutual learning starts
    by copying the student into it)."""
    pretrain = (obj.get("config") or {}).get("solver", {}).get("pretrain_steps")
    return pretrain is not None and int(obj.get("step", 0)) <= int(pretrain)


def checkpoint_weights(obj: dict) -> tuple[dict, str]:
    """The detector weights inside an acrst_fast checkpoint: its teacher, or its student when the checkpoint
    is `in_burn_in`. Returns (state dict, which one)."""
    runner = obj["runner"]
    if isinstance(runner.get("teacher"), dict) and not in_burn_in(obj):
        return runner["teacher"], "teacher"
    return runner["student"], "student"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from a weights file: a plain state dict, a `{"model": ...}` file, or
    an acrst_fast checkpoint (`checkpoint_weights`). Loaded safely (no unpickling of arbitrary objects);
    every problem is one WeightsError line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    verify_torchvision_hash(path)
    try:
        obj = _safe_load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
        first = one_line(_ANSI.sub("", str(exc).split("\n\n")[0]))[:200]
        raise WeightsError(f"{path}: cannot read weights safely (torch.load weights_only=True): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("runner"), dict) and isinstance(obj["runner"].get("student"), dict):
        obj, which = checkpoint_weights(obj)
        log.info("%s: the checkpoint's %s", path, which)
    elif isinstance(obj, dict) and "teacher" in obj and isinstance(obj["teacher"], dict):
        obj = obj["teacher"]
    elif isinstance(obj, dict) and "student" in obj and isinstance(obj["student"], dict):
        obj = obj["student"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (name -> tensor)")
    return obj


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], path: str, ignore: tuple[str, ...] = ()) -> int:
    """Copy tensors whose names and shapes match; report the rest. Returns how many were loaded."""
    own = module.state_dict()
    loaded, shape_mismatch = {}, []
    for k, v in state.items():
        if k in own:
            if own[k].shape == v.shape:
                loaded[k] = v
            else:
                shape_mismatch.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    if not loaded:
        raise WeightsError(f"{path}: no tensor matches the model (wrong file or backbone?)")
    module.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    if shape_mismatch:
        log.warning("%s: %d tensors skipped for shape mismatch, e.g. %s", path, len(shape_mismatch), shape_mismatch[0])
    if missing:
        log.info("%s: %d model tensors not in the file (kept at init), e.g. %s", path, len(missing), missing[0])
    if unexpected:
        log.info("%s: %d file tensors unused, e.g. %s", path, len(unexpected), unexpected[0])
    return len(loaded)


def backbone_file(spec: str, backbone: str, key: str) -> str:
    """The local file `spec` names for `backbone` ("" for random init); see `models/pretrained.py`."""
    try:
        return pretrained.resolve(spec, backbone, key)
    except pretrained.PretrainedError as exc:
        raise WeightsError(str(exc)) from None
