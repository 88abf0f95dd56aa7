"""Hooks of the training loop (the detector's and SSMLL's): LR schedule, EMA, evaluation, diagnostics,
logging, checkpoint.

Only rank 0 writes files; every rank takes part in collective calls (metric reduction,
evaluation gathering, RNG-state gathering) in the same order. Hooks share values through
`trainer.storage` ("lr", "eval_history", "log_deferred"), never through each other.
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
from acrst_fast import metric_names as M
from acrst_fast.config import SolverConfig
from acrst_fast.host import to_host
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine import rank_state
from acrst_fast.engine.outputs import PHASE_MUTUAL, Deferred, StepOutput, resolve_deferred
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
    """Sets the learning rate of every param group before each step, `lr_at(step)` (a pure function of
    the step), and shares it as `trainer.storage["lr"]`."""

    def __init__(self, optimizer, lr_at: Callable[[int], float]):
        self.optimizer, self.lr_at = optimizer, lr_at

    def before_step(self, trainer: Trainer) -> None:
        lr = trainer.storage["lr"] = self.lr_at(trainer.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class EMAHook(HookBase):
    """Teacher <- EMA of the student after every mutual-learning step (`runner.update_teacher`)."""

    def __init__(self, runner):
        self.runner = runner

    def after_step(self, trainer: Trainer) -> None:
        if trainer.output.phase == PHASE_MUTUAL:
            self.runner.update_teacher()


class DiagnosticsHook(HookBase):
    """Every `period` steps (and at the last), the runner's state diagnostics (`runner.diagnostics()`:
    a `Deferred`, e.g. ACRST's Pseudo Recall, mu, bank fill) join the next log line through
    `trainer.storage["log_deferred"]`: read from the device with the log window, in the same host read."""

    def __init__(self, diagnostics: Callable[[], Deferred], period: int, total: int):
        self.diagnostics, self.period, self.total = diagnostics, period, total

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.period == 0 or trainer.step == self.total:
            trainer.storage.setdefault("log_deferred", []).append(self.diagnostics())


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

    def begin_branch(self, source: Path, step: int, seed: int) -> None:
        """A branch's log (`train --branch-from`) starts with its source run's records up to the branch
        step (when the source's metrics.jsonl is beside the checkpoint), then one record of the branch
        point: {"kind": "branch", "step", "from", "seed"}, so the folder reads as one run."""
        if not self.enabled:
            return
        log = Path(source).parent / "metrics.jsonl"
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
                 if 0 < _step_of(ln) <= step] if log.is_file() else []
        record = {"kind": "branch", "step": step, "from": str(source), "seed": seed}
        atomic_write_text(self.path, "".join(ln + "\n" for ln in lines) + json.dumps(record) + "\n")

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
    """Progress bar (step, losses, images/s, ETA) every step; averaged scalars every `period` steps,
    with the learning rate and the diagnostics other hooks left in `trainer.storage`."""

    def __init__(self, writer: MetricsWriter, period: int, total: int, show_bar: bool):
        self.writer, self.period, self.total = writer, period, total
        self.show_bar = show_bar and writer.enabled
        self._window: list[StepOutput] = []
        self._t0 = time.perf_counter()
        self.bar = None

    def before_train(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=self.total, initial=trainer.step, disable=not self.show_bar, dynamic_ncols=True,
                        mininterval=1.0, desc="train")
        self._t0 = time.perf_counter()

    def _due(self, step: int) -> bool:
        return step % self.period == 0 or step == self.total

    def wants_agreement(self, trainer: Trainer) -> bool:
        return self._due(trainer.step)  # the log line of a step whose loss every rank agreed is finite

    def after_step(self, trainer: Trainer) -> None:
        self._window.append(trainer.output)
        if self.bar is not None:
            self.bar.update(1)
        if self._due(trainer.step):
            self._flush(trainer)

    def _read(self, extra: list[Deferred]) -> tuple[list[dict[str, float]], dict[str, float]]:
        """The window's step values and the extra deferred metrics, read from the device in one go."""
        tensors = [o.tensors() for o in self._window]
        host = to_host(*(t for ts in tensors for t in ts), *(t for d in extra for t in d.tensors))
        values, at = [], 0
        for o, ts in zip(self._window, tensors):
            values.append(o.resolve(host[at:at + len(ts)]))
            at += len(ts)
        return values, resolve_deferred(extra, host[at:])

    def _local(self, values: list[dict[str, float]], elapsed: float) -> dict[str, float]:
        """This rank's averages over the window. A key is averaged over the steps that report it: a window
        spanning the switch from pre-training to mutual learning averages unsup losses over the mutual
        steps only."""
        n = len(self._window)
        local = {M.TOTAL: sum(v[M.TOTAL] for v in values) / n,
                 M.IMAGES_PER_S: sum(o.images for o in self._window) / max(elapsed, 1e-9),
                 M.PSEUDO_PER_IMAGE: sum(o.pseudo_per_image for o in self._window) / n}
        for part in dict.fromkeys(k for o in self._window for k in o.seconds):  # in order of first appearance
            local[M.key(M.TIME, part)] = sum(o.seconds.get(part, 0.0) for o in self._window) / n
        total: dict[str, float] = {}
        count: dict[str, int] = {}
        for v in values:
            for k, x in v.items():
                if k != M.TOTAL:
                    total[k] = total.get(k, 0.0) + x
                    count[k] = count.get(k, 0) + 1
        return local | {k: v / count[k] for k, v in total.items()}

    def _flush(self, trainer: Trainer) -> None:
        if not self._window:
            return
        elapsed = time.perf_counter() - self._t0
        values, diagnostics = self._read(trainer.storage.pop("log_deferred", []))
        avg = dist.all_reduce_mean(self._local(values, elapsed) | diagnostics)
        avg[M.IMAGES_PER_S] *= dist.world_size()  # summed over ranks
        lr = trainer.storage.get("lr", float("nan"))
        record = {"kind": "train", "step": trainer.step, "phase": self._window[-1].phase, "lr": lr, **avg}
        self.writer.write(record, {("train/" + k if "/" not in k else k): v for k, v in avg.items()} | {"train/lr": lr})
        if self.bar is not None:
            self.bar.set_postfix(self._postfix(avg, record["phase"]), refresh=False)
        self._window.clear()
        self._t0 = time.perf_counter()

    @staticmethod
    def _postfix(avg: dict[str, float], phase: str) -> dict[str, str]:
        post = {"loss": f"{avg[M.TOTAL]:.3f}", "img/s": f"{avg[M.IMAGES_PER_S]:.1f}", "phase": phase}
        if any(k.startswith(M.UNSUP + "/") for k in avg):
            post["pl/img"] = f"{avg[M.PSEUDO_PER_IMAGE]:.2f}"
        if M.pasted_key("labeled") in avg:
            post["paste/img"] = f"{avg[M.pasted_key('labeled')]:.1f}"
        return post

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()

    on_interrupt = after_train


def detector_scalars(m: dict) -> dict[str, float]:
    """The TensorBoard scalars of a detector evaluation (COCO AP, AP50, VOC AP50)."""
    return {k: m[k] for k in ("AP", "AP50", "voc_AP50")}


def detector_line(m: dict) -> str:
    return (f"AP {m['AP']:.2f}  AP50 {m['AP50']:.2f}  VOC AP50 {m['voc_AP50']:.2f}  "
            f"({m['num_detections']} detections)")


class EvalHook(HookBase):
    """Evaluates at the end of pre-training (the supervised baseline), every `period` steps and at the end.

    `evaluate(model) -> metrics` runs on every rank. The teacher is evaluated once mutual learning
    has started; the student always (or, with student=False, until then). Each result goes to
    metrics.jsonl and `trainer.storage["eval_history"]`; `scalars(metrics)` are its TensorBoard
    values and `line(metrics)` its console line (the detector's by default).
    """

    def __init__(self, runner, evaluate: Callable, writer: MetricsWriter, period: int, total: int,
                 teacher: bool, student: bool, echo: Callable[[str], None],
                 after_eval: Callable[[], None] | None = None, scalars: Callable[[dict], dict] = detector_scalars,
                 line: Callable[[dict], str] = detector_line):
        self.runner, self.evaluate, self.writer = runner, evaluate, writer
        self.period, self.total, self.teacher, self.student, self.echo = period, total, teacher, student, echo
        self.after_eval = after_eval  # e.g. refresh the run report (rank 0)
        self.scalars, self.line = scalars, line

    def due(self, step: int) -> bool:
        return step == self.total or step == self.runner.pretrain_steps or (self.period > 0 and step % self.period == 0)

    def wants_agreement(self, trainer: Trainer) -> bool:
        return self.due(trainer.step)

    def after_step(self, trainer: Trainer) -> None:
        if self.due(trainer.step):
            self.run(trainer.step, trainer.storage["eval_history"])

    def models(self, step: int) -> list[tuple[str, object]]:
        mutual_started = step > self.runner.pretrain_steps
        return ([("teacher", self.runner.teacher)] if self.teacher and mutual_started else []) + \
            ([("student", self.runner.student)] if self.student or not mutual_started else [])

    def run(self, step: int, history: list[dict]) -> None:
        for name, model in self.models(step):
            t0 = time.perf_counter()
            m = self.evaluate(model)
            entry = {"kind": "eval", "step": step, "model": name,
                     "stage": "supervised" if step <= self.runner.pretrain_steps else "mean_teacher",
                     "seconds": time.perf_counter() - t0, **m}
            history.append(entry)
            self.writer.write(entry, {f"eval/{name}/{k}": v for k, v in self.scalars(m).items()})
            self.echo(f"[eval] step {step} {name} ({entry['stage']}): {self.line(m)}")
        if self.after_eval is not None:
            self.after_eval()


class CheckpointHook(HookBase):
    """Atomic checkpoints every `period` steps, at the end, and when a stop is requested.

    The checkpoint is the trainer's state dict (step, runner: student, teacher, optimizer; storage:
    the evaluation history; the hooks' states) with every rank's RNG states and the run's config;
    each rank's own state (its CropBank) goes to a file of its own. Checkpoints named in
    `trainer.storage["protected_steps"]` (the divergence guard's last good one) are never pruned, nor
    is the one of step `burn_in` (the end of burn-in, written whatever the period: the branch point of
    ablations and of the supervised baseline; None: no such checkpoint).
    """

    def __init__(self, run_dir: Path, period: int, keep: int, total: int, rank: int, config: dict,
                 burn_in: int | None = None):
        self.run_dir, self.period, self.keep, self.total = run_dir, period, keep, total
        self.rank, self.is_main, self.config = rank, rank == 0, config
        self.burn_in = burn_in if burn_in is not None and 0 < burn_in < total else None
        self._saved_step: int | None = None

    def save(self, trainer: Trainer) -> None:
        """Each rank writes its own part first (rank 0 also the part every rank shares: `rank_state.split`);
        rank 0 writes the main file last, so a main file on disk means every part of that checkpoint is
        complete. Then each rank prunes its own files, so node-local run folders are pruned too."""
        step, world = trainer.step, dist.world_size()
        self._saved_step = step
        if trainer.runner.has_rank_state:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # a node-local run folder other than rank 0's
            shared, own = rank_state.split(trainer.rank_state_dict(), step, self.rank, world)
            ckpt.atomic_save(own, ckpt.rank_state_path(self.run_dir, step, self.rank))
            if self.is_main:
                ckpt.atomic_save(shared, rank_state.shared_path(self.run_dir, step))
        rngs = dist.gather_to_main(ckpt.rng_state())  # also a barrier: every rank's part is on disk
        state = trainer.state_dict()  # every rank: hooks see the checkpoint (the guard tests it)
        keep = tuple(trainer.storage.get("protected_steps", ())) + ((self.burn_in,) if self.burn_in else ())
        ckpt.prune_rank_parts(self.run_dir, self.rank, self.keep, keep)
        if not self.is_main:
            return
        ckpt.atomic_save(state | {"rng": rngs, "config": self.config, "world": world},
                         ckpt.checkpoint_path(self.run_dir, step))
        ckpt.prune(self.run_dir, self.keep, keep, world)

    def due(self, step: int) -> bool:
        return step in (self.total, self.burn_in) or (self.period > 0 and step % self.period == 0)

    def wants_agreement(self, trainer: Trainer) -> bool:
        return self.due(trainer.step)  # never a checkpoint of weights a non-finite loss broke

    def after_step(self, trainer: Trainer) -> None:
        if self.due(trainer.step):
            self.save(trainer)

    def on_interrupt(self, trainer: Trainer) -> None:
        # decided by what this hook did, the same on every rank: the main file is rank 0's and may not be
        # on disk yet (or on this node) when another rank asks, and a second save there would be a
        # collective the others never join
        if self._saved_step == trainer.step:
            return
        self.save(trainer)
