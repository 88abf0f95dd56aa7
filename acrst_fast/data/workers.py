"""DataLoader workers that outlive a stop signal while the main process writes its stop checkpoint
(`ignore_stop_signals`, the worker_init_fn of the detector's and the SSMLL stage's loaders)."""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal

# Set in the main process when it exits (atexit runs this before multiprocessing terminates its
# workers); forked DataLoader workers share it.
_MAIN_EXITING = multiprocessing.get_context("fork").Event()
atexit.register(_MAIN_EXITING.set)


def _worker_stop_signal(signum, frame) -> None:
    if _MAIN_EXITING.is_set() or os.getppid() == 1:  # the main process is leaving (or gone): leave too
        os._exit(0)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: survive SIGTERM and SIGINT while the main process runs.

    A scheduler's cancel (`kill -- -PGID`) or Ctrl-C signals the whole process group. The workers
    then live on while the main process finishes its step and writes the stop checkpoint; when it
    exits, they leave with it (its own shutdown, or the SIGTERM multiprocessing sends at exit)."""
    signal.signal(signal.SIGTERM, _worker_stop_signal)
    signal.signal(signal.SIGINT, _worker_stop_signal)


