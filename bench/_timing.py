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


def timing_classifier(cfg, class_names: tuple[str, ...]):
    """`cfg` itself, or, when it asks for the two-stage filter without naming an SSMLL checkpoint, a copy of it
    that names an UNTRAINED classifier of the configured architecture (saved under run.output_dir).

    A benchmark times the filter's work, which does not depend on the weights; training would first run
    the SSMLL stage (minutes to hours) to make the checkpoint."""
    import dataclasses
    from pathlib import Path

    from acrst_fast.ssmll.model import build_ssmll, save_classifier

    if cfg.ssmll.filter == "single" or cfg.ssmll.checkpoint:
        return cfg
    m = dataclasses.replace(cfg.ssmll, backbone_weights="")
    path = Path(cfg.run.output_dir) / "untrained_ssmll.pt"
    save_classifier(path, build_ssmll(m, len(class_names)), m, class_names)
    print(f"two-stage filter with an untrained {m.backbone} SSMLL classifier ({path.name}): timing only")
    return dataclasses.replace(cfg, ssmll=dataclasses.replace(cfg.ssmll, checkpoint=str(path)))
