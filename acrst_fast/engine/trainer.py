"""A small training loop; everything else (EMA, LR, checkpoints, evaluation, logs) is a hook."""
from __future__ import annotations

from typing import Any, Callable


class TrainingInterrupted(Exception):
    """Raised by `Trainer.train` after a requested stop was honoured at a step boundary."""


class HookBase:
    """Called around the loop. `trainer.step` is the number of completed steps."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def on_interrupt(self, trainer: "Trainer") -> None: ...


class Trainer:
    """Runs `run_step(step)` from `start_step` to `total_steps`, calling hooks in order.

    `request_stop()` (the CLI calls it on SIGTERM/SIGINT) is honoured between steps, after every
    hook of the finished step has run, so the state hooks save on `on_interrupt` is consistent.
    """

    def __init__(self, run_step: Callable[[int], Any], hooks: list[HookBase], start_step: int, total_steps: int):
        self.run_step, self.hooks = run_step, hooks
        self.step, self.total_steps = start_step, total_steps
        self.output: Any = None
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True

    def train(self) -> None:
        for h in self.hooks:
            h.before_train(self)
        while self.step < self.total_steps:
            if self.stop_requested:
                for h in self.hooks:
                    h.on_interrupt(self)
                raise TrainingInterrupted(f"stopped at step {self.step}")
            for h in self.hooks:
                h.before_step(self)
            self.output = self.run_step(self.step)
            self.step += 1
            for h in self.hooks:
                h.after_step(self)
        for h in self.hooks:
            h.after_train(self)
