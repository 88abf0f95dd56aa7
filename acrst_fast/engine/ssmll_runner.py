"""The SSMLL classifier's Mean Teacher as a runner of the shared `Trainer` (paper: "Semi-supervised
Multi-label Learning"): the same hooks, checkpoints, resume, stop and `dist.py` as the detector.

Pre-training (step < ssmll.pretrain_steps): focal BCE on the labeled images' strong views against
their image labels (from the boxes). Mutual learning: the EMA teacher (`EmaTeacher`, copied from
the student when mutual learning starts) labels the weak view of unlabeled images (probability >=
ssmll.pseudo_threshold -> 1) and the student learns them on the strong view too:

    L = FL(student(labeled strong), labels) + lambda_unsup * FL(student(unlabeled strong), teacher targets)
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from acrst_fast import dist
from acrst_fast import metric_names as M
from acrst_fast.config import Config
from acrst_fast.engine.amp import Precision
from acrst_fast.engine.ema import EmaTeacher
from acrst_fast.engine.outputs import PHASE_MUTUAL, Deferred, StepOutput
from acrst_fast.engine.runner import StudentTeacherRunner
from acrst_fast.ssmll.losses import focal_bce
from acrst_fast.ssmll.metrics import negative_metrics
from acrst_fast.ssmll.model import build_ssmll, known_label_states, preprocess
from acrst_fast.streams import Stream, generator, rank_global_seed

# batches(views: "labeled" | "unlabeled", first step, end step) -> iterator of this rank's
# {"weak", "strong": Tensor[B, 3, S, S] in [0, 1], "labels": Tensor[B, K]}
Batches = Callable[[str, int, int], Iterator[dict]]


class SSMLLForward(nn.Module):
    """The module DDP wraps: the student on the labeled and (in mutual learning) the unlabeled strong
    views, in one DDP forward. Inputs normalised Tensor[B, 3, S, S]; returns logits Tensor[B, K] each."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, labeled: torch.Tensor, unlabeled: torch.Tensor | None = None,
                states: torch.Tensor | None = None):
        """states: the labeled images' label states (label-mask training); unlabeled images: all unknown."""
        return self.net(labeled, states), self.net(unlabeled) if unlabeled is not None else None


class SSMLLRunner(StudentTeacherRunner):
    """Student, EMA teacher, Adam and the step of the classifier's Mean Teacher, on one rank."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device, batches: Batches, rank: int = 0,
                 world: int = 1, pos_weight: torch.Tensor | None = None):
        """pos_weight: Tensor[K], the weight of each class's positive term (`class_weights`; None: 1)."""
        self.cfg, self.m, self.device, self.batches = cfg, cfg.ssmll, device, batches
        self.rank, self.world = rank, world
        self.pos_weight = pos_weight.to(device) if pos_weight is not None else None
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        self.student = build_ssmll(self.m, num_classes).to(device)
        if rank:  # dropout draws of their own on the other ranks (rank 0 continues the build's stream)
            torch.manual_seed(rank_global_seed(cfg.run.seed, rank))
        self.ema = EmaTeacher(self.student, self.m.ema_decay)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.m.lr)
        self.precision = Precision(cfg.solver.amp, device)
        self.forward: nn.Module = SSMLLForward(self.student)
        if world > 1:
            self.forward = DistributedDataParallel(self.forward, process_group=dist.device_group(device),
                                                   device_ids=[device.index] if device.type == "cuda" else None)
        self.pretrain_steps, self.total_steps = self.m.pretrain_steps, self.m.total_steps
        self._labeled: Iterator[dict] | None = None
        self._unlabeled: Iterator[dict] | None = None

    def start(self, step: int) -> None:
        """Open the data streams at the positions of `step`."""
        self._labeled = self.batches("labeled", step, self.total_steps)
        first_mutual = max(step, self.pretrain_steps) - self.pretrain_steps
        self._unlabeled = (self.batches("unlabeled", first_mutual, self.total_steps - self.pretrain_steps)
                           if self.total_steps > self.pretrain_steps else None)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images.to(self.device), self.m.input_size)

    def run_step(self, step: int) -> StepOutput:
        """One step; the unlabeled part only in mutual learning."""
        if self._labeled is None:
            self.start(step)
        lab = next(self._labeled)
        unl = next(self._unlabeled) if self.phase(step) == PHASE_MUTUAL else None
        targets = self._teacher_targets(step, unl) if unl is not None else None
        labels = lab["labels"].to(self.device)
        states, unknown = known_label_states(lab["labels"], self.m.label_mask, generator(
            self.cfg.run.seed, Stream.SSMLL_LABEL_MASK, step * self.world + self.rank))
        self.student.train()
        with self.precision.autocast():
            lab_logits, unl_logits = self.forward(self._input(lab["strong"]),
                                                  self._input(unl["strong"]) if unl is not None else None,
                                                  states.to(self.device))
        loss_sup = focal_bce(lab_logits.float(), labels, self.m.focal_gamma, unknown.to(self.device), self.pos_weight)
        total, unsup, deferred = loss_sup, {}, []
        if unl is not None:
            loss_unsup = focal_bce(unl_logits.float(), targets, self.m.focal_gamma, pos_weight=self.pos_weight)
            total = total + self.m.lambda_unsup * loss_unsup
            unsup = {"loss_focal": loss_unsup.detach()}
            positives = targets.sum(1).mean()
            deferred.append(Deferred((positives,), lambda host: {M.ssmll_key("positives_per_image"): float(host[0])}))
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(total)
        self.precision.step(self.optimizer)
        return StepOutput(phase=self.phase(step), sup={"loss_focal": loss_sup.detach()}, unsup=unsup,
                          total=total.detach(), images=len(lab["strong"]) + (len(unl["strong"]) if unl else 0),
                          deferred=deferred)

    @torch.no_grad()
    def _teacher_targets(self, step: int, unl: dict) -> torch.Tensor:
        """Image-level pseudo-labels Tensor[B, K] in {0, 1}: teacher probability >= pseudo_threshold."""
        if step == self.pretrain_steps:
            self.ema.reset(self.student)
        with self.precision.autocast():
            probs = torch.sigmoid(self.teacher(self._input(unl["weak"])).float())
        return (probs >= self.m.pseudo_threshold).float()

    def classifier(self, step: int) -> nn.Module:
        """The network to use and save: the teacher once mutual learning has started."""
        return self.teacher if step > self.pretrain_steps else self.student

    @torch.no_grad()
    def probabilities(self, model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's shard of the split through `model`, gathered: (Tensor[N, K] probabilities,
        Tensor[N, K] labels) on the host, the same on every rank."""
        was_training = model.training
        model.eval()
        probs, labels = [], []
        for batch in loader:
            with self.precision.autocast():
                probs.append(torch.sigmoid(model(self._input(batch["weak"])).float()).cpu())
            labels.append(batch["labels"])
        model.train(was_training)
        k = self.student.num_classes
        parts = dist.all_gather_object((torch.cat(probs) if probs else torch.zeros(0, k),
                                        torch.cat(labels) if labels else torch.zeros(0, k)))
        return torch.cat([p for p, _ in parts]), torch.cat([lab for _, lab in parts])


def class_weights(labels: torch.Tensor, beta: float) -> torch.Tensor | None:
    """SSMLL's class rebalancing (the paper extends ACRST to SSMLL): the weight of class k's positive term,
    (f_k)^-beta normalised to mean 1, f_k the fraction of labeled images where class k is present (at
    least 1 / N). labels: Tensor[N, K] multi-hot. None when beta is 0. ACRST rebalances the detector by
    pasting rare-class instances; the classifier sees whole images with image-level labels, so it is
    rebalanced in its loss instead, with the same exponent."""
    if beta == 0:
        return None
    n = max(1, len(labels))
    freq = labels.float().mean(0).clamp(min=1.0 / n) if len(labels) else torch.ones(labels.shape[1])
    w = freq.pow(-beta)
    return w / w.mean()


def evaluate(runner: SSMLLRunner, model: nn.Module, loaders: dict, taus: list[float]) -> dict:
    """Table 9 on each split: negative accuracy / recall at each tau, and positive ones at 0.5."""
    out = {}
    for split, loader in loaders.items():
        probs, labels = runner.probabilities(model, loader)
        rows = {f"{tau:g}": negative_metrics(probs, labels, tau) for tau in taus}
        pos, present = probs >= 0.5, labels >= 0.5
        rows["positive@0.5"] = {"accuracy": float((pos & present).sum() / max(1, pos.sum())),
                                "recall": float((pos & present).sum() / max(1, present.sum()))}
        out[split] = rows
    return out


def eval_scalars(metrics: dict) -> dict[str, float]:
    """TensorBoard values of an SSMLL evaluation: negative accuracy and recall per split and tau."""
    return {f"{split}/{key}@{tau}": r[key] for split, rows in metrics.items() for tau, r in rows.items()
            if not tau.startswith("positive") for key in ("neg_accuracy", "neg_recall")}


def eval_line(metrics: dict) -> str:
    """One console line: each split's negative accuracy / recall at each tau."""
    return "; ".join(f"{split}: " + ", ".join(f"tau {tau} neg acc {r['neg_accuracy']:.3f} rec {r['neg_recall']:.3f}"
                                            for tau, r in rows.items() if not tau.startswith("positive"))
                     for split, rows in metrics.items())


def format_table(metrics: dict) -> str:
    lines = ["SSMLL image-level negative pseudo-labels (Table 9)",
             f"{'split':>10} {'tau_ml':>7} {'neg accuracy':>13} {'neg recall':>11}"]
    for split, rows in metrics.items():
        for tau, r in rows.items():
            if tau.startswith("positive"):
                continue
            lines.append(f"{split:>10} {tau:>7} {r['neg_accuracy']:13.4f} {r['neg_recall']:11.4f}")
        p = rows["positive@0.5"]
        lines.append(f"{split:>10} {'(pos .5)':>7} {p['accuracy']:13.4f} {p['recall']:11.4f}  <- positive labels")
    return "\n".join(lines)
