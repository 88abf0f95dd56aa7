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
instances pasted in (FBR) once mutual learning starts (`acrst.paste_during_pretrain` pastes during
burn-in too), sampled by class with mu from Pseudo Recall (AFFR). The Labeled bank is filled from
the labeled weak views during the first pass over this rank's labeled shard; the Pseudo bank from
the kept pseudo-labels on the unlabeled weak views, every mutual step. The strong photometric ops
run after the paste (`augment.photometric_after_paste`), so pasted instances get them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn

from acrst_fast import metric_names as M
from acrst_fast.augment import ACRST, class_histogram
from acrst_fast.host import mark_host
from acrst_fast.config import Config
from acrst_fast.data.batch import Batch, DataStage, apply_pending
from acrst_fast.engine.amp import Precision, float_outputs
from acrst_fast.engine.ema import EmaTeacher
from acrst_fast.engine.outputs import PHASE_PRETRAIN, Deferred, StepOutput
from acrst_fast.engine.runner import StudentTeacherRunner
from acrst_fast.evaluation.pseudo_quality import match_counts
from acrst_fast.pseudo_labels import filter_pseudo_labels
from acrst_fast.ssmll.metrics import image_labels, negative_metrics
from acrst_fast.ssmll.model import preprocess
from acrst_fast.streams import Stream, generator
from acrst_fast.timing import StepClock

SUP_LOSS_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
UNSUP_LOSS_TERMS = ("loss_objectness", "loss_classifier")  # classification terms only (Eq. 5)
SELECTIVE_REG_TERMS = ("loss_rpn_box_reg", "loss_box_reg")  # added with selective supervision (Eq. 10)

Targets = list[dict[str, torch.Tensor]]


@dataclass
class PseudoLabels:
    """The teacher's part of a step. weak: the unlabeled weak views (list of Tensor[3, H, W] on the
    device); predictions: the teacher's raw detections on them; kept: the pseudo-labels that passed
    the filter ({"boxes": Tensor[N, 4] x1y1x2y2 pixels, "labels": Tensor[N] 1..K, "scores": Tensor[N]}
    per image); deferred: their quality metrics, computed at the log flush."""

    weak: list[torch.Tensor]
    predictions: list[dict[str, torch.Tensor]]
    kept: list[dict[str, torch.Tensor]]
    deferred: list[Deferred]

    @property
    def count(self) -> int:
        return sum(len(p["boxes"]) for p in self.kept)  # shapes: host values

    def targets(self) -> Targets:
        return [{"boxes": p["boxes"], "labels": p["labels"]} for p in self.kept]


@dataclass
class StudentInputs:
    """What the student learns from in a step: images (list of Tensor[3, H, W] on the device) and targets
    ({"boxes": Tensor[N, 4] x1y1x2y2, "labels": Tensor[N] 1..K, optional "reg_weight": Tensor[N]}) of the
    labeled strong views and, in mutual learning, of the unlabeled strong views."""

    lab_images: list[torch.Tensor]
    lab_targets: Targets
    unl_images: list[torch.Tensor] | None = None
    unl_targets: Targets | None = None
    extras: dict[str, float] = field(default_factory=dict)  # host values of the rebalancing (pasted per image)


@dataclass
class Losses:
    """The student's losses: sup and unsup terms (device tensors, unweighted) and the weighted total."""

    sup: dict[str, torch.Tensor]
    unsup: dict[str, torch.Tensor]
    total: torch.Tensor


class StudentLosses(nn.Module):
    """The module DDP wraps: one forward per step computes both loss groups.

    labeled/unlabeled images: list of Tensor[3, H, W]; targets: list of {"boxes": Tensor[N, 4]
    (x1, y1, x2, y2) pixels, "labels": Tensor[N] int64 1..K}. Returns (sup, unsup) loss dicts;
    unsup is empty when no unlabeled images are given. unsup_focal_gamma > 0: the unlabeled images' RoI
    classification is the focal loss (mean_teacher.unsup_focal_gamma; `WeightedRoIHeads.focal_gamma`).

    joint (mean_teacher.joint_forward): labeled and unlabeled images go through the detector together, in
    one padded batch (one backbone, FPN and RPN-head launch sequence instead of two), the heads computing
    each group's losses with its own normaliser (`WeightedRPN.group_split`); with frozen BatchNorm and the
    same canvas that equals two forwards up to float summation order and the samplers' random draws
    (tested). joint=False: a forward per group (the reference).
    """

    def __init__(self, detector: nn.Module, unsup_focal_gamma: float = 0.0, joint: bool = True):
        super().__init__()
        self.detector, self.unsup_focal_gamma, self.joint = detector, unsup_focal_gamma, joint

    def forward(self, lab_images, lab_targets, unl_images=None, unl_targets=None):
        if not unl_images:
            return self.detector(lab_images, lab_targets), {}
        rpn, heads = self.detector.rpn, self.detector.roi_heads
        try:
            if not self.joint:
                sup = self.detector(lab_images, lab_targets)
                heads.focal_gamma = self.unsup_focal_gamma
                return sup, self.detector(unl_images, unl_targets)
            heads.focal_gamma = self.unsup_focal_gamma  # the second group's (the unlabeled images')
            rpn.group_split = heads.group_split = len(lab_images)
            both = self.detector(list(lab_images) + list(unl_images), list(lab_targets) + list(unl_targets))
            return {k: v[0] for k, v in both.items()}, {k: v[1] for k, v in both.items()}
        finally:
            heads.focal_gamma, rpn.group_split, heads.group_split = 0.0, None, None


class MeanTeacher(StudentTeacherRunner):
    """Holds student, teacher, optimizer and data streams; `run_step(step)` does one step.

    student: the detector (unwrapped); student_losses: `StudentLosses` over it, DDP-wrapped when
    distributed; the teacher (`EmaTeacher`) is a separate module outside DDP, updated in place by
    `update_teacher`.
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
        self.bank_fill_start = 0  # the Labeled bank fills during steps [start, start + labeled_bank_steps)
        self.labeled_merged = False  # whether that first pass is over and every rank's bank was merged
        self.class_names, self.gt_class_counts = class_names, gt_class_counts
        self.rank, self.world, self.hidden_gt = rank, world, hidden_gt
        self.selective = acrst is not None and cfg.acrst.selective_supervision
        self.classifier, self.classifier_size = classifier, classifier_size
        self.filter_mode = cfg.ssmll.filter
        if self.filter_mode != "single" and classifier is None:
            raise ValueError(f"ssmll.filter={self.filter_mode} needs the SSMLL classifier")
        self.precision = Precision(cfg.solver.amp, device)
        # the teacher's forward runs under autocast: its weights are kept in the compute dtype by the EMA
        self.ema = EmaTeacher(student, cfg.mean_teacher.ema_decay, compute_dtype=self.precision.dtype)
        self.pretrain_steps = cfg.solver.pretrain_steps
        self._labeled: Iterator[Batch] | None = None
        self._unlabeled: Iterator[Batch] | None = None
        self._params = [p for p in student.parameters() if p.requires_grad]
        self.sync_timing = False  # benchmarks: synchronise the GPU at each timing boundary
        self.last_pseudo_count = 0
        self.observers: list = []  # fn(stage, step, value), called inside run_step (`_observe`)

    def start(self, step: int) -> None:
        """Open the data streams at the positions of `step` (0 for a new run, the checkpoint's on resume)."""
        self._labeled = self.data.labeled(step)
        self._unlabeled = self.data.unlabeled(step - self.pretrain_steps) if step >= self.pretrain_steps else None

    def _to(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [im.to(self.device, non_blocking=True) for im in images]

    def _generator(self, step: int, stream: Stream) -> torch.Generator:
        """Randomness of ACRST for (step, stream) on this rank: the same after a resume."""
        return generator(self.cfg.run.seed, stream, step * self.world + self.rank)

    def run_step(self, step: int) -> StepOutput:
        """One step, in the paper's order (Fig. 3): data; teacher pseudo-labels with the two-stage
        filter; ACRST (bank, Pseudo Recall, paste); student losses; optimisation. The host reads the
        device a fixed number of times, whatever the batch size or the number of pseudo-labels."""
        clock = StepClock(self.device, self.sync_timing)
        lab, unl = self._batches(step)
        self._observe("batches", step, (lab, unl))
        clock.mark("data")
        inputs = StudentInputs(self._to(lab.strong), lab.targets(self.device))
        pseudo = None
        if unl is not None:
            pseudo = self.pseudo_labels(step, unl)
            self._observe("pseudo_labels", step, pseudo)
            inputs = replace(inputs, unl_images=self._to(unl.strong), unl_targets=pseudo.targets())
        clock.mark("teacher")
        if self.acrst is not None:
            inputs = self.rebalance(step, lab, inputs,
                                    paste=unl is not None or self.cfg.acrst.paste_during_pretrain)
            self._observe("rebalanced", step, inputs)
        clock.mark("acrst")
        inputs = self.photometric(inputs, lab, unl)
        self._observe("student_inputs", step, inputs)
        clock.mark("photometric")
        losses = self.losses(step, inputs)
        self.optimise(losses.total)
        clock.mark("student")
        return self._output(step, len(lab), inputs, pseudo, losses, clock.seconds)

    def _observe(self, stage: str, step: int, value) -> None:
        """Hand `value` to every observer (`self.observers`: fn(stage, step, value)), read-only: "batches"
        ((labeled Batch, unlabeled Batch or None)), "pseudo_labels" (`PseudoLabels`), "rebalanced" (the
        `StudentInputs` right after ACRST's paste), "student_inputs" (what the student's forward gets). For
        tests and diagnostics; nothing is observed when the list is empty."""
        for fn in self.observers:
            fn(stage, step, value)

    def _batches(self, step: int) -> tuple[Batch, Batch | None]:
        """This step's labeled batch and, in mutual learning, its unlabeled batch."""
        if self._labeled is None:
            self.start(step)
        lab = next(self._labeled)
        if self.phase(step) == PHASE_PRETRAIN:
            return lab, None
        if self._unlabeled is None:
            self._unlabeled = self.data.unlabeled(step - self.pretrain_steps)
        return lab, next(self._unlabeled)

    def pseudo_labels(self, step: int, unl: Batch) -> PseudoLabels:
        """The teacher (copied from the student when mutual learning starts) on the weak views, the
        two-stage filter, and the Pseudo bank's share of the teacher's detections."""
        if step == self.pretrain_steps:
            self.ema.reset(self.student)
        weak = self._to(unl.weak)
        kept, predictions, deferred = self._pseudo_labels(weak, unl)
        pseudo = PseudoLabels(weak, predictions, kept, deferred)
        self.last_pseudo_count = pseudo.count
        if self.acrst is not None:
            self.acrst.observe_teacher(weak, predictions, kept, self._generator(step, Stream.ACRST_OBSERVE))
        return pseudo

    def photometric(self, inputs: StudentInputs, lab: Batch, unl: Batch | None) -> StudentInputs:
        """The strong views' photometric ops, after the crop-paste (augment.photometric_after_paste): the
        pasted instances are augmented with the image they land in. On the images' device, labeled and
        unlabeled images together, as one padded batch on CUDA (augment.batched_photometric)."""
        groups = [(inputs.lab_images, lab.pending)] + ([(inputs.unl_images, unl.pending)] if unl is not None else [])
        for images, pending in groups:
            if pending and len(pending) != len(images):
                raise ValueError(f"{len(images)} images but {len(pending)} pending photometric draws")
        todo = [g for g in groups if g[1]]  # groups whose photometric ops are still to run
        if not todo:
            return inputs
        images = [im for g in todo for im in g[0]]
        mode = self.cfg.augment.batched_photometric
        out = iter(apply_pending(images, [p for g in todo for p in g[1]],
                                 mode == "batch" or (mode == "auto" and images[0].device.type == "cuda")))
        done = [[next(out) for _ in g[0]] if g[1] else g[0] for g in groups]
        return replace(inputs, lab_images=done[0], unl_images=done[1] if unl is not None else None)

    def losses(self, step: int, inputs: StudentInputs) -> Losses:
        """The student's forward on both groups (one DDP forward): L = L_sup + lambda_unsup * L_unsup."""
        self.student.train()
        with self.precision.autocast():
            sup, unsup = self.student_losses(inputs.lab_images, inputs.lab_targets, inputs.unl_images,
                                             inputs.unl_targets)
        unsup_terms = UNSUP_LOSS_TERMS + (SELECTIVE_REG_TERMS if self.selective else ())
        total = sum(sup[k] for k in SUP_LOSS_TERMS)
        if unsup:
            total = total + self.cfg.mean_teacher.lambda_unsup * sum(unsup[k] for k in unsup_terms)
        return Losses({k: sup[k].detach() for k in SUP_LOSS_TERMS},
                      {k: unsup[k].detach() for k in unsup_terms} if unsup else {}, total)

    def optimise(self, loss: torch.Tensor) -> None:
        """Backward (scaled under fp16), optional gradient clipping, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        if self.cfg.solver.grad_clip_norm > 0:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.solver.grad_clip_norm)
        self.precision.step(self.optimizer)

    def _output(self, step: int, n_lab: int, inputs: StudentInputs, pseudo: PseudoLabels | None, losses: Losses,
                seconds: dict[str, float]) -> StepOutput:
        n_unl = len(inputs.unl_images) if inputs.unl_images is not None else 0
        if self.acrst is not None:
            seconds |= {f"acrst_{k}": v for k, v in self.acrst.pop_seconds().items()}
        return StepOutput(phase=self.phase(step), sup=losses.sup, unsup=losses.unsup, total=losses.total.detach(),
                          images=n_lab + n_unl,
                          pseudo_per_image=pseudo.count / max(1, n_unl) if pseudo is not None else 0.0,
                          seconds=seconds, extras=inputs.extras,
                          deferred=pseudo.deferred if pseudo is not None else [])

    def _pseudo_labels(self, weak: list[torch.Tensor], unl: Batch):
        """Teacher predictions on the weak views and the kept pseudo-labels (stage 1: score; stage 2:
        the SSMLL classifier), plus the deferred metrics of their quality (hidden ground truth, class
        histogram, classifier negatives). Returns (pseudo-labels, predictions, deferred)."""
        with torch.inference_mode(), self.precision.autocast():
            predictions = float_outputs(self.ema(weak))
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
            deferred.append(self._pseudo_quality(pseudo, unl, stage1=False))
            if probs is not None:
                deferred.append(self._pseudo_quality(stage1, unl, stage1=True))
                deferred.append(self._classifier_negatives(probs, unl))
        return pseudo, predictions, deferred

    def _pseudo_histogram(self, pseudo: list[dict]) -> Deferred:
        """Pseudo-label class histogram (report: GT vs pseudo-label distribution)."""
        labels = torch.cat([p["labels"] for p in pseudo]) if pseudo else torch.zeros(0, dtype=torch.int64)
        counts = class_histogram(labels, len(self.class_names))
        return Deferred((counts,), lambda host: {M.class_key(M.PSEUDO_COUNT, name): float(c)
                                                 for name, c in zip(self.class_names, host[0].tolist())})

    def _pseudo_quality(self, pseudo: list[dict], unl: Batch, stage1: bool) -> Deferred:
        """tp / pseudo-labels / hidden ground truths of one step (`match_counts`), pooled and per class,
        computed at the flush."""
        sizes = [len(p["boxes"]) for p in pseudo]
        widths = {"boxes": 4, "labels": 1, "scores": 1}
        tensors = tuple(torch.cat([p[k].reshape(-1, w) for p in pseudo]) if pseudo else torch.zeros((0, w))
                        for k, w in widths.items())
        gt_boxes, gt_labels = list(unl.boxes), list(unl.labels)

        def finish(host):
            boxes, labels, scores = (torch.from_numpy(h) for h in host)
            parts = [{"boxes": b.float(), "labels": lab.flatten().long(), "scores": sc.flatten().float()}
                     for b, lab, sc in zip(boxes.split(sizes), labels.split(sizes), scores.split(sizes))]
            tp, n_pl, n_gt = match_counts(parts, gt_boxes, gt_labels, len(self.class_names))
            if stage1:
                return {M.STAGE1_TP: float(tp.sum()), M.STAGE1_NUM: float(n_pl.sum())}
            out = {M.PSEUDO_TP: float(tp.sum()), M.PSEUDO_NUM: float(n_pl.sum()), M.PSEUDO_NUM_GT: float(n_gt.sum())}
            for group, counts in ((M.PSEUDO_TP, tp), (M.PSEUDO_NUM, n_pl), (M.PSEUDO_NUM_GT, n_gt)):
                out |= {M.class_key(group, name): float(c) for name, c in zip(self.class_names, counts)}
            return out

        return Deferred(tensors, finish)

    def _classifier_negatives(self, probs: torch.Tensor, unl: Batch) -> Deferred:
        labels = image_labels([mark_host(t) for t in unl.labels], probs.shape[1])  # hidden truth: loader targets

        def finish(host):
            neg = negative_metrics(torch.from_numpy(host[0]).float(), labels, self.cfg.ssmll.tau_ml)
            return {M.ssmll_key(k): neg[k] for k in M.SSMLL_NEGATIVES}

        return Deferred((probs,), finish)

    def rebalance(self, step: int, lab: Batch, inputs: StudentInputs, paste: bool = True) -> StudentInputs:
        """ACRST on the student's images: the Labeled bank's first pass, then (when `paste`: in mutual
        learning, or during burn-in with acrst.paste_during_pretrain) FBR on the labeled and unlabeled
        images together (one host read, one paste launch). Targets gain the pasted boxes (and, on
        unlabeled images with selective supervision, `reg_weight`: 1 for pasted boxes, 0 for
        pseudo-labels)."""
        host_boxes = [mark_host(b) for b in lab.boxes]  # the data loader's targets: already on the host
        host_labels = [mark_host(t) for t in lab.labels]
        fill_end = self.bank_fill_start + self.labeled_bank_steps
        if self.bank_fill_start <= step < fill_end:
            self.acrst.add_ground_truth(self._to(lab.weak), host_boxes, host_labels,
                                        self._generator(step, Stream.ACRST_LABELED_BANK))
            if step == fill_end - 1:  # the first pass is over on every rank
                # the same generator on every rank (not per rank), so the merged banks are equal
                self.acrst.share_labeled_bank(generator(self.cfg.run.seed, Stream.ACRST_SHARE_BANK, 0))
                self.labeled_merged = True
        if not paste:
            return inputs
        batches = [(inputs.lab_images, host_boxes, host_labels, self._generator(step, Stream.ACRST_PASTE_LABELED))]
        if inputs.unl_images is not None:
            batches.append((inputs.unl_images, [t["boxes"] for t in inputs.unl_targets],
                            [t["labels"] for t in inputs.unl_targets],
                            self._generator(step, Stream.ACRST_PASTE_UNLABELED)))
        results = self.acrst.rebalance_many(batches)
        out, extras = [], {}
        for (images, boxes, labels, pasted), split, per_image in zip(results, ("labeled", "unlabeled"),
                                                                      self.acrst.pasted_per_image):
            extras[M.pasted_key(split)] = per_image
            weight = split == "unlabeled" and self.selective
            out.append((images, [{"boxes": b, "labels": lb} | ({"reg_weight": p.float()} if weight else {})
                                 for b, lb, p in zip(boxes, labels, pasted)]))
        unl_images, unl_targets = out[1] if len(out) > 1 else (None, None)
        return StudentInputs(out[0][0], out[0][1], unl_images, unl_targets, extras)

    def diagnostics(self) -> Deferred:
        """ACRST's state (Pseudo Recall, mu, bank fill, pseudo-label histogram, KL to the labeled
        distribution) per class, read at the log flush (`DiagnosticsHook`)."""
        if self.acrst is None:
            return Deferred((), lambda host: {})
        tensors, finish = self.acrst.diagnostics_deferred(self.gt_class_counts)

        def named(host) -> dict[str, float]:
            d = finish(host)
            out = {M.KL_GT_PL: float(d["kl_gt_pl"])} if "kl_gt_pl" in d else {}
            for group, key in ((M.PR, "pr"), (M.MU, "mu"), (M.MU_SAMPLED, "mu_sampled"), (M.BANK_LABELED, "bank_labeled"),
                               (M.BANK_PSEUDO, "bank_pseudo"), (M.PL_HIST, "pl_hist"),
                               (M.PASTED_LABELED, "pasted_labeled"), (M.PASTED_PSEUDO, "pasted_pseudo")):
                out |= {M.class_key(group, name): float(v) for name, v in zip(self.class_names, d[key].tolist())}
            return out

        return Deferred(tensors, named)

    @property
    def has_rank_state(self) -> bool:
        return self.acrst is not None

    def rank_state_dict(self) -> dict:
        """This rank's own state: its CropBank and Pseudo Recall (empty without ACRST), the step at which
        its Labeled bank began to fill and whether the ranks' Labeled banks were merged (`rank_state.split`
        writes what every rank shares once)."""
        if self.acrst is None:
            return {}
        return {"acrst": self.acrst.state_dict(), "bank_fill_start": self.bank_fill_start,
                "labeled_merged": self.labeled_merged}

    def load_rank_state_dict(self, state: dict) -> None:
        if self.acrst is not None:
            self.acrst.load_state_dict(state["acrst"])
            self.bank_fill_start = int(state.get("bank_fill_start", 0))
            self.labeled_merged = bool(state.get("labeled_merged", False))

    def load_branch_rank_state(self, state: dict | None, step: int) -> str:
        """A branch at `step` from a checkpoint with this rank's part `state` (None: it has none). Its
        CropBank is taken when it fits this run's (classes, capacity, crop size), else the banks start
        empty (`start_bank_at`); Pseudo Recall and the pseudo-label counts when their window fits. Returns
        what was taken, for the start-up line."""
        if self.acrst is None:
            return "no ACRST"
        saved, bank = (state or {}).get("acrst"), self.acrst.bank
        if saved is None or tuple(saved["bank"]["shape"]) != (bank.num_classes, bank.capacity, bank.crop_size):
            self.start_bank_at(step)
            return f"CropBank empty, the Labeled bank fills during steps {step + 1}-{step + self.labeled_bank_steps}"
        if saved["recall"]["history"].shape == self.acrst.recall.history.shape:
            self.load_rank_state_dict(state)
            return "CropBank and Pseudo Recall"
        self.acrst.bank.load_state_dict(saved["bank"])
        self.bank_fill_start = int(state.get("bank_fill_start", 0))
        self.labeled_merged = bool(state.get("labeled_merged", False))
        return "CropBank (Pseudo Recall starts empty: another acrst.pr_window)"

    def start_bank_at(self, step: int) -> None:
        """A branch from a checkpoint without a CropBank (or with one of another shape): the banks start
        empty and the Labeled bank fills during the `labeled_bank_steps` steps from `step`, as a new run's
        does from step 0."""
        self.bank_fill_start, self.labeled_merged = step, False
