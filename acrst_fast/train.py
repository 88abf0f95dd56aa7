"""Train a detector with Mean Teacher (and ACRST): `python -m acrst_fast.train CONFIG [--resume] [KEY=VALUE ...]`.

With two-stage (or mining) pseudo-label filtering and no `ssmll.checkpoint`, the run first trains
its SSMLL stage into RUN/ssmll (`engine/ssmll_stage.py`; resumed with --resume), then the detector.

Multi-process: `torchrun --nproc_per_node=N -m acrst_fast.train CONFIG` (NCCL on GPUs, gloo on CPU).
The run folder (`run.output_dir`) receives config.yaml (resolved), metrics.jsonl, tensorboard/,
checkpoints ckpt_*.pt and final_metrics.json. A run folder that already holds checkpoints is
only continued with --resume, never overwritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from acrst_fast import dist
from acrst_fast.config import (
    Config, ConfigError, check_paths, config_argparser, config_to_dict, dump_config, load_config,
)
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.data.check import drop_bad_images, find_header_problems
from acrst_fast.data.coco import DataError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.build import build_runner, class_counts, fetch_pretrained
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.hooks import (
    CheckpointHook, DiagnosticsHook, EMAHook, EvalHook, LoggingHook, LRScheduleHook, MetricsWriter, lr_at, restore,
)
from acrst_fast.engine.launch import exit_code, on_main, train_together
from acrst_fast.engine.ssmll_stage import with_classifier
from acrst_fast.engine.trainer import Trainer
from acrst_fast.evaluation.coco_eval import Evaluator
from acrst_fast.safe_io import atomic_write_text

log = logging.getLogger("acrst_fast")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = config_argparser("python -m acrst_fast.train", __doc__)
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest readable checkpoint in run.output_dir")
    ap.add_argument("--resume-from", metavar="CKPT", default=None,
                    help="continue from this checkpoint (e.g. the last good one named after a divergence); "
                         "later checkpoints of the run folder are moved to RUN_DIR/diverged/")
    return ap.parse_intermixed_args(argv)  # CONFIG --resume KEY=VALUE works too


def _prepare_run_dir(cfg: Config, source: str, resume: bool, resume_from: str | None) -> None:
    """Rank 0: claim the run folder, refuse to start over existing checkpoints, set a resumed-from
    checkpoint's abandoned successors aside, write config.yaml, generate data. Nothing it did not
    write is ever touched."""
    run_dir = ckpt.claim_run_dir(cfg.run.output_dir)
    ckpt.remove_stale_temporaries(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if found and not (resume or resume_from):
        raise ConfigError(f"{source}: key 'run.output_dir': {run_dir} already holds checkpoints ({found[-1][1].name}); "
                          "pass --resume to continue it, or choose another run.output_dir")
    if resume_from:
        start = int(ckpt.load(resume_from)["step"])
        later = [(s, p) for s, p in found if s > start and p.parent.resolve() == Path(resume_from).parent.resolve()]
        if later:  # the branch that diverged: kept aside, not deleted, so the newest checkpoint is the resumed one
            aside = run_dir / "diverged"
            aside.mkdir(exist_ok=True)
            for s, p in later:
                for f in [p, *run_dir.glob(f"ckpt_{s:08d}.rank*.pt")]:
                    f.replace(aside / f.name)
    dump_config(cfg, run_dir / "config.yaml")
    prepare_data(cfg)


def _checkpoint_to_resume(run_dir: Path, resume: bool, resume_from: str | None, echo) -> tuple[Path | None, dict | None]:
    if resume_from:
        return Path(resume_from), ckpt.load(resume_from)
    if resume:
        found = ckpt.load_newest_readable(run_dir, warn=echo)
        if found is not None:
            return found
    return None, None


def _load_data(cfg: Config, source: str):
    """Resolved data config and validated datasets; every image header is checked before training
    (on rank 0, the verdict shared), so a bad file stops the run, or is dropped with `skip`, now."""
    data_cfg = resolved_data(cfg.data)
    check_paths(dataclasses.replace(cfg, data=data_cfg), source)
    datasets = load_datasets(data_cfg)
    problems = on_main(lambda: find_header_problems(datasets, cfg.data.bad_images, max(4, cfg.data.num_workers * 2)))
    datasets, dropped = drop_bad_images(datasets, problems)
    if dropped and dist.rank() == 0:
        print(f"[data] data.bad_images=skip: {len(dropped)} images dropped before training; first: {dropped[0]}",
              file=sys.stderr, flush=True)
    if not datasets.labeled:
        raise DataError(f"{data_cfg.train_json}: no labeled images")
    if not datasets.val:
        raise DataError(f"{data_cfg.val_json}: no validation images")
    if cfg.solver.total_steps > cfg.solver.pretrain_steps and not datasets.unlabeled:
        raise DataError(f"{data_cfg.unlabeled_json or data_cfg.unlabeled_images}: no unlabeled images "
                        "for mutual learning")
    return data_cfg, datasets


def _write_dataset_stats(run_dir: Path, datasets, labeled_counts: torch.Tensor) -> None:
    """What the report needs when the dataset is not at hand (rank 0)."""
    atomic_write_text(run_dir / "dataset_stats.json", json.dumps({
        "classes": list(datasets.categories.names), "labeled_class_counts": [int(c) for c in labeled_counts],
        "num_labeled": len(datasets.labeled), "num_unlabeled": len(datasets.unlabeled),
        "num_val": len(datasets.val)}, indent=1))


def _hooks(cfg: Config, runner, stage, data_cfg, datasets, info: dist.DistInfo, writer: MetricsWriter,
           guard: DivergenceGuard, echo) -> list:
    """LR, EMA, evaluation, divergence guard, ACRST diagnostics, logging, checkpoint, in that order: the
    log line of a step is on disk before its checkpoint, so a kill between them resumes from the
    previous checkpoint and drops the newer lines (log and checkpoints always agree)."""
    run_dir, total = Path(cfg.run.output_dir), cfg.solver.total_steps
    evaluator = Evaluator(data_cfg.val_json, datasets.categories)
    refresh = (lambda: refresh_report(run_dir)) if (cfg.eval.report and info.is_main) else None
    hooks = [LRScheduleHook(runner.optimizer, lambda step: lr_at(step, cfg.solver)), EMAHook(runner),
             EvalHook(runner, lambda model: evaluator(model, stage.val(), info.device), writer, cfg.eval.period, total,
                      cfg.eval.teacher, cfg.eval.student, echo, after_eval=refresh), guard]
    if runner.acrst is not None:
        hooks.append(DiagnosticsHook(runner.diagnostics, cfg.run.log_period, total))
    return hooks + [LoggingHook(writer, cfg.run.log_period, total, cfg.run.progress_bar),
                    CheckpointHook(run_dir, cfg.run.checkpoint_period, cfg.run.keep_checkpoints, total, info.rank,
                                   config_to_dict(cfg))]


def run(cfg: Config, source: str, resume: bool, info: dist.DistInfo, resume_from: str | None = None) -> dict:
    """Train per `cfg`; returns the final summary (same on every rank)."""
    run_dir = Path(cfg.run.output_dir)
    echo = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    on_main(lambda: (_prepare_run_dir(cfg, source, resume, resume_from), fetch_pretrained(cfg)))
    cfg = with_classifier(cfg, source, resume or bool(resume_from), info)  # the SSMLL stage, when it is needed
    data_cfg, datasets = _load_data(cfg, source)
    echo(f"[data] {len(datasets.labeled)} labeled, {len(datasets.unlabeled)} unlabeled, {len(datasets.val)} val "
         f"images; {datasets.categories.num_classes} classes; world size {info.world}, device {info.device}")
    labeled_counts = class_counts(datasets.labeled, datasets.categories.num_classes)
    if info.is_main:
        _write_dataset_stats(run_dir, datasets, labeled_counts)
    runner, stage = build_runner(cfg, datasets, info, source, labeled_counts)
    if runner.acrst is not None:
        echo(f"[acrst] CropBank {runner.acrst.bank.nbytes / 2**20:.1f} MiB on {info.device}; banks {cfg.acrst.banks}, "
             f"N in {cfg.acrst.n_range}, beta {cfg.acrst.beta}, selective supervision "
             f"{'on' if cfg.acrst.selective_supervision else 'off'}")
    guard = DivergenceGuard(run_dir, cfg.solver.divergence_check_steps, cfg.solver.divergence_factor, info.is_main)
    path, state = _checkpoint_to_resume(run_dir, resume, resume_from, echo)
    writer = MetricsWriter(run_dir, enabled=info.is_main, start_step=int(state["step"]) if state else 0)
    trainer = Trainer(runner, _hooks(cfg, runner, stage, data_cfg, datasets, info, writer, guard, echo), 0,
                      cfg.solver.total_steps)
    if state is not None:
        echo(f"[resume] {path} (step {restore(trainer, path, state, info.rank, config_to_dict(cfg))})")
    train_together(trainer, writer.close, lambda: guard.advice(cfg.solver.lr))
    summary = summarize(trainer.storage["eval_history"], datasets.categories.names)
    if info.is_main:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(summary, indent=2))
        if cfg.eval.report:
            refresh_report(run_dir)  # again, now with final_metrics.json
        echo(format_summary(summary, run_dir))
    dist.barrier()  # ranks leave together: no rank tears down the process group while rank 0 still writes
    return summary


def refresh_report(run_dir: Path) -> None:
    """Rewrite the run report; a failure is reported and training goes on."""
    from acrst_fast.report import write_report

    try:
        write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the report must never stop training
        log.warning("run report not refreshed: %s: %s", type(exc).__name__, exc)


def summarize(history: list[dict], class_names: tuple[str, ...]) -> dict:
    """Supervised baseline (student at the end of pre-training) and final teacher/student metrics."""
    def last(pred):
        found = [h for h in history if pred(h)]
        return found[-1] if found else None

    keys = ("step", "AP", "AP50", "voc_AP50", "AP_per_class")
    pick = lambda h: {k: h[k] for k in keys} if h else None  # noqa: E731
    return {
        "supervised": pick(last(lambda h: h["stage"] == "supervised" and h["model"] == "student")),
        "teacher": pick(last(lambda h: h["stage"] == "mean_teacher" and h["model"] == "teacher")),
        "student": pick(last(lambda h: h["stage"] == "mean_teacher" and h["model"] == "student")),
        "classes": list(class_names),
    }


def format_summary(summary: dict, run_dir: Path) -> str:
    lines = ["", "=" * 64, f"{'model':<28}{'step':>8}{'AP':>9}{'AP50':>9}{'VOC AP50':>10}", "-" * 64]
    for name, label in (("supervised", "supervised (pre-training)"), ("teacher", "mean teacher: teacher"),
                        ("student", "mean teacher: student")):
        m = summary[name]
        if m:
            lines.append(f"{label:<28}{m['step']:>8}{m['AP']:>9.2f}{m['AP50']:>9.2f}{m['voc_AP50']:>10.2f}")
    lines += ["=" * 64, f"run folder: {run_dir}  (metrics.jsonl, tensorboard/, final_metrics.json)"]
    if (run_dir / "report" / "report.md").is_file():
        lines.append(f"report: {run_dir / 'report' / 'report.md'}  (refresh: python -m acrst_fast.report {run_dir})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body():
        cfg = load_config(args.config, args.overrides)
        info = dist.init_distributed(cfg.run.device)
        if info.device.type == "cpu" and info.world > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // info.world))
        run(cfg, args.config, args.resume, info, args.resume_from)

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
