"""The SSMLL stage of a run: train the classifier (`ssmll_runner.py`'s step on the shared Trainer and
hooks) into ssmll.output_dir (default RUN.OUTPUT_DIR/ssmll), or reuse the one a resumed run already
finished. `python -m acrst_fast.train_ssmll` runs it alone; `python -m acrst_fast.train` runs it first
when two-stage (or mining) filtering names no classifier.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from acrst_fast import dist
from acrst_fast.config import Config, ConfigError, check_paths, config_to_dict
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.data.coco import DataError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.build import build_ssmll_runner, checked_images, fetch_pretrained
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.hooks import CheckpointHook, EMAHook, EvalHook, LoggingHook, LRScheduleHook, MetricsWriter
from acrst_fast.engine.resume import restore
from acrst_fast.engine.launch import on_main, train_together
from acrst_fast.engine.ssmll_runner import eval_line, eval_scalars, evaluate, format_table
from acrst_fast.engine.trainer import Trainer
from acrst_fast.safe_io import atomic_write_text
from acrst_fast.ssmll.model import save_classifier

CLASSIFIER = "ssmll_teacher.pt"


def output_dir(cfg: Config) -> Path:
    return Path(cfg.ssmll.output_dir or Path(cfg.run.output_dir) / "ssmll")


def finished(cfg: Config) -> bool:
    """The stage's classifier is written and its newest checkpoint is at ssmll.total_steps."""
    out = output_dir(cfg)
    found = ckpt.list_checkpoints(out)
    return (out / CLASSIFIER).is_file() and bool(found) and found[-1][0] >= cfg.ssmll.total_steps


def with_classifier(cfg: Config, source: str, resume: bool, info: dist.DistInfo) -> Config:
    """`cfg` with ssmll.checkpoint set: as given; else (two-stage or mining filtering) the classifier of
    this run's SSMLL stage, trained now (resumed with --resume) or, when a resumed run finished it, reused."""
    if cfg.ssmll.filter == "single" or cfg.ssmll.checkpoint:
        return cfg
    if resume and finished(cfg):
        if info.is_main:
            print(f"[ssmll] stage done: {output_dir(cfg) / CLASSIFIER}", flush=True)
    else:
        train(cfg, source, resume and bool(ckpt.list_checkpoints(output_dir(cfg))), info)
    return dataclasses.replace(cfg, ssmll=dataclasses.replace(cfg.ssmll, checkpoint=str(output_dir(cfg) / CLASSIFIER)))


def _prepare(cfg: Config, source: str, resume: bool) -> Path:
    """Rank 0: generate data, claim the output folder, refuse to start over existing checkpoints."""
    prepare_data(cfg)
    out_dir = ckpt.claim_run_dir(output_dir(cfg), "ssmll.output_dir")
    ckpt.remove_stale_temporaries(out_dir)
    existing = ckpt.latest_checkpoint(out_dir)
    if existing is not None and not resume:
        raise ConfigError(f"{source}: {out_dir} already holds SSMLL checkpoints ({existing.name}); pass --resume "
                          "to continue, or set ssmll.output_dir")
    return out_dir


def _datasets(cfg: Config, source: str):
    data_cfg = resolved_data(cfg.data)
    check_paths(dataclasses.replace(cfg, data=data_cfg), source)
    datasets = checked_images(cfg, load_datasets(data_cfg))  # as the detector's start-up does
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
    out_dir = on_main(lambda: (_prepare(cfg, source, resume), fetch_pretrained(cfg, ssmll=True))[0])
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
        save_classifier(out_dir / CLASSIFIER, runner.classifier(final), m, datasets.categories.names)
        atomic_write_text(out_dir / "ssmll_metrics.json", json.dumps({"step": final, **metrics}, indent=1))
        echo(format_table(metrics))
        echo(f"[ssmll] classifier: {out_dir / CLASSIFIER} (set ssmll.checkpoint to it, ssmll.filter=two_stage)")
    dist.barrier()
    return metrics
