"""Which checkpoint is "last good": the one to resume from after the loss blows up.

Rule: a checkpoint written after step S becomes good once each of the next `check_steps` steps
had a finite loss (the largest over ranks) no larger than `factor` x the median loss of the
`check_steps` steps before S. A run that diverges has usually been climbing for a while before the
loss turns NaN, and the checkpoints written during the climb already hold blown-up weights; the
rule rejects them, because the steps after them are already far above the level before them.
The newest good checkpoint is named in `last_good.json` of the run folder and is never pruned,
nor is a checkpoint still under test. The guard's state travels in every checkpoint, so a
resumed run goes on judging the checkpoint it resumed from.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.trainer import HookBase, Trainer
from acrst_fast.safe_io import atomic_write_text

LAST_GOOD = "last_good.json"


class DivergenceGuard(HookBase):
    """Tracks the step losses every rank agreed on (`trainer.settled`) and promotes checkpoints to good.
    Before each checkpoint it tests the new one and shares the steps not to prune as
    `trainer.storage["protected_steps"]`."""

    name = "divergence"

    def __init__(self, run_dir: Path, check_steps: int, factor: float, is_main: bool):
        self.run_dir, self.check_steps, self.factor, self.is_main = run_dir, check_steps, factor, is_main
        self.recent: list[float] = []  # the last check_steps step losses (max over ranks)
        self.pending: dict[int, float] = {}  # checkpoint step -> loss bound, still under test
        self.last_good: int | None = None
        self.good_bound = 0.0

    def protected(self) -> tuple[int, ...]:
        """Checkpoint steps that must not be pruned: the last good one and those under test."""
        return tuple(self.pending) + ((self.last_good,) if self.last_good is not None else ())

    def before_checkpoint(self, trainer: Trainer) -> None:
        self.on_saved(trainer.step)
        trainer.storage["protected_steps"] = self.protected()

    def on_saved(self, step: int) -> None:
        """A checkpoint of `step` was written: test it against the level of the steps before it."""
        if step not in self.pending:
            level = statistics.median(self.recent) if self.recent else float("inf")
            self.pending[step] = self.factor * level

    def after_step(self, trainer: Trainer) -> None:
        for step, losses in trainer.settled:  # the steps whose losses every rank has read since the last call
            self.observe(step, max(losses))

    def observe(self, at: int, loss: float) -> None:
        """The agreed loss (max over ranks) of step `at`: it tests the checkpoints under test."""
        self.recent = (self.recent + [loss])[-self.check_steps:]
        for step, bound in sorted(self.pending.items()):
            if loss > bound:
                del self.pending[step]
            elif at - step >= self.check_steps:
                del self.pending[step]
                self.last_good, self.good_bound = step, bound
                if self.is_main:
                    atomic_write_text(self.run_dir / LAST_GOOD, json.dumps(self.describe_good()))

    def describe_good(self) -> dict:
        return {"step": self.last_good, "checkpoint": ckpt.checkpoint_path(self.run_dir, self.last_good).name,
                "rule": f"the {self.check_steps} steps after it had finite losses <= {self.good_bound:.4g} "
                        f"({self.factor:g} x the median loss of the {self.check_steps} steps before it)"}

    def advice(self, lr: float) -> str:
        """What to do after a divergence: resume the last good checkpoint with a lower learning rate."""
        if self.last_good is None or not ckpt.checkpoint_path(self.run_dir, self.last_good).is_file():
            return (f"No checkpoint is known good yet (a checkpoint is good once the {self.check_steps} steps after it "
                    f"had finite losses below {self.factor:g}x the level before it); start again with a lower "
                    f"learning rate, e.g. solver.lr={lr / 10:g}, in a new run.output_dir")
        path = ckpt.checkpoint_path(self.run_dir, self.last_good)
        return (f"The last good checkpoint is {path} (step {self.last_good}: {self.describe_good()['rule']}). "
                f"Continue from it with a lower learning rate: --resume-from {path} solver.lr={lr / 10:g}")

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "pending": dict(self.pending), "last_good": self.last_good,
                "good_bound": self.good_bound}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore at checkpoint `step`; checkpoints after it (an abandoned branch) are forgotten."""
        self.recent = list(state.get("recent", []))
        self.pending = {int(k): float(v) for k, v in state.get("pending", {}).items() if int(k) <= step}
        last = state.get("last_good")
        self.last_good = int(last) if last is not None and int(last) <= step else None
        self.good_bound = float(state.get("good_bound", 0.0))
        if self.is_main and self.last_good is not None:
            atomic_write_text(self.run_dir / LAST_GOOD, json.dumps(self.describe_good()))
