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
from typing import Callable, Iterator

import numpy as np

import torch
from torch import nn

from acrst_fast.augment import ACRST, class_histogram
from acrst_fast.augment.host import mark_host, to_host
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
class Deferred:
    """Metrics that need values from the device, computed at the log flush rather than in the step:
    `finish(host copies of tensors)` returns {name: float}. The logger reads the tensors of all the
    window's steps in one host read."""

    tensors: tuple[torch.Tensor, ...]
    finish: Callable[[list[np.ndarray]], dict[str, float]]


@dataclass
class StepOutput:
    """What one step reports. Loss values are detached 0-dim tensors on the device (read by the logger
    once per log period, and by the trainer's stop agreement once per step); `deferred` holds the
    metrics that need the host (ACRST diagnostics, pseudo-label quality)."""

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
        it = iter(host)
        out = {"total": float(next(it))}
        out |= {f"sup/{k}": float(next(it)) for k in self.sup}
        out |= {f"unsup/{k}": float(next(it)) for k in self.unsup}
        out |= self.extras
        for d in self.deferred:
            out |= d.finish([next(it) for _ in d.tensors])
        return out

    def describe(self) -> str:
        """The loss and its terms, for the divergence message (reads the device)."""
        v = self.resolve()
        terms = lambda group: "{" + ", ".join(f"{k.split('/', 1)[1]}: {x:.4g}" for k, x in v.items()  # noqa: E731
                                              if k.startswith(group + "/")) + "}"
        return f"loss {v['total']:.4g}; sup {terms('sup')}" + (f", unsup {terms('unsup')}" if self.unsup else "")


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
        self.last_pseudo_count = 0
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
        """One step, in the paper's order (Fig. 3): data; teacher pseudo-labels with the two-stage
        filter; ACRST (bank, Pseudo Recall, paste); student losses; optimisation. The host reads the
        device a fixed number of times, whatever the batch size or the number of pseudo-labels."""
        t0 = self._now()
        if self._labeled is None:
            self.start(step)
        lab = next(self._labeled)
        lab_images, lab_targets = self._to(lab.strong), lab.targets(self.device)
        unl, unl_images, unl_targets, pseudo, n_unl = None, None, None, None, 0
        deferred: list[Deferred] = []
        t_data = self._now()
        if self.phase(step) == PHASE_MUTUAL:
            if step == self.pretrain_steps:
                self.teacher.load_state_dict(self.student.state_dict())
            if self._unlabeled is None:
                self._unlabeled = self.data.unlabeled(step - self.pretrain_steps)
            unl = next(self._unlabeled)
            t_data = self._now()
            weak = self._to(unl.weak)
            pseudo, predictions, deferred = self._pseudo_labels(weak, unl)
            self.last_pseudo_count = sum(len(p["boxes"]) for p in pseudo)  # shapes: host values
            if self.acrst is not None:
                self.acrst.observe_teacher(weak, predictions, pseudo, self._generator(step, 0))
            unl_images, n_unl = self._to(unl.strong), len(unl)
            unl_targets = [{"boxes": p["boxes"], "labels": p["labels"]} for p in pseudo]
        t_teacher = self._now()

        extras: dict[str, float] = {}
        if self.acrst is not None:
            lab_images, lab_targets, unl_images, unl_targets = self._rebalance(
                step, lab, lab_images, lab_targets, unl_images, unl_targets, extras)
            tensors, finish = self.acrst.diagnostics_deferred(self.gt_class_counts)
            deferred.append(Deferred(tensors, lambda host, finish=finish: self._diagnostics(finish(host))))
        t_paste = self._now()

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
            sup={k: sup[k].detach() for k in SUP_LOSS_TERMS},
            unsup={k: unsup[k].detach() for k in unsup_terms} if unsup else {},
            total=loss.detach(),
            images=len(lab) + n_unl,
            pseudo_per_image=(sum(len(p["boxes"]) for p in pseudo) / max(1, n_unl)) if pseudo is not None else 0.0,
            seconds={"data": t_data - t0, "teacher": t_teacher - t_data, "acrst": t_paste - t_teacher,
                     "student": t_end - t_paste,
                     **({f"acrst_{k}": v for k, v in self.acrst.pop_seconds().items()} if self.acrst else {})},
            extras=extras,
            deferred=deferred,
        )

    def _pseudo_labels(self, weak: list[torch.Tensor], unl: Batch):
        """Teacher predictions on the weak views and the kept pseudo-labels (stage 1: score; stage 2:
        the SSMLL classifier), plus the deferred metrics of their quality (hidden ground truth, class
        histogram, classifier negatives). Returns (pseudo-labels, predictions, deferred)."""
        with torch.inference_mode(), self.precision.autocast():
            predictions = float_outputs(self.teacher(weak))
            probs = torch.sigmoid(self.classifier(preprocess(weak, self.classifier_size)).float()) \
                if self.classifier is not None else None
        tau = self.cfg.mean_teacher.tau_cls
        stage1 = filter_pseudo_labels(predictions, tau)
        pseudo = stage1
        if probs is not None:
            m = self.cfg.ssmll
            pseudo = filter_pseudo_labels(predictions, tau, probs, self.filter_mode, m.tau_ml, m.tau_pos,
                                          m.mining_min_score)
        deferred = [self._pseudo_histogram(pseudo)]
        if self.hidden_gt:  # pseudo-label quality against the hidden ground truth, at the log flush
            deferred.append(self._pseudo_quality(pseudo, unl, "pseudo"))
            if probs is not None:
                deferred.append(self._pseudo_quality(stage1, unl, "pseudo/stage1"))
                deferred.append(self._classifier_negatives(probs, unl))
        return pseudo, predictions, deferred

    def _pseudo_histogram(self, pseudo: list[dict]) -> Deferred:
        """Pseudo-label class histogram (report: GT vs pseudo-label distribution)."""
        labels = torch.cat([p["labels"] for p in pseudo]) if pseudo else torch.zeros(0, dtype=torch.int64)
        counts = class_histogram(labels, len(self.class_names))
        return Deferred((counts,), lambda host: {f"pseudo/count/{name}": float(c)
                                                 for name, c in zip(self.class_names, host[0].tolist())})

    @staticmethod
    def _pseudo_quality(pseudo: list[dict], unl: Batch, prefix: str) -> Deferred:
        """tp / pseudo-labels / hidden ground truths of one step (`match_counts`), computed at the flush."""
        sizes = [len(p["boxes"]) for p in pseudo]
        widths = {"boxes": 4, "labels": 1, "scores": 1}
        tensors = tuple(torch.cat([p[k].reshape(-1, w) for p in pseudo]) if pseudo else torch.zeros((0, w))
                        for k, w in widths.items())
        gt_boxes, gt_labels = list(unl.boxes), list(unl.labels)

        def finish(host):
            boxes, labels, scores = (torch.from_numpy(h) for h in host)
            parts = [{"boxes": b.float(), "labels": lab.flatten().long(), "scores": sc.flatten().float()}
                     for b, lab, sc in zip(boxes.split(sizes), labels.split(sizes), scores.split(sizes))]
            tp, n_pl, n_gt = match_counts(parts, gt_boxes, gt_labels)
            out = {f"{prefix}/tp": float(tp), f"{prefix}/num_pseudo": float(n_pl)}
            return out | ({"pseudo/num_hidden_gt": float(n_gt)} if prefix == "pseudo" else {})

        return Deferred(tensors, finish)

    def _classifier_negatives(self, probs: torch.Tensor, unl: Batch) -> Deferred:
        labels = image_labels(unl.labels, probs.shape[1])

        def finish(host):
            neg = negative_metrics(torch.from_numpy(host[0]).float(), labels, self.cfg.ssmll.tau_ml)
            return {f"ssmll/{k}": neg[k] for k in ("true_negative", "neg_predicted", "absent")}

        return Deferred((probs,), finish)

    def _rebalance(self, step: int, lab: Batch, lab_images, lab_targets, unl_images, unl_targets, extras):
        """ACRST on the student's images: the Labeled bank's first pass, then FBR on the labeled and
        unlabeled images together (one host read, one paste launch). Targets gain the pasted boxes
        (and, on unlabeled images with selective supervision, `reg_weight`: 1 for pasted boxes, 0 for
        pseudo-labels)."""
        host_boxes = [mark_host(b) for b in lab.boxes]  # the data loader's targets: already on the host
        host_labels = [mark_host(t) for t in lab.labels]
        if step < self.labeled_bank_steps:
            self.acrst.add_ground_truth(self._to(lab.weak), host_boxes, host_labels, self._generator(step, 1))
            if step == self.labeled_bank_steps - 1:  # the first pass is over on every rank
                # the same generator on every rank (not per rank), so the merged banks are equal
                self.acrst.share_labeled_bank(torch.Generator().manual_seed(sample_seed(self.cfg.run.seed, 104, 0)))
        batches = [(lab_images, host_boxes, host_labels, self._generator(step, 2))]
        if unl_images is not None:
            batches.append((unl_images, [t["boxes"] for t in unl_targets], [t["labels"] for t in unl_targets],
                            self._generator(step, 3)))
        results = self.acrst.rebalance_many(batches)
        names = ("labeled", "unlabeled")
        targets = []
        for (images, boxes, labels, pasted), name, per_image in zip(results, names, self.acrst.pasted_per_image):
            extras[f"acrst/pasted_per_image_{name}"] = per_image
            targets.append([{"boxes": b, "labels": lb} | ({"reg_weight": p.float()} if name == "unlabeled" and
                                                             self.selective else {})
                            for b, lb, p in zip(boxes, labels, pasted)])
        lab_images, lab_targets = results[0][0], targets[0]
        if unl_images is not None:
            unl_images, unl_targets = results[1][0], targets[1]
        return lab_images, lab_targets, unl_images, unl_targets

    def _diagnostics(self, d: dict) -> dict[str, float]:
        out = {"acrst/kl_gt_pl": float(d["kl_gt_pl"])} if "kl_gt_pl" in d else {}
        for key in ("pr", "mu", "bank_labeled", "bank_pseudo", "pl_hist"):
            for name, v in zip(self.class_names, d[key].tolist()):
                out[f"acrst/{key}/{name}"] = float(v)
        return out

    def update_teacher(self) -> None:
        ema_update(self.teacher, self.student, self.cfg.mean_teacher.ema_decay)
