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
from typing import Any, Protocol

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
    """Called around the loop. `trainer.step` is the number of completed steps. Hooks share values
    through `trainer.storage` (the learning rate, the evaluation history, metrics for the next log
    line), never through each other. A hook with state of its own returns it from `state_dict`; it
    travels in the checkpoint under the hook's `name`."""

    name = ""  # key of the hook's state in the checkpoint (hooks without state leave it empty)

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def on_interrupt(self, trainer: "Trainer") -> None: ...
    def before_checkpoint(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, step: int) -> None: ...


class Runner(Protocol):
    """What the trainer drives: the detector's `MeanTeacher` or SSMLL's `SSMLLRunner`."""

    pretrain_steps: int

    has_rank_state: bool  # whether rank_state_dict() holds anything

    def run_step(self, step: int) -> Any: ...
    def start(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def rank_state_dict(self) -> dict: ...
    def load_rank_state_dict(self, state: dict) -> None: ...


class Trainer:
    """Runs `runner.run_step(step)` from `start_step` to `total_steps`, calling hooks in order.

    `run_step` returns an object with `total` (this rank's loss, a float or a 0-dim tensor on the
    device) and `describe()` (the loss terms, for the divergence message). `request_stop()` (the CLI calls it on SIGTERM or
    SIGINT) is honoured at the next step boundary on every rank. `trainer.losses` holds the
    finished step's loss of every rank (a list, rank order). `storage` holds what hooks share:
    "lr" (set by the LR hook), "eval_history" (list of evaluation records), "log_deferred" (metrics
    to add to the next log line). `state_dict()` is the checkpoint, as detectron2's `TrainerBase`:
    the step, the runner's state, the storage and every stateful hook's state.
    """

    def __init__(self, runner: Runner, hooks: list[HookBase], start_step: int, total_steps: int):
        self.runner, self.hooks = runner, hooks
        self.step, self.total_steps = start_step, total_steps
        self.output: Any = None
        self.losses: list[float] = []
        self.stop_requested = False
        self.storage: dict[str, Any] = {"eval_history": []}

    def request_stop(self) -> None:
        self.stop_requested = True

    def state_dict(self) -> dict:
        """The state every rank shares (rank 0 writes it): step, runner, storage, hooks."""
        for h in self.hooks:
            h.before_checkpoint(self)
        hooks = {h.name: h.state_dict() for h in self.hooks if h.name}
        storage = {k: v for k, v in self.storage.items() if k != "log_deferred"}
        return {"step": self.step, "runner": self.runner.state_dict(), "storage": storage, "hooks": hooks}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.runner.load_state_dict(state["runner"])
        self.storage.update(state.get("storage", {}))
        for h in self.hooks:
            if h.name:
                h.load_state_dict(state.get("hooks", {}).get(h.name, {}), self.step)

    def rank_state_dict(self) -> dict:
        """The state this rank owns (its CropBank); empty when the runner has none."""
        return self.runner.rank_state_dict()

    def load_rank_state_dict(self, state: dict) -> None:
        self.runner.load_rank_state_dict(state)

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
        self.runner.start(self.step)  # the data streams at the positions of this step
        for h in self.hooks:
            h.before_train(self)
        stop, _ = self._agree(0.0)  # a stop asked for before the first step
        while self.step < self.total_steps and not stop:
            for h in self.hooks:
                h.before_step(self)
            self.output = self.runner.run_step(self.step)
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
