"""Shared by the bench scripts: median wall time with device synchronisation, and the header line."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeat: int, device: torch.device = torch.device("cpu"), warmup: int = 1) -> float:
    """Median milliseconds of `fn()` over `repeat` runs after `warmup` runs, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}"


def copy_ms(moved_bytes: int, repeat: int, device: torch.device) -> float:
    """The memory roofline: a plain copy that moves `moved_bytes` in total (it reads half of them
    and writes the other half), so it compares with work that reads and writes that many bytes."""
    src = torch.empty(max(1, moved_bytes // 2), dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), repeat, device)
