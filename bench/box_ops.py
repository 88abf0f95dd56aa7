"""Benchmark: pairwise box IoU, C++ extension vs the PyTorch reference vs a copy roofline.

    python bench/box_ops.py [--sizes 64x64 512x512 2000x2000] [--repeat 20]

Prints, per size, median milliseconds of `box_iou` (acrst_fast._C), `box_iou_ref` (PyTorch) and
a plain copy of the output's bytes (the memory roofline), and their ratios, measured in one run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from acrst_fast import _ext
from acrst_fast.ops import box_iou, box_iou_ref


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 800
    return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 200], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["64x64", "512x512", "2000x2000"])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if not _ext.HAS_EXT:
        raise SystemExit("acrst_fast._C is not built: pip install -e .")
    gen = torch.Generator().manual_seed(0)
    print(f"box_iou on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'N x M':>12} {'C++ ms':>9} {'ref ms':>9} {'copy ms':>9} {'ref/C++':>8} {'copy/C++':>9}")
    for size in args.sizes:
        n, m = (int(v) for v in size.split("x"))
        a, b = _boxes(n, gen), _boxes(m, gen)
        torch.testing.assert_close(box_iou(a, b), box_iou_ref(a, b), atol=1e-5, rtol=1e-4)
        out = torch.empty(n, m)
        src = torch.rand(n, m)
        t_ext = _median_ms(lambda: box_iou(a, b), args.repeat)
        t_ref = _median_ms(lambda: box_iou_ref(a, b), args.repeat)
        t_copy = _median_ms(lambda: out.copy_(src), args.repeat)
        print(f"{size:>12} {t_ext:9.3f} {t_ref:9.3f} {t_copy:9.3f} {t_ref / t_ext:8.2f} {t_copy / t_ext:9.2f}")


if __name__ == "__main__":
    main()
