"""Hooks of the mean-teacher loop: LR schedule, EMA, checkpoint, evaluation, logging.

Only rank 0 writes files; every rank takes part in collective calls (metric reduction,
evaluation gathering, RNG-state gathering) in the same order.
"""
from __future__ import annotations

import bisect
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from acrst_fast import dist
from acrst_fast.config import SolverConfig
from acrst_fast.augment.host import to_host
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.divergence import DivergenceGuard
from acrst_fast.engine.mean_teacher import PHASE_MUTUAL, MeanTeacher, StepOutput
from acrst_fast.engine.trainer import HookBase, Trainer
from acrst_fast.safe_io import atomic_write_text


def lr_at(step: int, s: SolverConfig) -> float:
    """Linear warmup from lr * warmup_factor over warmup_steps, then x lr_gamma at each of lr_steps."""
    factor = s.lr_gamma ** bisect.bisect_right(s.lr_steps, step)
    if step < s.warmup_steps:
        alpha = step / s.warmup_steps
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return s.lr * factor


class LRScheduleHook(HookBase):
    """Sets the learning rate of every param group before each step (a pure function of the step)."""

    def __init__(self, runner: MeanTeacher, solver: SolverConfig):
        self.runner, self.solver = runner, solver
        self.lr = solver.lr

    def before_step(self, trainer: Trainer) -> None:
        self.lr = lr_at(trainer.step, self.solver)
        for group in self.runner.optimizer.param_groups:
            group["lr"] = self.lr


class EMAHook(HookBase):
    """Teacher <- EMA of the student after every mutual-learning step."""

    def __init__(self, runner: MeanTeacher):
        self.runner = runner

    def after_step(self, trainer: Trainer) -> None:
        if trainer.output.phase == PHASE_MUTUAL:
            self.runner.update_teacher()


class MetricsWriter:
    """metrics.jsonl (one JSON object a line) and TensorBoard scalars in the run folder; rank 0 only.

    Opened at step S (the checkpoint's step on resume, 0 for a new run), records of steps after
    S (written by a killed or failed run after its last checkpoint) are dropped, so the files
    read as one uninterrupted run; a new run starts with an empty log.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.is_file():
            kept = [ln for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if 0 < _step_of(ln) <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step)

    def write(self, record: dict, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the checkpoint of this step is written
        for k, v in scalars.items():
            if v is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a line cut by a kill: dropped with the records after the checkpoint


class LoggingHook(HookBase):
    """Progress bar (step, losses, images/s, ETA) every step; averaged scalars every `period` steps."""

    def __init__(self, writer: MetricsWriter, lr_hook: LRScheduleHook, period: int, total: int, show_bar: bool):
        self.writer, self.lr_hook, self.period, self.total = writer, lr_hook, period, total
        self.show_bar = show_bar and writer.enabled
        self._window: list[StepOutput] = []
        self._t0 = time.perf_counter()
        self.bar = None

    def before_train(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=self.total, initial=trainer.step, disable=not self.show_bar, dynamic_ncols=True,
                        mininterval=1.0, desc="train")
        self._t0 = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        out: StepOutput = trainer.output
        self._window.append(out)
        if self.bar is not None:
            self.bar.update(1)
        if trainer.step % self.period == 0 or trainer.step == self.total:
            self._flush(trainer.step)

    def _flush(self, step: int) -> None:
        n = len(self._window)
        if n == 0:
            return
        elapsed = time.perf_counter() - self._t0
        # the window's losses and deferred metrics, read from the device in one go
        tensors = [o.tensors() for o in self._window]
        host = to_host(*(t for ts in tensors for t in ts))
        values, at = [], 0
        for o, ts in zip(self._window, tensors):
            values.append(o.resolve(host[at:at + len(ts)]))
            at += len(ts)
        local = {"total": sum(v["total"] for v in values) / n,
                 "images_per_s": sum(o.images for o in self._window) / max(elapsed, 1e-9),
                 "pseudo_per_image": sum(o.pseudo_per_image for o in self._window) / n}
        for part in dict.fromkeys(k for o in self._window for k in o.seconds):  # in order of first appearance
            local[f"time/{part}"] = sum(o.seconds.get(part, 0.0) for o in self._window) / n
        # a key is averaged over the steps that report it: a window spanning the switch from
        # pre-training to mutual learning averages unsup losses over the mutual steps only
        total: dict[str, float] = {}
        count: dict[str, int] = {}
        for v in values:
            for k, x in v.items():
                if k == "total":
                    continue
                total[k] = total.get(k, 0.0) + x
                count[k] = count.get(k, 0) + 1
        local.update({k: v / count[k] for k, v in total.items()})
        avg = dist.all_reduce_mean(local)
        avg["images_per_s"] *= dist.world_size()  # summed over ranks
        record = {"kind": "train", "step": step, "phase": self._window[-1].phase, "lr": self.lr_hook.lr, **avg}
        self.writer.write(record, {("train/" + k if "/" not in k else k): v for k, v in avg.items()} |
                          {"train/lr": self.lr_hook.lr})
        if self.bar is not None:
            post = {"loss": f"{avg['total']:.3f}", "img/s": f"{avg['images_per_s']:.1f}", "phase": record["phase"]}
            if "unsup/loss_classifier" in avg:
                post["pl/img"] = f"{avg['pseudo_per_image']:.2f}"
            if "acrst/pasted_per_image_labeled" in avg:
                post["paste/img"] = f"{avg['acrst/pasted_per_image_labeled']:.1f}"
            self.bar.set_postfix(post, refresh=False)
        self._window.clear()
        self._t0 = time.perf_counter()

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()

    on_interrupt = after_train


class EvalHook(HookBase):
    """Evaluates at the end of pre-training (the supervised baseline), every `period` steps and at the end.

    `evaluate(model) -> metrics` runs on every rank. The teacher is evaluated once mutual
    learning has started; the student always. Results go to metrics.jsonl and `self.history`.
    """

    def __init__(self, runner: MeanTeacher, evaluate: Callable, writer: MetricsWriter, period: int, total: int,
                 teacher: bool, student: bool, echo: Callable[[str], None],
                 after_eval: Callable[[], None] | None = None):
        self.runner, self.evaluate, self.writer = runner, evaluate, writer
        self.period, self.total, self.teacher, self.student, self.echo = period, total, teacher, student, echo
        self.after_eval = after_eval  # e.g. refresh the run report (rank 0)
        self.history: list[dict] = []

    def due(self, step: int) -> bool:
        return step == self.total or step == self.runner.pretrain_steps or (self.period > 0 and step % self.period == 0)

    def after_step(self, trainer: Trainer) -> None:
        if self.due(trainer.step):
            self.run(trainer.step)

    def run(self, step: int) -> None:
        mutual_started = step > self.runner.pretrain_steps
        models = []
        if self.teacher and mutual_started:
            models.append(("teacher", self.runner.teacher))
        if self.student or not mutual_started:
            models.append(("student", self.runner.student))
        for name, model in models:
            t0 = time.perf_counter()
            m = self.evaluate(model)
            entry = {"kind": "eval", "step": step, "model": name,
                     "stage": "supervised" if step <= self.runner.pretrain_steps else "mean_teacher",
                     "seconds": time.perf_counter() - t0, **m}
            self.history.append(entry)
            self.writer.write(entry, {f"eval/{name}/{k}": m[k] for k in ("AP", "AP50", "voc_AP50")})
            self.echo(f"[eval] step {step} {name} ({entry['stage']}): AP {m['AP']:.2f}  AP50 {m['AP50']:.2f}  "
                      f"VOC AP50 {m['voc_AP50']:.2f}  ({m['num_detections']} detections)")
        if self.after_eval is not None:
            self.after_eval()


class CheckpointHook(HookBase):
    """Atomic checkpoints every `period` steps, at the end, and when a stop is requested.

    Holds everything needed to continue bit-for-bit: student, teacher, optimizer, step, every
    rank's RNG states, evaluation history.
    """

    def __init__(self, runner: MeanTeacher, run_dir: Path, period: int, keep: int, total: int, rank: int,
                 eval_hook: EvalHook | None, config: dict, guard: DivergenceGuard | None = None):
        self.runner, self.run_dir, self.period, self.keep, self.total = runner, run_dir, period, keep, total
        self.rank, self.is_main, self.eval_hook, self.config = rank, rank == 0, eval_hook, config
        self.guard = guard

    def save(self, step: int) -> None:
        """Each rank writes its own state (its CropBank) first; rank 0 writes the main file last, so a
        main file on disk means every rank's part of that checkpoint is complete."""
        if self.runner.acrst is not None:
            ckpt.atomic_save({"step": step, "acrst": self.runner.acrst.state_dict()},
                             ckpt.rank_state_path(self.run_dir, step, self.rank))
        rngs = dist.gather_to_main(ckpt.rng_state())  # also a barrier: every rank's part is on disk
        if self.guard is not None:
            self.guard.on_saved(step)
        if not self.is_main:
            return
        state = {
            "step": step,
            "student": self.runner.student.state_dict(),
            "teacher": self.runner.teacher.state_dict(),
            "optimizer": self.runner.optimizer.state_dict(),
            "grad_scaler": self.runner.precision.state_dict(),
            "rng": rngs,
            "eval_history": self.eval_hook.history if self.eval_hook else [],
            "config": self.config,
            "divergence": self.guard.state_dict() if self.guard is not None else {},
        }
        ckpt.atomic_save(state, ckpt.checkpoint_path(self.run_dir, step))
        ckpt.prune(self.run_dir, self.keep, self.guard.protected() if self.guard is not None else ())

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step == self.total or (self.period > 0 and trainer.step % self.period == 0):
            self.save(trainer.step)

    def on_interrupt(self, trainer: Trainer) -> None:
        if ckpt.checkpoint_path(self.run_dir, trainer.step).is_file():
            return
        self.save(trainer.step)


def restore(runner: MeanTeacher, path: Path, state: dict, rank: int, config: dict) -> tuple[int, list[dict]]:
    """Load checkpoint `state` (read from `path`) into the runner; returns (step, eval history).

    A checkpoint of another model (a changed model setting or class list) is a CheckpointError
    naming the config keys that differ, in one line."""
    try:
        runner.student.load_state_dict(state["student"])
        runner.teacher.load_state_dict(state["teacher"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path}: {_model_mismatch(state.get('config', {}), config, exc)}") from None
    runner.optimizer.load_state_dict(state["optimizer"])
    runner.precision.load_state_dict(state.get("grad_scaler", {}))
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    step = int(state["step"])
    if runner.acrst is not None:
        part = ckpt.rank_state_path(path.parent, step, rank)
        if not part.is_file():
            raise ckpt.CheckpointError(f"{path}: this rank's ACRST state {part.name} is missing (was the run started "
                                       "without acrst.fbr, or with fewer processes?)")
        runner.acrst.load_state_dict(ckpt.load(part)["acrst"])
    return step, list(state.get("eval_history", []))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _model_mismatch(saved: dict, current: dict, exc: Exception) -> str:
    """One line: which model settings differ between the checkpoint and this run."""
    a, b = _flatten(saved), _flatten(current)
    keys = [k for k in sorted(set(a) | set(b)) if k.startswith("model.") and a.get(k) != b.get(k)]
    if keys:
        diffs = ", ".join(f"{k} ({a.get(k)!r} in the checkpoint, {b.get(k)!r} now)" for k in keys[:4])
        return (f"the checkpoint holds another model: {diffs}{' ...' if len(keys) > 4 else ''}; resume with the "
                "checkpoint's settings, or start a new run.output_dir")
    first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]
    return (f"the checkpoint's weights do not fit this model although the model settings are equal "
            f"(was the dataset's class list changed?): {first}")
