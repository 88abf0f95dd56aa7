"""Train the SSMLL multi-label classifier with its own Mean Teacher (paper: "Semi-supervised
Multi-label Learning"), for the detector's two-stage pseudo-label filtering.

    python -m acrst_fast.train_ssmll CONFIG [KEY=VALUE ...] [--resume]

Multi-process: `torchrun --nproc_per_node=N -m acrst_fast.train_ssmll CONFIG`, like the detector.
Uses the detector config's data (labeled, unlabeled, val) and its `ssmll` section; the step is
`engine/ssmll_runner.py`'s, driven by the detector's Trainer and hooks (LR, EMA, evaluation,
divergence guard, logging, checkpoint; SIGTERM checkpoints and exits 130). Adam, optional
AMP (solver.amp); `data.pipeline=dali` makes the training views with the detector's DALI
pipeline. Writes to ssmll.output_dir (default RUN.OUTPUT_DIR/ssmll): atomic, resumable
checkpoints, metrics.jsonl, ssmll_metrics.json (Table 9: image-level negative accuracy and recall
at each ssmll.eval_taus, on the validation split and, where the unlabeled split has hidden
ground truth, on it) and ssmll_teacher.pt, the file the detector's `ssmll.checkpoint` names.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from acrst_fast import dist
from acrst_fast.config import Config, ConfigError, check_paths, config_argparser, config_to_dict, load_config
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.data.coco import DataError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.build import build_ssmll_runner
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.hooks import CheckpointHook, EMAHook, EvalHook, LoggingHook, LRScheduleHook, MetricsWriter, restore
from acrst_fast.engine.launch import exit_code, on_main, train_together
from acrst_fast.engine.ssmll_runner import eval_line, eval_scalars, evaluate, format_table
from acrst_fast.engine.trainer import Trainer
from acrst_fast.safe_io import atomic_write_text
from acrst_fast.ssmll.model import save_classifier


def _prepare(cfg: Config, source: str, resume: bool) -> Path:
    """Rank 0: generate data, claim the output folder, refuse to start over existing checkpoints."""
    prepare_data(cfg)
    out_dir = ckpt.claim_run_dir(cfg.ssmll.output_dir or Path(cfg.run.output_dir) / "ssmll", "ssmll.output_dir")
    ckpt.remove_stale_temporaries(out_dir)
    existing = ckpt.latest_checkpoint(out_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{source}: {out_dir} already holds SSMLL checkpoints ({existing.name}); pass --resume "
                          "to continue, or set ssmll.output_dir")
    return out_dir


def _datasets(cfg: Config, source: str):
    data_cfg = resolved_data(cfg.data)
    check_paths(dataclasses.replace(cfg, data=data_cfg), source)
    datasets = load_datasets(data_cfg)
    if not datasets.labeled:
        raise DataError(f"{data_cfg.train_json}: no labeled images")
    if cfg.ssmll.total_steps > cfg.ssmll.pretrain_steps and not datasets.unlabeled:
        raise DataError(f"{data_cfg.unlabeled_json or data_cfg.unlabeled_images}: no unlabeled images")
    return datasets


def _hooks(cfg: Config, runner, loaders: dict, out_dir: Path, info: dist.DistInfo, writer: MetricsWriter,
           guard: DivergenceGuard, echo) -> list:
    m = cfg.ssmll
    return [LRScheduleHook(runner.optimizer, lambda step: m.lr), EMAHook(runner),
            EvalHook(runner, lambda model: evaluate(runner, model, loaders, m.eval_taus), writer, m.eval_period,
                     m.total_steps, teacher=True, student=False, echo=echo, scalars=eval_scalars, line=eval_line),
            guard, LoggingHook(writer, cfg.run.log_period, m.total_steps, cfg.run.progress_bar),
            CheckpointHook(out_dir, m.checkpoint_period, cfg.run.keep_checkpoints, m.total_steps, info.rank,
                           config_to_dict(cfg))]


def train(cfg: Config, source: str, resume: bool, info: dist.DistInfo) -> dict:
    """Train the classifier per `cfg`; returns the final Table-9 metrics (the same on every rank)."""
    echo = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    out_dir = on_main(lambda: _prepare(cfg, source, resume))
    datasets = _datasets(cfg, source)
    m = cfg.ssmll
    runner, loaders = build_ssmll_runner(cfg, datasets, info, source)
    path, state = None, None
    if resume and ckpt.latest_checkpoint(out_dir) is not None:
        path, state = ckpt.load_newest_readable(out_dir, warn=echo)
    writer = MetricsWriter(out_dir, enabled=info.is_main, start_step=int(state["step"]) if state else 0)
    guard = DivergenceGuard(out_dir, cfg.solver.divergence_check_steps, cfg.solver.divergence_factor, info.is_main)
    trainer = Trainer(runner, _hooks(cfg, runner, loaders, out_dir, info, writer, guard, echo), 0, m.total_steps)
    if state is not None:
        echo(f"[resume] {path} (step {restore(trainer, path, state, info.rank, config_to_dict(cfg))})")
    echo(f"[ssmll] {len(datasets.labeled)} labeled, {len(datasets.unlabeled)} unlabeled images, "
         f"{datasets.categories.num_classes} classes; {m.backbone} at {m.input_size}px, steps "
         f"{trainer.step}..{m.total_steps} (pre-training {m.pretrain_steps}); world size {info.world}, device "
         f"{info.device}, output {out_dir}")
    train_together(trainer, writer.close, lambda: f"lower the learning rate (e.g. ssmll.lr={m.lr / 10:g}) and "
                   f"continue with --resume, or start a new ssmll.output_dir")
    final = max(trainer.step, m.total_steps)
    metrics = {k: v for k, v in trainer.storage["eval_history"][-1].items() if k in loaders}
    if info.is_main:
        save_classifier(out_dir / "ssmll_teacher.pt", runner.classifier(final), m, datasets.categories.names)
        atomic_write_text(out_dir / "ssmll_metrics.json", json.dumps({"step": final, **metrics}, indent=1))
        echo(format_table(metrics))
        echo(f"[ssmll] classifier: {out_dir / 'ssmll_teacher.pt'} (set ssmll.checkpoint to it, ssmll.filter=two_stage)")
    dist.barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = config_argparser("python -m acrst_fast.train_ssmll", __doc__, example="ssmll.total_steps=100")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in ssmll.output_dir")
    args = ap.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.config, args.overrides)
        info = dist.init_distributed(cfg.run.device)
        if info.device.type == "cpu" and info.world > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // info.world))
        train(cfg, args.config, args.resume, info)

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
