"""The trainer as a specification, with a fake runner: hook order, collective stop, divergence raised before
the hooks of its step, the LR schedule and the divergence guard's rule. The stop/loss agreement is read one
step late (the host runs ahead of the device), except at the steps a hook writes or publishes weights, and at
the last: every step is read once, in order; a non-finite loss never reaches such a hook; a stop is honoured
at most one step after it was asked for."""
import math

import pytest
import torch

from acrst_fast.engine.trainer import HookBase, StepAgreement, Trainer, TrainingDiverged, TrainingInterrupted


class _Out:
    def __init__(self, loss: float):
        self.total = torch.tensor(loss)

    def describe(self) -> str:
        return f"loss {float(self.total)}"


class _Runner:
    pretrain_steps, has_rank_state = 0, False

    def __init__(self, nan_at: int = -1, stop_at: int = -1):
        self.nan_at, self.stop_at, self.calls, self.trainer = nan_at, stop_at, [], None

    def start(self, step):
        pass

    def run_step(self, step):
        self.calls.append(step)
        if step == self.stop_at:
            self.trainer.request_stop()  # a SIGTERM during this step
        return _Out(math.nan if step == self.nan_at else 1.0 + step)


class _Recorder(HookBase):
    """Records what each after_step saw; wants the agreement at the steps in `due` (a checkpoint's)."""

    def __init__(self, due=()):
        self.due, self.seen, self.interrupted_at = set(due), [], None

    def wants_agreement(self, trainer):
        return trainer.step in self.due

    def after_step(self, trainer):
        self.seen.append((trainer.step, [s for s, _ in trainer.settled]))

    def on_interrupt(self, trainer):
        self.interrupted_at = (trainer.step, [s for s, _ in trainer.settled])


def _trainer(runner, hooks, total=6):
    trainer = Trainer(runner, hooks, 0, total)
    runner.trainer = trainer
    return trainer


def test_each_step_read_once_one_step_late_except_where_wanted():
    hook = _Recorder(due={3})
    trainer = _trainer(_Runner(), [hook])
    trainer.train()
    assert hook.seen == [(1, []), (2, [1]), (3, [2, 3]), (4, []), (5, [4]), (6, [5, 6])]
    assert trainer.losses == [6.0]  # the last step's loss (1 + step index 5)


def test_nan_is_named_by_its_step_and_never_reaches_a_checkpoint():
    hook = _Recorder(due={3})
    runner = _Runner(nan_at=2)  # step 3 (1-based) is not finite; step 3 is a checkpoint step
    with pytest.raises(TrainingDiverged, match=r"step 3: loss is not finite on rank 0 \(loss nan\)") as err:
        _trainer(runner, [hook]).train()
    assert err.value.step == 3 and runner.calls == [0, 1, 2] and [s for s, _ in hook.seen] == [1, 2]
    hook, runner = _Recorder(), _Runner(nan_at=2)  # no hook wants step 3: the host ran one step ahead
    with pytest.raises(TrainingDiverged, match="step 3: loss is not finite") as err:
        _trainer(runner, [hook]).train()
    assert err.value.step == 3 and runner.calls == [0, 1, 2, 3] and [s for s, _ in hook.seen] == [1, 2, 3]


@pytest.mark.parametrize("due,stopped", [((), 3), ({2}, 2)])
def test_stop_honoured_at_most_one_step_late_with_its_step_read(due, stopped):
    hook, runner = _Recorder(due=due), _Runner(stop_at=1)  # asked during step 2
    with pytest.raises(TrainingInterrupted, match=f"stopped at step {stopped}"):
        _trainer(runner, [hook]).train()
    assert runner.calls == list(range(stopped))
    step, settled = hook.interrupted_at
    assert step == stopped and settled[-1] == stopped  # the stop checkpoint's step is read before it is written


def test_agreement_packet_holds_stop_and_loss():
    a = StepAgreement.launch(7, _Out(2.5), stop_requested=True)
    assert a.step == 7 and a.read() == (True, [2.5])
    assert StepAgreement.launch(0, None, False).read() == (False, [0.0])


class _Order(HookBase):
    """Logs every call the trainer makes to a hook, with the step."""

    def __init__(self, log, name):
        self.log, self.tag = log, name

    def before_train(self, trainer):
        self.log.append((self.tag, "before_train", trainer.step))

    def before_step(self, trainer):
        self.log.append((self.tag, "before_step", trainer.step))

    def after_step(self, trainer):
        self.log.append((self.tag, "after_step", trainer.step))

    def after_train(self, trainer):
        self.log.append((self.tag, "after_train", trainer.step))

    def on_interrupt(self, trainer):
        self.log.append((self.tag, "on_interrupt", trainer.step))


def test_hooks_run_in_order_around_each_step():
    log = []
    _trainer(_Runner(), [_Order(log, "a"), _Order(log, "b")], total=2).train()
    assert log == [("a", "before_train", 0), ("b", "before_train", 0),
                   ("a", "before_step", 0), ("b", "before_step", 0), ("a", "after_step", 1), ("b", "after_step", 1),
                   ("a", "before_step", 1), ("b", "before_step", 1), ("a", "after_step", 2), ("b", "after_step", 2),
                   ("a", "after_train", 2), ("b", "after_train", 2)]


def test_a_stop_runs_the_finished_steps_hooks_then_on_interrupt_not_after_train():
    log = []
    trainer = _trainer(_Runner(stop_at=1), [_Order(log, "a")], total=6)  # asked during the 2nd step
    with pytest.raises(TrainingInterrupted, match="stopped at step 3"):  # its agreement is read one step late
        trainer.train()
    assert log[-2:] == [("a", "after_step", 3), ("a", "on_interrupt", 3)]
    assert not any(call == "after_train" for _, call, _ in log)


def test_divergence_is_raised_before_the_hooks_of_its_step():
    log = []
    trainer = _trainer(_Runner(nan_at=2), [_Order(log, "a"), _Recorder(due={3})], total=6)
    with pytest.raises(TrainingDiverged) as exc:
        trainer.train()
    assert exc.value.step == 3 and ("a", "after_step", 3) not in log and ("a", "after_step", 2) in log


def test_lr_warmup_then_steps():
    from dataclasses import replace

    from acrst_fast.config import SolverConfig
    from acrst_fast.engine.hooks import lr_at

    s = replace(SolverConfig(), lr=0.1, warmup_steps=10, warmup_factor=0.001, lr_steps=(20, 30), lr_gamma=0.1)
    assert lr_at(0, s) == pytest.approx(0.1 * 0.001)
    assert lr_at(5, s) == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert [lr_at(k, s) for k in (10, 19, 20, 29, 30)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_divergence_guard_promotes_a_checkpoint_after_clean_steps(tmp_path):
    """A checkpoint becomes the last good one once the `check_steps` steps after it had losses at most
    `factor` x the median of the steps before it; one step above the bound rejects it."""
    from acrst_fast.engine.divergence import LAST_GOOD, DivergenceGuard

    guard = DivergenceGuard(tmp_path, check_steps=3, factor=2.0, is_main=True)
    for step in (1, 2, 3):
        guard.observe(step, 1.0)
    guard.on_saved(3)  # bound 2 x median(1, 1, 1)
    guard.on_saved(4)
    guard.observe(4, 1.5)
    guard.observe(5, 3.0)  # above both bounds (2 x median(1, 1, 1)): checkpoints 3 and 4 rejected
    assert guard.last_good is None and 3 not in guard.pending and 4 not in guard.pending
    guard.on_saved(6)  # bound 2 x median(1.5, 3.0, 1.0) = 3.0
    for step in (6, 7, 8, 9):
        guard.observe(step, 2.5)
    assert guard.last_good == 6 and guard.protected() == (6,)
    assert '"step": 6' in (tmp_path / LAST_GOOD).read_text()
