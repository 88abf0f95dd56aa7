"""What both command-line trainers (`train`, `train_ssmll`) share around `Trainer.train()`: work done on
rank 0 for all, the stop handler, saying a divergence or a stop on every rank, and the exit codes.

Exit codes: 0 done; 2 a user error (one line on stderr); 3 training diverged; 4 another rank failed (one
line naming it and its error: `peer_watch`); 130 stopped by a signal (a checkpoint was written: continue
with --resume). An error on one rank is announced to the others (`peer_watch.announce`), so no rank
waits for the collective timeout.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

from acrst_fast import dist
from acrst_fast.engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted
from acrst_fast import peer_watch
from acrst_fast.errors import UserError, one_line, report_error

EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 130


class Diverged(Exception):
    """Training stopped on a non-finite loss; the message says which checkpoint to resume and how."""


def on_main(fn):
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


def say_then_leave_together(message: str) -> None:
    """Every rank prints its line, then waits for the others: under torchrun the first rank to exit
    makes the launcher terminate the rest, so no rank may leave before every rank has spoken."""
    sys.stderr.write(message + "\n")  # one write: the ranks share torchrun's stderr, print() writes twice
    sys.stderr.flush()
    dist.barrier()


def install_stop_handler(trainer: Trainer) -> None:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit. A second SIGINT stops at once."""
    def handler(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop()
        print(f"\n[signal {signum}] finishing the current step, then writing a checkpoint", file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def train_together(trainer: Trainer, close: Callable[[], None], advice: Callable[[], str]) -> None:
    """trainer.train() under the stop handler; a divergence (with `advice()`) or a stop is said on every
    rank, which then leave together (raises Diverged or TrainingInterrupted). `close` runs in any case."""
    install_stop_handler(trainer)
    try:
        trainer.train()
    except TrainingDiverged as exc:
        say_then_leave_together(f"error: training diverged: {exc}. {advice()}")
        raise Diverged(str(exc)) from None
    except TrainingInterrupted as exc:
        say_then_leave_together(f"interrupted: {exc}; continue with --resume")
        raise
    except Exception as exc:  # this rank alone: exit_code announces it with the step it happened in
        exc.acrst_step = trainer.step + 1
        raise
    finally:
        close()


def exit_code(fn: Callable[[], object]) -> int:
    """Run a trainer's body and map its ending to the exit code; the process group is shut down after."""
    try:
        fn()
        return 0
    except (Diverged, TrainingInterrupted) as exc:  # collective: every rank says it and leaves together
        return EXIT_DIVERGED if isinstance(exc, Diverged) else EXIT_INTERRUPTED
    except BaseException as exc:
        watch = peer_watch.current()
        root = watch.first_failure() if watch is not None else None
        if root is not None and not isinstance(exc, KeyboardInterrupt):  # a consequence of another rank's failure
            print(f"error: rank {dist.rank()} stopping: {root}", file=sys.stderr, flush=True)
            return peer_watch.EXIT_PEER_FAILED
        if watch is not None:
            where = getattr(exc, "acrst_step", None)
            watch.announce(f"rank {dist.rank()} failed{f' at step {where}' if where else ''}: "
                           f"{type(exc).__name__}: {one_line(str(exc))[:300]}")
        if isinstance(exc, UserError):
            return report_error(exc)
        raise
    finally:
        dist.shutdown()
