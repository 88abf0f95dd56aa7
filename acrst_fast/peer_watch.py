"""A failing rank stops every rank within about a minute, not at the 30-minute collective timeout.

A rank that raises mid-step leaves the others inside a collective it will never join: under NCCL they
wait for the process-group timeout; torchrun stops the other workers of the failed one's node only.
So every rank of a multi-process run keeps a small thread (`PeerWatch`) beside training, on its own
connection to the process group's store (the rendezvous store torchrun already runs):

- a rank whose step raises announces it in the store (`announce`: "rank R failed at step S: Type: text");
  every other rank's thread sees it within `interval` seconds, prints one line naming that rank and the
  error, and exits (code 4). A rank whose own error is a consequence (gloo's "connection closed" when
  the failed rank's process ended) names the first failure instead (`first_failure`);
- every thread beats (a counter in the store) every `interval` seconds. A rank not heard from for
  `peer_timeout` seconds (`ACRST_PEER_TIMEOUT_S`, default 60: SIGKILLed, its node lost, stopped) makes
  every other rank stop the same way. A store that cannot be reached for that long, too.

The exit leaves the newest complete checkpoint in place (checkpoints are atomic); under torchrun
`--max-restarts=N` the restarted workers resume from it on their own (`train.py`).
Keys carry torchrun's restart count, so a restarted run never reads its previous attempt's failure.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

EXIT_PEER_FAILED = 4


def _prefix() -> str:
    return f"acrst_watch/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


class PeerWatch:
    """The watch thread of rank `rank` of `world` over `store` (a torch.distributed Store; cloned, so the
    thread has a connection of its own). `stop(line)` is what a rank does when a peer failed (prints
    `line` on stderr, exits with code 4); tests pass their own."""

    def __init__(self, store: Any, rank: int, world: int, interval: float = 2.0, peer_timeout: float | None = None,
                 stop: Callable[[str], None] | None = None):
        self.store = store.clone() if hasattr(store, "clone") else store
        self.rank, self.world, self.interval = rank, world, interval
        self.peer_timeout = peer_timeout if peer_timeout is not None else float(
            os.environ.get("ACRST_PEER_TIMEOUT_S", "60"))
        self.stop_fn = stop or _exit_with
        self.prefix = _prefix()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # the thread and announce() share the connection
        self._thread = threading.Thread(target=self._loop, name="acrst-peer-watch", daemon=True)
        self._beat = 0

    def start(self) -> "PeerWatch":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.interval + 5)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def announce(self, message: str) -> None:
        """Say in the store that this rank failed (`message`: "rank R failed ...: Type: text"); the first
        announcement stays. The watch stops: this rank ends on its own error."""
        self._closed.set()
        try:
            with self._lock:
                self.store.compare_set(self._key("failed"), "", message)
        except Exception:  # noqa: BLE001 - a store that is gone: the peers notice the silence instead
            pass

    def first_failure(self) -> str | None:
        """The first failure another rank announced, if any."""
        try:
            with self._lock:
                if not self.store.check([self._key("failed")]):
                    return None
                msg = self.store.get(self._key("failed")).decode()
        except Exception:  # noqa: BLE001
            return None
        return None if msg.startswith(f"rank {self.rank} ") else msg

    def _loop(self) -> None:
        keys = [self._key(f"alive/{r}") for r in range(self.world)]
        last: dict[int, tuple[bytes, float]] = {}
        store_ok = time.monotonic()
        while not self._closed.wait(self.interval if self._beat else 0):
            now = time.monotonic()
            try:
                with self._lock:
                    self.store.set(keys[self.rank], str(self._beat))
                    failed = self.store.get(self._key("failed")).decode() \
                        if self.store.check([self._key("failed")]) else None
                    beats = self.store.multi_get(keys) if self.store.check(keys) else None
                store_ok = now
            except Exception:  # noqa: BLE001 - the store's host (a launcher, rank 0) may be gone
                if now - store_ok > self.peer_timeout and not self._closed.is_set():
                    self._stop(f"lost the rendezvous store for {now - store_ok:.0f} s")
                self._closed.wait(4 * self.interval)  # torch prints a warning per failed call: fewer calls
                continue
            self._beat += 1
            if failed and not failed.startswith(f"rank {self.rank} "):
                self._stop(failed)
                return
            for r, value in enumerate(beats or []):
                if r == self.rank:
                    continue
                seen, since = last.get(r, (None, now))
                if value != seen:
                    last[r] = (value, now)
                elif now - since > self.peer_timeout:
                    self._stop(f"rank {r} has not been heard from for {now - since:.0f} s (killed, stopped, or its "
                               "node lost)")
                    return

    def _stop(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.stop_fn(f"error: rank {self.rank} stopping: {reason}")


def _exit_with(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_FAILED)


_WATCH: PeerWatch | None = None


def start(store: Any, rank: int, world: int) -> PeerWatch:
    """Start this process's watch (`dist.init_distributed` calls it for a multi-process run)."""
    global _WATCH
    stop()
    _WATCH = PeerWatch(store, rank, world).start()
    return _WATCH


def current() -> PeerWatch | None:
    return _WATCH


def stop() -> None:
    global _WATCH
    if _WATCH is not None:
        _WATCH.close()
    _WATCH = None
