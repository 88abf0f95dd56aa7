"""Train the SSMLL multi-label classifier with its own Mean Teacher (paper: "Semi-supervised
Multi-label Learning"), for the detector's two-stage pseudo-label filtering.

    python -m acrst_fast.train_ssmll CONFIG [KEY=VALUE ...] [--resume]

Uses the detector config's data (labeled, unlabeled, val) and its `ssmll` section. Pre-training
(step < ssmll.pretrain_steps): focal BCE on labeled images against their image labels (from
the boxes). Then the EMA teacher labels the weak view of unlabeled images (probability >=
ssmll.pseudo_threshold -> 1) and the student learns them on the strong view too. Adam, optional
AMP (solver.amp); `data.pipeline=dali` makes the training views with the detector's DALI
pipeline. Writes to ssmll.output_dir (default RUN.OUTPUT_DIR/ssmll): atomic, resumable
checkpoints, metrics.jsonl, ssmll_metrics.json (Table 9: image-level negative accuracy and recall
at each ssmll.eval_taus, on the validation split and, where the unlabeled split has hidden
ground truth, on it) and ssmll_teacher.pt, the file the detector's `ssmll.checkpoint` names.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from acrst_fast.config import Config, ConfigError, check_paths, config_argparser, load_config
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.data.coco import DataError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.amp import Precision
from acrst_fast.engine.ema import ema_update
from acrst_fast.errors import UserError, report_error
from acrst_fast.safe_io import atomic_write_text
from acrst_fast.ssmll.data import SquareViews, dali_step_batches, eval_loader, step_loader
from acrst_fast.ssmll.losses import focal_bce
from acrst_fast.ssmll.metrics import negative_metrics
from acrst_fast.ssmll.model import build_ssmll, preprocess, save_classifier

STREAM_LABELED, STREAM_UNLABELED = 11, 12


class SSMLLTrainer:
    """Student, EMA teacher, Adam and the step function of the classifier's Mean Teacher."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device):
        self.cfg, self.m, self.device = cfg, cfg.ssmll, device
        torch.manual_seed(cfg.run.seed)
        self.student = build_ssmll(self.m, num_classes).to(device)
        self.teacher = copy.deepcopy(self.student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=self.m.lr)
        self.precision = Precision(cfg.solver.amp, device)

    def _logits(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return model(preprocess(images.to(self.device), self.m.input_size)).float()

    def step(self, step: int, lab: dict, unl: dict | None) -> dict[str, float]:
        """One step; `unl` is None during pre-training. Returns the losses and pseudo-label counts."""
        if step == self.m.pretrain_steps:
            self.teacher.load_state_dict(self.student.state_dict())
        self.student.train()
        loss_sup = focal_bce(self._logits(self.student, lab["strong"]), lab["labels"].to(self.device), self.m.focal_gamma)
        loss, out = loss_sup, {"loss_sup": float(loss_sup.detach())}
        if unl is not None:
            with torch.no_grad():
                probs = torch.sigmoid(self._logits(self.teacher, unl["weak"]))
            targets = (probs >= self.m.pseudo_threshold).float()
            loss_unsup = focal_bce(self._logits(self.student, unl["strong"]), targets, self.m.focal_gamma)
            loss = loss + self.m.lambda_unsup * loss_unsup
            out |= {"loss_unsup": float(loss_unsup.detach()), "positives_per_image": float(targets.sum(1).mean())}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SSMLL step {step}: loss is {float(loss)}")
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer)
        if unl is not None:
            ema_update(self.teacher, self.student, self.m.ema_decay)
        out["loss"] = float(loss.detach())
        return out

    def classifier(self, step: int) -> torch.nn.Module:
        """The network to use and save: the teacher once mutual learning has started."""
        return self.teacher if step > self.m.pretrain_steps else self.student

    @torch.no_grad()
    def probabilities(self, model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        probs, labels = [], []
        for batch in loader:
            probs.append(torch.sigmoid(self._logits(model, batch["weak"])).cpu())
            labels.append(batch["labels"])
        return torch.cat(probs), torch.cat(labels)

    def state_dict(self, step: int) -> dict:
        return {"step": step, "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "grad_scaler": self.precision.state_dict(),
                "rng": ckpt.rng_state(), "ssmll": dataclasses.asdict(self.m)}

    def load_state_dict(self, state: dict) -> int:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        ckpt.set_rng_state(state["rng"])  # dropout draws continue as if never stopped
        return int(state["step"])


def evaluate(trainer: SSMLLTrainer, step: int, loaders: dict) -> dict:
    """Table 9 on each split: negative accuracy / recall at each tau, and positive ones at 0.5."""
    model = trainer.classifier(step)
    out = {}
    for split, loader in loaders.items():
        probs, labels = trainer.probabilities(model, loader)
        rows = {f"{tau:g}": negative_metrics(probs, labels, tau) for tau in trainer.m.eval_taus}
        pos = probs >= 0.5
        present = labels >= 0.5
        rows["positive@0.5"] = {"accuracy": float((pos & present).sum() / max(1, pos.sum())),
                                "recall": float((pos & present).sum() / max(1, present.sum()))}
        out[split] = rows
    return out


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


def train(cfg: Config, source: str, resume: bool) -> dict:
    prepare_data(cfg)
    data_cfg = resolved_data(cfg.data)
    check_paths(dataclasses.replace(cfg, data=data_cfg), source)
    datasets = load_datasets(data_cfg)
    m, k = cfg.ssmll, datasets.categories.num_classes
    if not datasets.labeled:
        raise DataError(f"{data_cfg.train_json}: no labeled images")
    if m.total_steps > m.pretrain_steps and not datasets.unlabeled:
        raise DataError(f"{data_cfg.unlabeled_json or data_cfg.unlabeled_images}: no unlabeled images")
    out_dir = ckpt.claim_run_dir(m.output_dir or Path(cfg.run.output_dir) / "ssmll", "ssmll.output_dir")
    device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    trainer = SSMLLTrainer(cfg, k, device)
    start = 0
    existing = ckpt.latest_checkpoint(out_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{source}: {out_dir} already holds SSMLL checkpoints ({existing.name}); pass --resume "
                          "to continue, or set ssmll.output_dir")
    if existing is not None:
        existing, state = ckpt.load_newest_readable(out_dir, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
        start = trainer.load_state_dict(state)
        print(f"[resume] {existing} (step {start})", flush=True)
    workers = cfg.data.num_workers
    lab_views = SquareViews(datasets.labeled, k, m.input_size, cfg.augment, cfg.run.seed, STREAM_LABELED)
    unl_views = SquareViews(datasets.unlabeled, k, m.input_size, cfg.augment, cfg.run.seed, STREAM_UNLABELED)
    first_mutual = max(start, m.pretrain_steps)
    device_id = (device.index or 0) if device.type == "cuda" else None

    def batches(views: SquareViews, batch: int, first: int, end: int):
        if cfg.data.pipeline == "dali":  # the detector's DALI pipeline, at input_size x input_size
            return dali_step_batches(views, batch, first, end, device_id, max(1, workers), cfg.data.bad_images)
        return iter(step_loader(views, batch, first, end, workers))

    labeled = batches(lab_views, m.batch_labeled, start, m.total_steps)
    unlabeled = batches(unl_views, m.batch_unlabeled, first_mutual - m.pretrain_steps,
                        m.total_steps - m.pretrain_steps) if datasets.unlabeled else None
    eval_sets = {"val": datasets.val} | ({"unlabeled": datasets.unlabeled}
                                         if any(len(r.labels) for r in datasets.unlabeled) else {})
    loaders = {s: eval_loader(r, k, m.input_size, cfg.augment, m.batch_labeled, workers) for s, r in eval_sets.items()}
    print(f"[ssmll] {len(datasets.labeled)} labeled, {len(datasets.unlabeled)} unlabeled images, {k} classes; "
          f"{m.backbone} at {m.input_size}px, steps {start}..{m.total_steps} (pre-training {m.pretrain_steps}), "
          f"device {device}, output {out_dir}", flush=True)
    log = (out_dir / "metrics.jsonl").open("a")
    t0 = time.perf_counter()
    for step in range(start, m.total_steps):
        unl = next(unlabeled) if step >= m.pretrain_steps else None
        out = trainer.step(step, next(labeled), unl)
        done = step + 1
        if done % cfg.run.log_period == 0 or done == m.total_steps:
            rec = {"step": done, **out, "seconds": time.perf_counter() - t0}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"[ssmll] step {done}/{m.total_steps} loss {out['loss']:.4f}", flush=True)
        if m.eval_period and done % m.eval_period == 0 and done != m.total_steps:
            log.write(json.dumps({"step": done, "eval": evaluate(trainer, done, loaders)}) + "\n")
        if done % m.checkpoint_period == 0 or done == m.total_steps:
            ckpt.atomic_save(trainer.state_dict(done), ckpt.checkpoint_path(out_dir, done))
            ckpt.prune(out_dir, cfg.run.keep_checkpoints)
    log.close()
    final = max(start, m.total_steps)
    metrics = evaluate(trainer, final, loaders)
    save_classifier(out_dir / "ssmll_teacher.pt", trainer.classifier(final), m, datasets.categories.names)
    atomic_write_text(out_dir / "ssmll_metrics.json", json.dumps({"step": final, **metrics}, indent=1))
    print(format_table(metrics), flush=True)
    print(f"[ssmll] classifier: {out_dir / 'ssmll_teacher.pt'} (set ssmll.checkpoint to it, ssmll.filter=two_stage)",
          flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = config_argparser("python -m acrst_fast.train_ssmll", __doc__, example="ssmll.total_steps=100")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in ssmll.output_dir")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, args.config, args.resume)
        return 0
    except UserError as exc:
        return report_error(exc)
    except FloatingPointError as exc:
        print(f"error: SSMLL training diverged: {exc}; lower ssmll.lr and continue with --resume", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
