"""One training step of Mean Teacher (paper Eq. 1-5).

Pre-training (step < pretrain_steps): the student learns from labeled images alone.
Mutual learning: the teacher (initialised from the student when mutual learning starts, then
updated by EMA) predicts on the weak view of unlabeled images; predictions with score >= tau_cls
are pseudo-labels for the student on the strong view (same geometry, so boxes carry over).

    L = L_sup + lambda_unsup * L_unsup
    L_sup   = RPN cls + RPN reg + RoI cls + RoI reg on labeled images          (Eq. 4)
    L_unsup = RPN cls + RoI cls on unlabeled images with pseudo-labels         (Eq. 5)
            + RPN reg + RoI reg on pasted instances only, with selective supervision (Eq. 10)

With ACRST (`acrst.fbr`), every student image (labeled and unlabeled strong views) gets CropBank
instances pasted in (FBR), sampled by class with mu from Pseudo Recall (AFFR). The Labeled bank
is filled from the labeled weak views during the first pass over this rank's labeled shard; the
Pseudo bank from the kept pseudo-labels on the unlabeled weak views, every mutual step.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from acrst_fast.augment import ACRST, class_histogram
from acrst_fast.config import Config
from acrst_fast.data.loader import Batch, DataStage, sample_seed
from acrst_fast.engine.amp import Precision, float_outputs
from acrst_fast.engine.ema import ema_update
from acrst_fast.ops import box_iou_ref
from acrst_fast.pseudo_labels import filter_pseudo_labels
from acrst_fast.ssmll.metrics import image_labels, negative_metrics
from acrst_fast.ssmll.model import preprocess
from acrst_fast.timing import clock

SUP_LOSS_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
UNSUP_LOSS_TERMS = ("loss_objectness", "loss_classifier")  # classification terms only (Eq. 5)
SELECTIVE_REG_TERMS = ("loss_rpn_box_reg", "loss_box_reg")  # added with selective supervision (Eq. 10)
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
    extras: dict[str, float] = field(default_factory=dict)  # ACRST diagnostics, averaged by the logger

    def describe(self) -> str:
        """The loss and its terms, for the divergence message."""
        terms = lambda d: "{" + ", ".join(f"{k}: {v:.4g}" for k, v in d.items()) + "}"  # noqa: E731
        return f"loss {self.total:.4g}; sup {terms(self.sup)}" + (f", unsup {terms(self.unsup)}" if self.unsup else "")


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


def match_counts(pseudo: list[dict[str, torch.Tensor]], gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor],
                 iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, pseudo-labels, ground truths): one-to-one, class-aware matching at IoU >= `iou`,
    pseudo-labels taken by decreasing score. Precision = tp / pseudo-labels, recall = tp / ground truths."""
    tp = n_pl = n_gt = 0
    for p, gb, gl in zip(pseudo, gt_boxes, gt_labels):
        gb, gl = gb.to(p["boxes"].device), gl.to(p["boxes"].device)
        n_pl, n_gt = n_pl + len(p["boxes"]), n_gt + len(gb)
        if len(p["boxes"]) == 0 or len(gb) == 0:
            continue
        ious = box_iou_ref(p["boxes"].float(), gb.float())
        ious[p["labels"][:, None] != gl[None, :]] = 0.0
        used = torch.zeros(len(gb), dtype=torch.bool, device=gb.device)
        for i in torch.argsort(p["scores"], descending=True).tolist():
            cand = ious[i].masked_fill(used, 0.0)
            j = int(torch.argmax(cand))
            if cand[j] >= iou:
                used[j] = True
                tp += 1
    return tp, n_pl, n_gt


class MeanTeacher:
    """Holds student, teacher, optimizer and data streams; `run_step(step)` does one step.

    student: the detector (unwrapped); student_losses: `StudentLosses` over it, DDP-wrapped when
    distributed; the teacher is a separate module outside DDP, updated in place by `update_teacher`.
    """

    def __init__(self, cfg: Config, student: nn.Module, student_losses: nn.Module, optimizer: torch.optim.Optimizer,
                 data: DataStage, device: torch.device, acrst: ACRST | None = None, labeled_bank_steps: int = 0,
                 class_names: tuple[str, ...] = (), gt_class_counts: torch.Tensor | None = None,
                 rank: int = 0, world: int = 1, hidden_gt: bool = False,
                 classifier: nn.Module | None = None, classifier_size: int = 0):
        """acrst: None for plain Mean Teacher. labeled_bank_steps: steps during which labeled ground
        truths are offered to the Labeled bank (one pass over this rank's shard). hidden_gt: the
        unlabeled data carries ground truth (same on every rank): log pseudo-label precision/recall.
        classifier: the SSMLL network (eval mode) for two-stage / mining filtering, with its input size."""
        self.cfg, self.student, self.student_losses = cfg, student, student_losses
        self.optimizer, self.data, self.device = optimizer, data, device
        self.acrst, self.labeled_bank_steps = acrst, labeled_bank_steps
        self.class_names, self.gt_class_counts = class_names, gt_class_counts
        self.rank, self.world, self.hidden_gt = rank, world, hidden_gt
        self.selective = acrst is not None and cfg.acrst.selective_supervision
        self.classifier, self.classifier_size = classifier, classifier_size
        self.filter_mode = cfg.ssmll.filter
        if self.filter_mode != "single" and classifier is None:
            raise ValueError(f"ssmll.filter={self.filter_mode} needs the SSMLL classifier")
        self.teacher = copy.deepcopy(student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.pretrain_steps = cfg.solver.pretrain_steps
        self._labeled: Iterator[Batch] | None = None
        self._unlabeled: Iterator[Batch] | None = None
        self._params = [p for p in student.parameters() if p.requires_grad]
        self.precision = Precision(cfg.solver.amp, device)
        self.sync_timing = False  # benchmarks: synchronise the GPU at each timing boundary
        inject = os.environ.get("ACRST_INJECT_NAN", "")  # "STEP:RANK": this rank's loss at STEP becomes NaN
        self._inject_nan_at = int(inject.split(":")[0]) if inject and int(inject.split(":")[1]) == rank else -1

    def _now(self) -> float:
        return clock(self.device, self.sync_timing)

    def phase(self, step: int) -> str:
        return PHASE_PRETRAIN if step < self.pretrain_steps else PHASE_MUTUAL

    def start(self, step: int) -> None:
        """Open the data streams at the positions of `step` (0 for a new run, the checkpoint's on resume)."""
        self._labeled = self.data.labeled(step)
        self._unlabeled = self.data.unlabeled(step - self.pretrain_steps) if step >= self.pretrain_steps else None

    def _to(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [im.to(self.device, non_blocking=True) for im in images]

    def _generator(self, step: int, purpose: int) -> torch.Generator:
        """Randomness of ACRST for (step, purpose) on this rank: the same after a resume."""
        return torch.Generator().manual_seed(sample_seed(self.cfg.run.seed, 100 + purpose, step * self.world + self.rank))

    def run_step(self, step: int) -> StepOutput:
        t0 = self._now()
        if self._labeled is None:
            self.start(step)
        lab = next(self._labeled)
        lab_images, lab_targets = self._to(lab.strong), lab.targets(self.device)
        unl_images, unl_targets, pseudo, n_unl = None, None, None, 0
        t_data = self._now()
        if self.phase(step) == PHASE_MUTUAL:
            if step == self.pretrain_steps:
                self.teacher.load_state_dict(self.student.state_dict())
            if self._unlabeled is None:
                self._unlabeled = self.data.unlabeled(step - self.pretrain_steps)
            unl = next(self._unlabeled)
            t_data = self._now()
            weak = self._to(unl.weak)
            with torch.no_grad(), self.precision.autocast():
                predictions = float_outputs(self.teacher(weak))
            stage1 = filter_pseudo_labels(predictions, self.cfg.mean_teacher.tau_cls)
            pseudo, probs = stage1, None
            if self.classifier is not None:
                with torch.no_grad(), self.precision.autocast():
                    probs = torch.sigmoid(self.classifier(preprocess(weak, self.classifier_size)).float())
                m = self.cfg.ssmll
                pseudo = filter_pseudo_labels(predictions, self.cfg.mean_teacher.tau_cls, probs, self.filter_mode,
                                              m.tau_ml, m.tau_pos, m.mining_min_score)
            if self.acrst is not None:
                self.acrst.observe_teacher(weak, predictions, pseudo, self._generator(step, 0))
            unl_images, n_unl = self._to(unl.strong), len(unl)
            unl_targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]
        t_teacher = self._now()

        extras: dict[str, float] = {}
        if self.acrst is not None:
            if step < self.labeled_bank_steps:
                self.acrst.add_ground_truth(self._to(lab.weak), [t["boxes"] for t in lab_targets],
                                            [t["labels"] for t in lab_targets], self._generator(step, 1))
                if step == self.labeled_bank_steps - 1:  # the first pass is over on every rank
                    # the same generator on every rank (not per rank), so the merged banks are equal
                    self.acrst.share_labeled_bank(torch.Generator().manual_seed(sample_seed(self.cfg.run.seed, 104, 0)))
            lab_images, lab_targets, pasted_lab = self._rebalance(lab_images, lab_targets, self._generator(step, 2),
                                                                  labeled=True)
            extras["acrst/pasted_per_image_labeled"] = pasted_lab
            if unl_images is not None:
                unl_images, unl_targets, pasted_unl = self._rebalance(unl_images, unl_targets, self._generator(step, 3),
                                                                      labeled=False)
                extras["acrst/pasted_per_image_unlabeled"] = pasted_unl
        t_paste = self._now()
        if self.acrst is not None:
            extras.update(self._diagnostics())
        if pseudo is not None and self.hidden_gt:  # pseudo-label quality against the hidden ground truth
            tp, n_pl, n_gt = match_counts(pseudo, unl.boxes, unl.labels)
            extras.update({"pseudo/tp": float(tp), "pseudo/num_pseudo": float(n_pl), "pseudo/num_hidden_gt": float(n_gt)})
            if probs is not None:  # the same step's stage-1 (score only) pseudo-labels, and the classifier
                tp1, n_pl1, _ = match_counts(stage1, unl.boxes, unl.labels)
                extras.update({"pseudo/stage1/tp": float(tp1), "pseudo/stage1/num_pseudo": float(n_pl1)})
                neg = negative_metrics(probs.cpu(), image_labels(unl.labels, probs.shape[1]), self.cfg.ssmll.tau_ml)
                extras.update({f"ssmll/{k}": neg[k] for k in ("true_negative", "neg_predicted", "absent")})
        if pseudo is not None:  # pseudo-label class histogram (report: GT vs pseudo-label distribution)
            counts = class_histogram(torch.cat([p["labels"] for p in pseudo]), len(self.class_names))
            for name, c in zip(self.class_names, counts.tolist()):
                extras[f"pseudo/count/{name}"] = c
        t_metrics = self._now()

        self.student.train()
        with self.precision.autocast():
            sup, unsup = self.student_losses(lab_images, lab_targets, unl_images, unl_targets)
        unsup_terms = UNSUP_LOSS_TERMS + (SELECTIVE_REG_TERMS if self.selective else ())
        loss = sum(sup[k] for k in SUP_LOSS_TERMS)
        if unsup:
            loss = loss + self.cfg.mean_teacher.lambda_unsup * sum(unsup[k] for k in unsup_terms)
        if self._inject_nan_at == step:  # fault injection for the tests (ACRST_INJECT_NAN=STEP:RANK)
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        if self.cfg.solver.grad_clip_norm > 0:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.solver.grad_clip_norm)
        self.precision.step(self.optimizer)
        t_end = self._now()
        return StepOutput(
            phase=self.phase(step),
            sup={k: float(sup[k].detach()) for k in SUP_LOSS_TERMS},
            unsup={k: float(unsup[k].detach()) for k in unsup_terms} if unsup else {},
            total=float(loss.detach()),
            images=len(lab) + n_unl,
            pseudo_per_image=(sum(len(p["boxes"]) for p in pseudo) / max(1, n_unl)) if pseudo is not None else 0.0,
            seconds={"data": t_data - t0, "teacher": t_teacher - t_data, "acrst": t_paste - t_teacher,
                     "metrics": t_metrics - t_paste, "student": t_end - t_metrics,
                     **({f"acrst_{k}": v for k, v in self.acrst.pop_seconds().items()} if self.acrst else {})},
            extras=extras,
        )

    def _rebalance(self, images: list[torch.Tensor], targets: list[dict], gen: torch.Generator,
                   labeled: bool) -> tuple[list[torch.Tensor], list[dict], float]:
        """Paste bank instances into `images`; targets gain the pasted boxes (and, on unlabeled images
        with selective supervision, `reg_weight`: 1 for pasted boxes, 0 for pseudo-labels)."""
        images, boxes, labels, pasted = self.acrst.rebalance(images, [t["boxes"] for t in targets],
                                                        [t["labels"] for t in targets], gen)
        out = []
        for b, lab, p in zip(boxes, labels, pasted):
            t = {"boxes": b, "labels": lab}
            if not labeled and self.selective:
                t["reg_weight"] = p.float()
            out.append(t)
        return images, out, self.acrst.last_pasted_per_image

    def _diagnostics(self) -> dict[str, float]:
        d = self.acrst.diagnostics(self.gt_class_counts)
        out = {"acrst/kl_gt_pl": float(d["kl_gt_pl"])} if "kl_gt_pl" in d else {}
        for key in ("pr", "mu", "bank_labeled", "bank_pseudo", "pl_hist"):
            for name, v in zip(self.class_names, d[key].tolist()):
                out[f"acrst/{key}/{name}"] = float(v)
        return out

    def update_teacher(self) -> None:
        ema_update(self.teacher, self.student, self.cfg.mean_teacher.ema_decay)
