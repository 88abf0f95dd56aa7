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
