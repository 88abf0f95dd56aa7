"""One training step of Mean Teacher (paper Eq. 1-5).

Pre-training (step < pretrain_steps): the student learns from labeled images alone.
Mutual learning: the teacher (initialised from the student when mutual learning starts, then
updated by EMA) predicts on the weak view of unlabeled images; predictions with score >= tau_cls
are pseudo-labels for the student on the strong view (same geometry, so boxes carry over).

    L = L_sup + lambda_unsup * L_unsup
    L_sup   = RPN cls + RPN reg + RoI cls + RoI reg on labeled images          (Eq. 4)
    L_unsup = RPN cls + RoI cls on unlabeled images with pseudo-labels         (Eq. 5)
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from acrst_fast.config import Config
from acrst_fast.data.loader import Batch, DataStage
from acrst_fast.engine.ema import ema_update

SUP_LOSS_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
UNSUP_LOSS_TERMS = ("loss_objectness", "loss_classifier")  # classification terms only (Eq. 5)
PHASE_PRETRAIN, PHASE_MUTUAL = "pretrain", "mutual"


@dataclass
class StepOutput:
    """What one step reports. Loss values are detached floats of this rank."""

    phase: str
    sup: dict[str, float]
    unsup: dict[str, float]
    total: float
    images: int
    pseudo_per_image: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


class StudentLosses(nn.Module):
    """The module DDP wraps: one forward per step computes both loss groups.

    labeled/unlabeled images: list of Tensor[3, H, W]; targets: list of {"boxes": Tensor[N, 4]
    (x1, y1, x2, y2) pixels, "labels": Tensor[N] int64 1..K}. Returns (sup, unsup) loss dicts;
    unsup is empty when no unlabeled images are given.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, lab_images, lab_targets, unl_images=None, unl_targets=None):
        sup = self.detector(lab_images, lab_targets)
        unsup = self.detector(unl_images, unl_targets) if unl_images else {}
        return sup, unsup


def filter_pseudo_labels(predictions: list[dict[str, torch.Tensor]], tau_cls: float) -> list[dict[str, torch.Tensor]]:
    """Keep teacher predictions with score >= tau_cls. Each dict: boxes Tensor[N, 4], labels Tensor[N], scores Tensor[N]."""
    out = []
    for p in predictions:
        keep = p["scores"] >= tau_cls
        out.append({"boxes": p["boxes"][keep].detach(), "labels": p["labels"][keep].detach(),
                    "scores": p["scores"][keep].detach()})
    return out


class MeanTeacher:
    """Holds student, teacher, optimizer and data streams; `run_step(step)` does one step.

    student: the detector (unwrapped); student_losses: `StudentLosses` over it, DDP-wrapped when
    distributed; the teacher is a separate module outside DDP, updated in place by `update_teacher`.
    """

    def __init__(self, cfg: Config, student: nn.Module, student_losses: nn.Module, optimizer: torch.optim.Optimizer,
                 data: DataStage, device: torch.device):
        self.cfg, self.student, self.student_losses = cfg, student, student_losses
        self.optimizer, self.data, self.device = optimizer, data, device
        self.teacher = copy.deepcopy(student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.pretrain_steps = cfg.solver.pretrain_steps
        self._labeled: Iterator[Batch] | None = None
        self._unlabeled: Iterator[Batch] | None = None
        self._params = [p for p in student.parameters() if p.requires_grad]

    def phase(self, step: int) -> str:
        return PHASE_PRETRAIN if step < self.pretrain_steps else PHASE_MUTUAL

    def start(self, step: int) -> None:
        """Open the data streams at the positions of `step` (0 for a new run, the checkpoint's on resume)."""
        self._labeled = self.data.labeled(step)
        self._unlabeled = self.data.unlabeled(step - self.pretrain_steps) if step >= self.pretrain_steps else None

    def _to(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [im.to(self.device, non_blocking=True) for im in images]

    def run_step(self, step: int) -> StepOutput:
        t0 = time.perf_counter()
        if self._labeled is None:
            self.start(step)
        lab = next(self._labeled)
        lab_images, lab_targets = self._to(lab.strong), lab.targets(self.device)
        unl_images, pseudo, n_unl = None, None, 0
        t_data = time.perf_counter()
        if self.phase(step) == PHASE_MUTUAL:
            if step == self.pretrain_steps:
                self.teacher.load_state_dict(self.student.state_dict())
            if self._unlabeled is None:
                self._unlabeled = self.data.unlabeled(step - self.pretrain_steps)
            unl = next(self._unlabeled)
            t_data = time.perf_counter()
            with torch.no_grad():
                predictions = self.teacher(self._to(unl.weak))
            pseudo = filter_pseudo_labels(predictions, self.cfg.mean_teacher.tau_cls)
            unl_images, n_unl = self._to(unl.strong), len(unl)
        t_teacher = time.perf_counter()

        self.student.train()
        targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo] if pseudo is not None else None
        sup, unsup = self.student_losses(lab_images, lab_targets, unl_images, targets)
        loss = sum(sup[k] for k in SUP_LOSS_TERMS)
        if unsup:
            loss = loss + self.cfg.mean_teacher.lambda_unsup * sum(unsup[k] for k in UNSUP_LOSS_TERMS)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} "
                                     f"(sup {({k: float(v) for k, v in sup.items()})}, "
                                     f"unsup {({k: float(v) for k, v in unsup.items()})})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.solver.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.solver.grad_clip_norm)
        self.optimizer.step()
        t_end = time.perf_counter()
        return StepOutput(
            phase=self.phase(step),
            sup={k: float(sup[k].detach()) for k in SUP_LOSS_TERMS},
            unsup={k: float(unsup[k].detach()) for k in UNSUP_LOSS_TERMS} if unsup else {},
            total=float(loss.detach()),
            images=len(lab) + n_unl,
            pseudo_per_image=(sum(len(p["boxes"]) for p in pseudo) / max(1, n_unl)) if pseudo is not None else 0.0,
            seconds={"data": t_data - t0, "teacher": t_teacher - t_data, "student": t_end - t_teacher},
        )

    def update_teacher(self) -> None:
        ema_update(self.teacher, self.student, self.cfg.mean_teacher.ema_decay)
