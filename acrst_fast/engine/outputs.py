"""What a training step returns to the trainer and its hooks (both runners: the detector's Mean Teacher
and SSMLL's)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from acrst_fast import metric_names as M
from acrst_fast.host import to_host

PHASE_PRETRAIN, PHASE_MUTUAL = "pretrain", "mutual"


@dataclass
class Deferred:
    """Metrics that need values from the device, computed at the log flush rather than in the step:
    `finish(host copies of tensors)` returns {name: float}. The logger reads the tensors of all the
    window's steps in one host read."""

    tensors: tuple[torch.Tensor, ...]
    finish: Callable[[list[np.ndarray]], dict[str, float]]


def resolve_deferred(deferred: list[Deferred], host: list[np.ndarray] | None = None) -> dict[str, float]:
    """The metrics of `deferred`; `host`: the host copies of their tensors, in order (read here when None)."""
    tensors = [t for d in deferred for t in d.tensors]
    it = iter(to_host(*tensors) if host is None else host)
    out: dict[str, float] = {}
    for d in deferred:
        out |= d.finish([next(it) for _ in d.tensors])
    return out


@dataclass
class StepOutput:
    """What one step reports. Loss values are detached 0-dim tensors on the device (read by the logger
    once per log period, and by the trainer's stop agreement once per step); `deferred` holds the
    metrics that need the host (pseudo-label quality, counts)."""

    phase: str
    sup: dict[str, torch.Tensor]
    unsup: dict[str, torch.Tensor]
    total: torch.Tensor
    images: int
    pseudo_per_image: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)  # host values, averaged by the logger
    deferred: list[Deferred] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """Every device value of the step, in the order `resolve` expects them."""
        return [self.total, *self.sup.values(), *self.unsup.values(), *(t for d in self.deferred for t in d.tensors)]

    def resolve(self, host: list[np.ndarray] | None = None) -> dict[str, float]:
        """All of the step's scalars as floats: total, sup/*, unsup/*, extras and the deferred metrics.
        `host`: the host copies of `tensors()` (read here when not given)."""
        host = to_host(*self.tensors()) if host is None else host
        n = 1 + len(self.sup) + len(self.unsup)
        out = {M.TOTAL: float(host[0])}
        out |= {M.key(M.SUP, k): float(v) for k, v in zip(self.sup, host[1:1 + len(self.sup)])}
        out |= {M.key(M.UNSUP, k): float(v) for k, v in zip(self.unsup, host[1 + len(self.sup):n])}
        out |= self.extras
        return out | resolve_deferred(self.deferred, host[n:])

    def describe(self) -> str:
        """The loss and its terms, for the divergence message (reads the device)."""
        v = self.resolve()

        def terms(group: str) -> str:
            return "{" + ", ".join(f"{k.split('/', 1)[1]}: {x:.4g}" for k, x in v.items()
                                   if k.startswith(group + "/")) + "}"

        return f"loss {v[M.TOTAL]:.4g}; sup {terms(M.SUP)}" + (f", unsup {terms(M.UNSUP)}" if self.unsup else "")
