"""Mixed precision for student and teacher: `torch.autocast`, plus a GradScaler for fp16.

solver.amp: "auto" (bf16 on a CUDA GPU that supports it, fp16 + GradScaler on older GPUs, off on
CPU), "off", "bf16" or "fp16" (forced, also on CPU). Parameters, optimizer state and the EMA stay
float32; only the forward passes run in the lower precision, and the detector's outputs
(teacher boxes and scores) are cast back to float32.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from acrst_fast.modes import AMP_MODES  # the list the config checks solver.amp against


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`, or None for full precision."""
    if mode not in AMP_MODES:
        raise ValueError(f"solver.amp must be one of {', '.join(AMP_MODES)}; got '{mode}'")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


class Precision:
    """The autocast context and the loss scaler of one run.

    `autocast()` wraps forward passes; `backward(loss)`, `unscale(optimizer)` (before gradient
    clipping) and `step(optimizer)` replace loss.backward() / optimizer.step(). The scaler only
    exists for fp16; its state is part of the checkpoint.
    """

    def __init__(self, mode: str, device: torch.device):
        self.device, self.dtype = device, resolve_amp(mode, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skips the step when gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def float_outputs(predictions: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Detector outputs with floating-point tensors (boxes, scores) in float32."""
    return [{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in predictions]
