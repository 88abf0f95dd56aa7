"""What both runners of the trainer share (the detector's `MeanTeacher` and SSMLL's `SSMLLRunner`): a
student, its `EmaTeacher`, an optimizer, a loss scaler, the phase of a step, and their state."""
from __future__ import annotations

import torch
from torch import nn

from acrst_fast.engine.amp import Precision
from acrst_fast.engine.ema import EmaTeacher
from acrst_fast.engine.outputs import PHASE_MUTUAL, PHASE_PRETRAIN


class StudentTeacherRunner:
    """Base of a runner: subclasses set `student`, `ema`, `optimizer`, `precision`, `pretrain_steps`
    and implement `start(step)` and `run_step(step)`."""

    student: nn.Module
    ema: EmaTeacher
    optimizer: torch.optim.Optimizer
    precision: Precision
    pretrain_steps: int

    @property
    def teacher(self) -> nn.Module:
        return self.ema.module

    def phase(self, step: int) -> str:
        return PHASE_PRETRAIN if step < self.pretrain_steps else PHASE_MUTUAL

    def update_teacher(self) -> None:
        """Teacher <- EMA of the student (the EMA hook calls it after each mutual step)."""
        self.ema.update(self.student)

    def state_dict(self) -> dict:
        """Student, teacher, optimizer and loss-scaler state (the same on every rank)."""
        return {"student": self.student.state_dict(), "teacher": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "grad_scaler": self.precision.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.ema.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))

    @property
    def has_rank_state(self) -> bool:
        """Whether `rank_state_dict` holds anything (without building it)."""
        return False

    def rank_state_dict(self) -> dict:
        """State this rank owns alone (none by default)."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass
