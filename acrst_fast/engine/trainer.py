"""A small training loop; everything else (EMA, LR, checkpoints, evaluation, logs) is a hook.

Stops are collective. After every step, one all-reduce of a tiny CPU tensor (over the gloo
group, `dist.all_reduce`) tells every rank whether any rank was asked to stop (SIGTERM, Ctrl-C)
and each rank's loss of that step. So all ranks end at the same step: a non-finite loss on any
rank raises `TrainingDiverged` on every rank before any hook runs (no checkpoint of the broken
weights is written), and a stop request anywhere runs every hook of the finished step, then the
`on_interrupt` hooks (the stop checkpoint), then raises `TrainingInterrupted` on every rank.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from acrst_fast import dist
from acrst_fast.augment.host import mark_host


class TrainingInterrupted(Exception):
    """Raised by `Trainer.train` after a requested stop was honoured at a step boundary."""


class TrainingDiverged(Exception):
    """A step's loss was not finite on some rank. `step` is the step (1-based count) that produced it."""

    def __init__(self, step: int, ranks: list[int], detail: str):
        self.step, self.ranks, self.detail = step, ranks, detail
        super().__init__(f"step {step}: loss is not finite on rank {', '.join(map(str, ranks))}"
                         + (f" ({detail})" if detail else ""))


class HookBase:
    """Called around the loop. `trainer.step` is the number of completed steps."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def on_interrupt(self, trainer: "Trainer") -> None: ...


class Trainer:
    """Runs `run_step(step)` from `start_step` to `total_steps`, calling hooks in order.

    `run_step` returns an object with `total` (this rank's loss, a float or a 0-dim tensor on the
    device) and `describe()` (the loss terms, for the divergence message). `request_stop()` (the CLI calls it on SIGTERM or
    SIGINT) is honoured at the next step boundary on every rank. `trainer.losses` holds the
    finished step's loss of every rank (a list, rank order).
    """

    def __init__(self, run_step: Callable[[int], Any], hooks: list[HookBase], start_step: int, total_steps: int):
        self.run_step, self.hooks = run_step, hooks
        self.step, self.total_steps = start_step, total_steps
        self.output: Any = None
        self.losses: list[float] = []
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True

    def _agree(self, loss) -> tuple[bool, list[float]]:
        """One collective: (any rank asked to stop, every rank's loss). `loss` (a float or a 0-dim
        tensor on the device) is the one value the step reads from the device."""
        world, rank = dist.world_size(), dist.rank()
        values = [0.0] * (1 + world)
        values[0] = float(self.stop_requested)
        values[1 + rank] = float(loss)
        packet = mark_host(torch.tensor(values, dtype=torch.float64))  # host values: the gloo group
        dist.all_reduce(packet)
        values = packet.tolist()
        return values[0] > 0, values[1:]

    def train(self) -> None:
        for h in self.hooks:
            h.before_train(self)
        stop, _ = self._agree(0.0)  # a stop asked for before the first step
        while self.step < self.total_steps and not stop:
            for h in self.hooks:
                h.before_step(self)
            self.output = self.run_step(self.step)
            self.step += 1
            stop, self.losses = self._agree(self.output.total)
            bad = [r for r, v in enumerate(self.losses) if not math.isfinite(v)]
            if bad:
                detail = self.output.describe() if not math.isfinite(self.losses[dist.rank()]) else ""
                raise TrainingDiverged(self.step, bad, detail)
            for h in self.hooks:
                h.after_step(self)
        if stop and self.step < self.total_steps:
            for h in self.hooks:
                h.on_interrupt(self)
            dist.barrier()  # every rank leaves after rank 0 has written the stop checkpoint
            raise TrainingInterrupted(f"stopped at step {self.step}")
        for h in self.hooks:
            h.after_train(self)
