"""Benchmark: the strong views' photometric ops of a step, batched (`apply_strong_batch`) vs image by image
(`apply_strong`, the reference) vs the memory roofline.

    python bench/photometric.py [--device auto] [--batch 8] [--size 800 1216] [--repeat 10]

Draws each image's ops from the training config (augment defaults: jitter 0.8, grayscale 0.2, blur 0.5,
three CutOut passes) for a batch of images of about --size (each side -15 % .. 0 %, as the multi-scale views
vary), and prints median milliseconds of both paths, launches per path (CUDA: from the profiler) and a copy
of the batch's bytes 10 times over (the ops read and write the batch about that often), with the ratios.
"""
from __future__ import annotations

import argparse

import torch

from _timing import copy_ms, describe, median_ms, pick_device
from acrst_fast.config import AugmentConfig
from acrst_fast.data.photometric_batch import apply_strong_batch
from acrst_fast.data.transforms import apply_strong, sample_strong


def _launches(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[800, 1216])
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    sizes = [(int(args.size[0] * (0.85 + 0.15 * float(torch.rand((), generator=g)))),
              int(args.size[1] * (0.85 + 0.15 * float(torch.rand((), generator=g))))) for _ in range(args.batch)]
    images = [torch.rand(3, h, w, generator=g).to(device) for h, w in sizes]
    params = [sample_strong(g, AugmentConfig(), h, w) for h, w in sizes]
    batched = lambda: apply_strong_batch(images, params)  # noqa: E731
    reference = lambda: [apply_strong(im, p) for im, p in zip(images, params)]  # noqa: E731
    t_fast = median_ms(batched, args.repeat, device)
    t_ref = median_ms(reference, args.repeat, device)
    nbytes = sum(im.numel() * im.element_size() for im in images)
    t_copy = copy_ms(10 * 2 * nbytes, args.repeat, device)
    print(f"strong photometric ops on {describe(device)}: {args.batch} images of {min(sizes)}..{max(sizes)}; "
          f"{sum(bool(p.jitter_order) for p in params)} jittered, {sum(p.grayscale for p in params)} grayscale, "
          f"{sum(p.blur_sigma > 0 for p in params)} blurred, {sum(len(p.erase) for p in params)} CutOut rectangles")
    print(f"{'batched ms':>11} {'per-image ms':>13} {'copy x10 ms':>12} {'ref/batched':>12} {'copy/batched':>13}"
          f" {'launches batched / per-image':>30}")
    la, lb = _launches(batched, device), _launches(reference, device)
    print(f"{t_fast:11.2f} {t_ref:13.2f} {t_copy:12.2f} {t_ref / t_fast:12.2f} {t_copy / t_fast:13.2f} "
          f"{(f'{la} / {lb}' if la is not None else 'n/a (CPU)'):>30}")


if __name__ == "__main__":
    main()
