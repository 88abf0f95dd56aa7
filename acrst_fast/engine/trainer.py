"""A small training loop; everything else (EMA, LR, checkpoints, evaluation, logs) is a hook.

Stops are collective. After every step, one all-reduce of a tiny tensor on the loss's device (NCCL on
GPUs, gloo on the CPU) tells every rank whether any rank was asked to stop (SIGTERM, Ctrl-C) and each
rank's loss of that step. The host does not wait for it: the packet is copied towards the host without
blocking and read one step later, after the next step's work is queued, so the host runs ahead of the
device (`StepAgreement`). A hook that writes or publishes the weights at a step (checkpoint, evaluation,
the log flush) asks for that step's agreement at once (`HookBase.wants_agreement`), and so does the last
step. So all ranks end at the same step: a non-finite loss on any rank raises `TrainingDiverged` on every
rank (naming the step that produced it) before any checkpoint, evaluation or log line of the broken
weights; a stop request anywhere is honoured at the same step boundary on every rank (at most one step
after it was asked for): every hook of the finished step runs, then the `on_interrupt` hooks (the stop
checkpoint), then `TrainingInterrupted` is raised on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from acrst_fast import dist
from acrst_fast.host import mark_host


class TrainingInterrupted(Exception):
    """Raised by `Trainer.train` after a requested stop was honoured at a step boundary."""


class TrainingDiverged(Exception):
    """A step's loss was not finite on some rank. `step` is the step (1-based count) that produced it."""

    def __init__(self, step: int, ranks: list[int], detail: str):
        self.step, self.ranks, self.detail = step, ranks, detail
        super().__init__(f"step {step}: loss is not finite on rank {', '.join(map(str, ranks))}"
                         + (f" ({detail})" if detail else ""))


class HookBase:
    """Called around the loop. `trainer.step` is the number of completed steps. Hooks share values
    through `trainer.storage` (the learning rate, the evaluation history, metrics for the next log
    line), never through each other. A hook with state of its own returns it from `state_dict`; it
    travels in the checkpoint under the hook's `name`."""

    name = ""  # key of the hook's state in the checkpoint (hooks without state leave it empty)

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def on_interrupt(self, trainer: "Trainer") -> None: ...
    def before_checkpoint(self, trainer: "Trainer") -> None: ...

    def wants_agreement(self, trainer: "Trainer") -> bool:
        """Whether this hook's `after_step` of the step just finished (`trainer.step`) needs that step's
        agreement first: it writes or publishes the weights (a checkpoint, an evaluation, a log line)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, step: int) -> None: ...


class Runner(Protocol):
    """What the trainer drives: the detector's `MeanTeacher` or SSMLL's `SSMLLRunner`."""

    pretrain_steps: int

    has_rank_state: bool  # whether rank_state_dict() holds anything

    def run_step(self, step: int) -> Any: ...
    def start(self, step: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def rank_state_dict(self) -> dict: ...
    def load_rank_state_dict(self, state: dict) -> None: ...


@dataclass
class StepAgreement:
    """A step's agreement in flight: `packet` (float64[1 + world]: any stop request, then every rank's loss),
    all-reduced on the loss's device, and its copy towards the host (`host`, page-locked on CUDA, with the
    `event` that completes it). `read()` waits for the copy only."""

    step: int
    output: Any
    host: torch.Tensor
    event: Any = None

    @classmethod
    def launch(cls, step: int, output: Any, stop_requested: bool) -> "StepAgreement":
        loss = output.total if output is not None else 0.0
        device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
        world, rank = dist.world_size(), dist.rank()
        packet = torch.zeros(1 + world, dtype=torch.float64, device=device)
        packet[0] = float(stop_requested)
        packet[1 + rank] = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)  # on the device
        dist.all_reduce(packet)
        if device.type != "cuda":
            return cls(step, output, mark_host(packet))
        host = torch.empty(packet.shape, dtype=packet.dtype, pin_memory=True)
        host.copy_(packet, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(step, output, mark_host(host), event)

    def read(self) -> tuple[bool, list[float]]:
        """(any rank asked to stop, every rank's loss), waiting for the copy if it is still in flight."""
        if self.event is not None:
            self.event.synchronize()
        values = self.host.tolist()  # host data: the copy is complete
        return values[0] > 0, values[1:]


class Trainer:
    """Runs `runner.run_step(step)` from `start_step` to `total_steps`, calling hooks in order.

    `run_step` returns an object with `total` (this rank's loss, a float or a 0-dim tensor on the
    device) and `describe()` (the loss terms, for the divergence message). `request_stop()` (the CLI calls it on SIGTERM or
    SIGINT) is honoured at a step boundary on every rank, the next or the one after. `trainer.settled` lists
    the (step, every rank's loss) agreements read since the previous hooks ran (the step before the one just
    finished, and that one too when a hook `wants_agreement` or it is the last); `trainer.losses` is the
    latest of them. `storage` holds what hooks share:
    "lr" (set by the LR hook), "eval_history" (list of evaluation records), "log_deferred" (metrics
    to add to the next log line). `state_dict()` is the checkpoint, as detectron2's `TrainerBase`:
    the step, the runner's state, the storage and every stateful hook's state.
    """

    def __init__(self, runner: Runner, hooks: list[HookBase], start_step: int, total_steps: int):
        self.runner, self.hooks = runner, hooks
        self.step, self.total_steps = start_step, total_steps
        self.output: Any = None
        self.losses: list[float] = []
        self.settled: list[tuple[int, list[float]]] = []
        self.stop_requested = False
        self.storage: dict[str, Any] = {"eval_history": []}

    def request_stop(self) -> None:
        self.stop_requested = True

    def state_dict(self) -> dict:
        """The state every rank shares (rank 0 writes it): step, runner, storage, hooks."""
        for h in self.hooks:
            h.before_checkpoint(self)
        hooks = {h.name: h.state_dict() for h in self.hooks if h.name}
        storage = {k: v for k, v in self.storage.items() if k != "log_deferred"}
        return {"step": self.step, "runner": self.runner.state_dict(), "storage": storage, "hooks": hooks}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.runner.load_state_dict(state["runner"])
        self.storage.update(state.get("storage", {}))
        for h in self.hooks:
            if h.name:
                h.load_state_dict(state.get("hooks", {}).get(h.name, {}), self.step)

    def rank_state_dict(self) -> dict:
        """The state this rank owns (its CropBank); empty when the runner has none."""
        return self.runner.rank_state_dict()

    def load_rank_state_dict(self, state: dict) -> None:
        self.runner.load_rank_state_dict(state)

    def _settle(self, agreements: list[StepAgreement]) -> bool:
        """Read `agreements` in step order into `settled` and `losses`; raise `TrainingDiverged` at the first
        with a non-finite loss on some rank. Returns whether any rank asked to stop."""
        stop = False
        for a in agreements:
            asked, losses = a.read()
            bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
            if bad:
                own = not math.isfinite(losses[dist.rank()]) and a.output is not None
                raise TrainingDiverged(a.step, bad, a.output.describe() if own else "")
            stop = stop or asked
            self.losses = losses
            self.settled.append((a.step, losses))
        return stop

    def train(self) -> None:
        self.runner.start(self.step)  # the data streams at the positions of this step
        for h in self.hooks:
            h.before_train(self)
        stop = self._settle([StepAgreement.launch(self.step, None, self.stop_requested)])  # a stop asked before
        pending: StepAgreement | None = None  # the last step's agreement, still unread
        while self.step < self.total_steps and not stop:
            for h in self.hooks:
                h.before_step(self)
            self.output = self.runner.run_step(self.step)
            self.step += 1
            current = StepAgreement.launch(self.step, self.output, self.stop_requested)
            self.settled = []
            now = self.step == self.total_steps or any(h.wants_agreement(self) for h in self.hooks)
            ready = [pending] if pending else []
            if now:
                ready.append(current)
            pending = None if now else current
            stop = self._settle(ready)
            if stop and pending is not None:  # stopping here: this step's agreement before its hooks
                self._settle([pending])
                pending = None
            for h in self.hooks:
                h.after_step(self)
        if stop and self.step < self.total_steps:
            for h in self.hooks:
                h.on_interrupt(self)
            dist.barrier()  # every rank leaves after rank 0 has written the stop checkpoint
            raise TrainingInterrupted(f"stopped at step {self.step}")
        for h in self.hooks:
            h.after_train(self)
