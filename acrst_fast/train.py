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
import os
import sys
from pathlib import Path

import torch
import yaml

from acrst_fast import dist
from acrst_fast.config import (
    Config, ConfigError, check_paths, config_argparser, config_to_dict, dump_config, load_config,
)
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.data.coco import DataError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.build import build_runner, checked_images, class_counts, fetch_pretrained
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.hooks import (
    CheckpointHook, DiagnosticsHook, EMAHook, EvalHook, LoggingHook, LRScheduleHook, MetricsWriter, lr_at,
)
from acrst_fast.engine.launch import exit_code, on_main, train_together
from acrst_fast.engine.resume import branch, restore, saved_world
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
    ap.add_argument("--branch-from", metavar="CKPT", default=None,
                    help="start a new run (a new run.output_dir) from this checkpoint of another run, with this "
                         "config (= run.branch_from=CKPT): its student, teacher, optimizer, step, evaluation "
                         "history and CropBank; randomness after it follows run.seed. Continue a killed branch "
                         "with --resume")
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
                for f in [p, *run_dir.glob(f"ckpt_{s:08d}.*.pt")]:  # its CropBank parts too
                    f.replace(aside / f.name)
    dump_config(cfg, run_dir / "config.yaml")
    prepare_data(cfg)


def _checkpoint_to_resume(cfg: Config, resume: bool, resume_from: str | None,
                          echo) -> tuple[Path | None, dict | None, bool]:
    """(path, state, is_branch): the checkpoint this run continues (--resume-from; --resume: the run
    folder's newest), else the one it branches from (run.branch_from), else none."""
    if resume_from:
        return Path(resume_from), ckpt.read_everywhere(resume_from), False
    if resume:  # rank 0's run folder decides which checkpoint (other nodes may have folders of their own)
        newest: dict = {}

        def pick() -> str | None:
            found = ckpt.load_newest_readable(cfg.run.output_dir, warn=echo)
            if found is None:
                return None
            newest["state"] = found[1]
            return str(found[0])

        path = on_main(pick)
        if path is not None:
            return Path(path), ckpt.read_everywhere(path, newest.get("state")), False
    if cfg.run.branch_from:
        return Path(cfg.run.branch_from), ckpt.load(cfg.run.branch_from), True
    return None, None, False


def _branch_of_killed_run(cfg: Config, resume: bool) -> Config:
    """`--resume` of a branch killed before its first checkpoint, without --branch-from: the branch point
    recorded in the folder's config.yaml (the run starts from it again)."""
    run_dir = Path(cfg.run.output_dir)
    if not resume or cfg.run.branch_from or ckpt.list_checkpoints(run_dir) or not (run_dir / "config.yaml").is_file():
        return cfg
    recorded = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("run", {})
    source = recorded.get("branch_from") or ""
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, branch_from=source)) if source else cfg


def _check_branch(cfg: Config, source: str, resume: bool, resume_from: str | None) -> None:
    """--resume-from and a branch exclude each other; the branch's checkpoint must exist when the run starts
    from it (a branch resumed from its own checkpoints no longer needs it)."""
    if cfg.run.branch_from and resume_from:
        raise ConfigError(f"{source}: --resume-from continues this run, --branch-from (run.branch_from) starts a new "
                          "one from another run's checkpoint: give one of them")
    resumes_own = resume and ckpt.list_checkpoints(cfg.run.output_dir)
    if cfg.run.branch_from and not resumes_own and not Path(cfg.run.branch_from).is_file():
        raise ConfigError(f"{source}: key 'run.branch_from': file not found: {cfg.run.branch_from}")


def _load_data(cfg: Config, source: str):
    """Resolved data config and validated datasets; every image header is checked before training
    (on rank 0, the verdict shared), so a bad file stops the run, or is dropped with `skip`, now."""
    data_cfg = resolved_data(cfg.data)
    check_paths(dataclasses.replace(cfg, data=data_cfg), source)
    datasets = checked_images(cfg, load_datasets(data_cfg))
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
    evaluator = Evaluator(data_cfg.val_json, datasets.categories, cfg.eval.backend)
    refresh = (lambda: refresh_report(run_dir)) if (cfg.eval.report and info.is_main) else None
    hooks = [LRScheduleHook(runner.optimizer, lambda step: lr_at(step, cfg.solver)), EMAHook(runner),
             EvalHook(runner, lambda model: evaluator(model, stage.val(), info.device), writer, cfg.eval.period, total,
                      cfg.eval.teacher, cfg.eval.student, echo, after_eval=refresh), guard]
    if runner.acrst is not None:
        hooks.append(DiagnosticsHook(runner.diagnostics, cfg.run.log_period, total))
    return hooks + [LoggingHook(writer, cfg.run.log_period, total, cfg.run.progress_bar),
                    CheckpointHook(run_dir, cfg.run.checkpoint_period, cfg.run.keep_checkpoints, total, info.rank,
                                   config_to_dict(cfg), cfg.solver.pretrain_steps if cfg.run.keep_burn_in else None)]


def run(cfg: Config, source: str, resume: bool, info: dist.DistInfo, resume_from: str | None = None) -> dict:
    """Train per `cfg`; returns the final summary (same on every rank)."""
    run_dir = Path(cfg.run.output_dir)
    echo = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    cfg = _branch_of_killed_run(cfg, resume)
    _check_branch(cfg, source, resume, resume_from)
    on_main(lambda: (_prepare_run_dir(cfg, source, resume, resume_from), fetch_pretrained(cfg)))
    classifier = cfg.ssmll.checkpoint
    cfg = with_classifier(cfg, source, resume or bool(resume_from), info)  # the SSMLL stage, when it is needed
    if cfg.ssmll.checkpoint != classifier:  # config.yaml says what the checkpoints' config says: the classifier too
        on_main(lambda: dump_config(cfg, run_dir / "config.yaml"))
    data_cfg, datasets = _load_data(cfg, source)
    echo(f"[data] {len(datasets.labeled)} labeled, {len(datasets.unlabeled)} unlabeled, {len(datasets.val)} val "
         f"images; {datasets.categories.num_classes} classes; world size {info.world}, device {info.device}; "
         f"batch per rank {cfg.solver.batch_labeled // info.world} labeled + "
         f"{cfg.solver.batch_unlabeled // info.world} unlabeled (global {cfg.solver.batch_labeled} + "
         f"{cfg.solver.batch_unlabeled})")
    labeled_counts = class_counts(datasets.labeled, datasets.categories.num_classes)
    if info.is_main:
        _write_dataset_stats(run_dir, datasets, labeled_counts)
    runner, stage = build_runner(cfg, datasets, info, source, labeled_counts)
    if runner.acrst is not None:
        echo(f"[acrst] CropBank {runner.acrst.bank.nbytes / 2**20:.1f} MiB on {info.device}; banks {cfg.acrst.banks}, "
             f"N in {cfg.acrst.n_range}, beta {cfg.acrst.beta}, selective supervision "
             f"{'on' if cfg.acrst.selective_supervision else 'off'}")
    guard = DivergenceGuard(run_dir, cfg.solver.divergence_check_steps, cfg.solver.divergence_factor, info.is_main)
    path, state, is_branch = _checkpoint_to_resume(cfg, resume, resume_from, echo)
    if is_branch and int(state["step"]) >= cfg.solver.total_steps:
        raise ConfigError(f"{source}: key 'solver.total_steps' ({cfg.solver.total_steps}) must exceed the step of "
                          f"run.branch_from ({path}: step {state['step']})")
    writer = MetricsWriter(run_dir, enabled=info.is_main, start_step=int(state["step"]) if state and not is_branch else 0)
    trainer = Trainer(runner, _hooks(cfg, runner, stage, data_cfg, datasets, info, writer, guard, echo), 0,
                      cfg.solver.total_steps)
    if is_branch:
        step, taken = branch(trainer, path, state, info, config_to_dict(cfg), cfg.run.seed)
        writer.begin_branch(path, step, cfg.run.seed)
        echo(f"[branch] from {path} (step {step}): student, teacher, optimizer, evaluation history"
             f"{'; ' + taken if taken else ''}; randomness from run.seed {cfg.run.seed}")
    elif state is not None:
        echo(f"[resume] {path} (step {restore(trainer, path, state, info.rank, config_to_dict(cfg))})")
        if saved_world(state) != info.world:
            echo(f"[resume] the checkpoint was written by {saved_world(state)} processes, this run has {info.world}: "
                 "the Pseudo banks are re-split, each rank's draws derived from run.seed (README: Multi-node)")
    train_together(trainer, writer.close, lambda: guard.advice(cfg.solver.lr))
    summary = summarize(trainer.storage["eval_history"], datasets.categories.names)
    if cfg.eval.supervised_branch and 0 < cfg.solver.pretrain_steps < cfg.solver.total_steps:
        summary["supervised_same_steps"] = supervised_baseline(cfg, source, info)["supervised"]
    if info.is_main:
        atomic_write_text(run_dir / "final_metrics.json", json.dumps(summary, indent=2))
        if cfg.eval.report:
            refresh_report(run_dir)  # again, now with final_metrics.json
        echo(format_summary(summary, run_dir))
    dist.barrier()  # ranks leave together: no rank tears down the process group while rank 0 still writes
    return summary


def supervised_baseline(cfg: Config, source: str, info: dist.DistInfo) -> dict:
    """eval.supervised_branch: supervised training alone for the steps mutual learning took, branched from
    this run's burn-in checkpoint into RUN_DIR/supervised (resumed there when it was stopped). Same seed,
    so its labeled batches are the run's own. Returns its summary."""
    run_dir, s = Path(cfg.run.output_dir), cfg.solver
    start = ckpt.checkpoint_path(run_dir, s.pretrain_steps)
    if not start.is_file():
        raise ConfigError(f"{source}: key 'eval.supervised_branch' needs the burn-in checkpoint {start} "
                          "(run.keep_burn_in: true)")
    r = dataclasses.replace
    sup = r(cfg, solver=r(s, pretrain_steps=s.total_steps), acrst=r(cfg.acrst, fbr=False, selective_supervision=False),
            ssmll=r(cfg.ssmll, filter="single"), eval=r(cfg.eval, supervised_branch=False),
            run=r(cfg.run, output_dir=str(run_dir / "supervised"), branch_from=str(start)))
    if info.is_main:
        print(f"\n[baseline] supervised training alone, steps {s.pretrain_steps + 1}-{s.total_steps}, from the "
              f"burn-in checkpoint {start.name} -> {run_dir / 'supervised'}", flush=True)
    return run(sup, source, True, info)


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


SUMMARY_ROWS = (("supervised", "supervised (end of burn-in)"), ("supervised_same_steps", "supervised, same steps"),
                ("teacher", "mean teacher: teacher"), ("student", "mean teacher: student"))


def format_summary(summary: dict, run_dir: Path) -> str:
    """The final table. With a supervised branch (eval.supervised_branch), the semi-supervised result
    stands beside supervised training for the same number of steps: the gain the run shows."""
    lines = ["", "=" * 68, f"{'model':<32}{'step':>8}{'AP':>9}{'AP50':>9}{'VOC AP50':>10}", "-" * 68]
    for name, label in SUMMARY_ROWS:
        m = summary.get(name)
        if m:
            lines.append(f"{label:<32}{m['step']:>8}{m['AP']:>9.2f}{m['AP50']:>9.2f}{m['voc_AP50']:>10.2f}")
    sup, teacher = summary.get("supervised_same_steps"), summary.get("teacher")
    if sup and teacher:
        lines.append(f"teacher - supervised at step {teacher['step']}: {teacher['AP'] - sup['AP']:+.2f} AP "
                     "(one seed; bench/ablate.py gives the paired difference over seeds)")
    elif teacher:
        lines.append("(the supervised row is at an earlier step: eval.supervised_branch=true adds supervised "
                     "training for the same steps)")
    lines += ["=" * 68, f"run folder: {run_dir}  (metrics.jsonl, tensorboard/, final_metrics.json)"]
    if (run_dir / "report" / "report.md").is_file():
        lines.append(f"report: {run_dir / 'report' / 'report.md'}  (refresh: python -m acrst_fast.report {run_dir})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body():
        cfg = load_config(args.config, args.overrides)
        if args.branch_from:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, branch_from=args.branch_from))
        info = dist.init_distributed(cfg.run.device)
        if info.device.type == "cpu" and info.world > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // info.world))
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restarts and not args.resume and info.is_main:
            print(f"[restart] torchrun restarted the workers ({restarts}): resuming from the newest checkpoint",
                  flush=True)
        # a worker group torchrun restarted (--max-restarts) continues on its own, as with --resume
        run(cfg, args.config, args.resume or restarts > 0, info, None if restarts else args.resume_from)

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
