"""The trainer's stop/loss agreement is read one step late (the host runs ahead of the device), except at the
steps a hook writes or publishes weights, and at the last: every step is read once, in order; a non-finite
loss never reaches such a hook; a stop is honoured at most one step after it was asked for."""
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
