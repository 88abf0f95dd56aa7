"""Train a detector with Mean Teacher: `python -m acrst_fast.train CONFIG [--resume] [KEY=VALUE ...]`.

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
import signal
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
from acrst_fast.engine.build import build_runner, class_counts
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.hooks import (
    CheckpointHook, EMAHook, EvalHook, LoggingHook, LRScheduleHook, MetricsWriter, restore,
)
from acrst_fast.engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted
from acrst_fast.errors import UserError, report_error
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


class Diverged(Exception):
    """Training stopped on a non-finite loss; the message says which checkpoint to resume and how."""


def _on_main(fn):
    """Run `fn` on rank 0 only; its result, or its UserError, reaches every rank (no rank is left waiting)."""
    result, err = None, None
    if dist.rank() == 0:
        try:
            result = fn()
        except UserError as exc:
            err = exc
    result, err = dist.broadcast_from_main((result, err))
    if err is not None:
        raise err
    return result


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
    problems = _on_main(lambda: find_header_problems(datasets, cfg.data.bad_images, max(4, cfg.data.num_workers * 2)))
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


def run(cfg: Config, source: str, resume: bool, info: dist.DistInfo, resume_from: str | None = None) -> dict:
    """Train per `cfg`; returns the final summary (same on every rank)."""
    run_dir = Path(cfg.run.output_dir)
    echo = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    _on_main(lambda: _prepare_run_dir(cfg, source, resume, resume_from))
    data_cfg, datasets = _load_data(cfg, source)
    echo(f"[data] {len(datasets.labeled)} labeled, {len(datasets.unlabeled)} unlabeled, {len(datasets.val)} val "
         f"images; {datasets.categories.num_classes} classes; world size {info.world}, device {info.device}")

    labeled_counts = class_counts(datasets.labeled, datasets.categories.num_classes)
    if info.is_main:  # what the report needs when the dataset is not at hand
        atomic_write_text(run_dir / "dataset_stats.json", json.dumps({
            "classes": list(datasets.categories.names), "labeled_class_counts": [int(c) for c in labeled_counts],
            "num_labeled": len(datasets.labeled), "num_unlabeled": len(datasets.unlabeled),
            "num_val": len(datasets.val)}, indent=1))
    runner, stage = build_runner(cfg, datasets, info, source, labeled_counts)
    acrst = runner.acrst
    if acrst is not None:
        echo(f"[acrst] CropBank {acrst.bank.nbytes / 2**20:.1f} MiB on {info.device}; banks {cfg.acrst.banks}, "
             f"N in {cfg.acrst.n_range}, beta {cfg.acrst.beta}, selective supervision "
             f"{'on' if cfg.acrst.selective_supervision else 'off'}")

    guard = DivergenceGuard(run_dir, cfg.solver.divergence_check_steps, cfg.solver.divergence_factor, info.is_main)
    start_step, history = 0, []
    path, state = _checkpoint_to_resume(run_dir, resume, resume_from, echo)
    if state is not None:
        start_step, history = restore(runner, path, state, info.rank, config_to_dict(cfg))
        guard.load_state_dict(state.get("divergence", {}), start_step)
        echo(f"[resume] {path} (step {start_step})")
    runner.start(start_step)

    total = cfg.solver.total_steps
    writer = MetricsWriter(run_dir, enabled=info.is_main, start_step=start_step)
    evaluator = Evaluator(data_cfg.val_json, datasets.categories)
    lr_hook = LRScheduleHook(runner, cfg.solver)
    refresh = (lambda: refresh_report(run_dir)) if (cfg.eval.report and info.is_main) else None
    eval_hook = EvalHook(runner, lambda model: evaluator(model, stage.val(), info.device), writer,
                         cfg.eval.period, total, cfg.eval.teacher, cfg.eval.student, echo, after_eval=refresh)
    eval_hook.history = history
    # the log line of a step is on disk before its checkpoint: a kill between them resumes from the
    # previous checkpoint and drops the newer lines, so log and checkpoints always agree
    hooks = [lr_hook, EMAHook(runner), eval_hook, guard,
             LoggingHook(writer, lr_hook, cfg.run.log_period, total, cfg.run.progress_bar),
             CheckpointHook(runner, run_dir, cfg.run.checkpoint_period, cfg.run.keep_checkpoints, total,
                            info.rank, eval_hook, config_to_dict(cfg), guard)]
    trainer = Trainer(runner.run_step, hooks, start_step, total)
    _install_stop_handler(trainer)
    try:
        trainer.train()
    except TrainingDiverged as exc:
        _say_then_leave_together(f"error: training diverged: {exc}. {guard.advice(cfg.solver.lr)}")
        raise Diverged(str(exc)) from None
    except TrainingInterrupted as exc:
        _say_then_leave_together(f"interrupted: {exc}; continue with --resume")
        raise
    finally:
        writer.close()
    summary = summarize(eval_hook.history, datasets.categories.names)
    if info.is_main:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(summary, indent=2))
        if cfg.eval.report:
            refresh_report(run_dir)  # again, now with final_metrics.json
        echo(format_summary(summary, run_dir))
    dist.barrier()  # ranks leave together: no rank tears down the process group while rank 0 still writes
    return summary


def _say_then_leave_together(message: str) -> None:
    """Every rank prints its line, then waits for the others: under torchrun the first rank to exit
    makes the launcher terminate the rest, so no rank may leave before every rank has spoken."""
    print(message, file=sys.stderr, flush=True)
    dist.barrier()


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


def _install_stop_handler(trainer: Trainer) -> None:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT stops at once."""
    def handler(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop()
        print(f"\n[signal {signum}] finishing the current step, then writing a checkpoint", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        info = dist.init_distributed(cfg.run.device)
        if info.device.type == "cpu" and info.world > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // info.world))
        run(cfg, args.config, args.resume, info, args.resume_from)
        return 0
    except UserError as exc:
        return report_error(exc)
    except Diverged:  # its message is printed by every rank in run()
        return 3
    except TrainingInterrupted:
        return 130
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())
