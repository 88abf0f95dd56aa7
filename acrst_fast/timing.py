"""Wall-clock reads for per-part step timings."""
from __future__ import annotations

import time

import torch


def clock(device: torch.device, sync: bool) -> float:
    """time.perf_counter(), after waiting for `device`'s queued work when `sync` is set and it is a
    GPU (benchmarks want each part's own time; training does not pay for the synchronisation)."""
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock:
    """Seconds of the named parts of one step: `mark(part)` closes the part that began at the previous
    mark (or at creation). `seconds` maps part -> seconds, in order."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync = device, sync
        self.seconds: dict[str, float] = {}
        self._last = clock(device, sync)

    def mark(self, part: str) -> None:
        now = clock(self.device, self.sync)
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now
