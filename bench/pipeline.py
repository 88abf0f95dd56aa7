"""Benchmark: the DALI data stage vs the torch/torchvision fallback, images per second.

    python bench/pipeline.py [--images tests/data/coco/train2017]
                             [--json tests/data/coco/annotations/instances_train2017.json]
                             [--workers 2] [--batch 16] [--batches 8] [--device auto]

Both stages produce the unlabeled stream's weak + strong views at the paper's resolution (short
side 640..800, long side <= 1333, the default AugmentConfig) from real COCO photos, with the
same number of CPU workers (DataLoader processes for the fallback, pipeline threads for DALI).
DALI runs on the GPU (mixed decode) when one is present, else on the CPU. Prints images/s of
each and their ratio, measured in one run after a warm-up batch. The roofline column is the
fallback's decode alone (PIL decode of the same files, timed on one thread and scaled by the
worker count): the ceiling for a pipeline that decodes on the host.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _timing import describe, pick_device, sync
from acrst_fast.config import AugmentConfig
from acrst_fast.data.coco import decode_image, load_coco_records
from acrst_fast.data.dali_stage import DaliDataStage
from acrst_fast.data.loader import TorchDataStage

SHARED = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco"  # the real photos shipped with the tests


def images_per_s(batches, n: int, device: torch.device) -> float:
    next(batches)  # warm-up: pipeline build, worker start
    sync(device)
    t0, count = time.perf_counter(), 0
    for _ in range(n):
        count += len(next(batches))
    sync(device)
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(SHARED / "train2017"))
    ap.add_argument("--json", default=str(SHARED / "annotations" / "instances_train2017.json"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    records, _ = load_coco_records(args.json, args.images)
    aug = AugmentConfig()
    kw = dict(batch_labeled=args.batch, batch_unlabeled=args.batch, seed=0, rank=0, world=1)
    fallback = TorchDataStage([], records, [], aug, num_workers=args.workers, **kw)
    dali = DaliDataStage([], records, [], aug, device_id=(device.index or 0) if device.type == "cuda" else None,
                         threads=args.workers, **kw)
    t_fallback = images_per_s(fallback.unlabeled(0), args.batches, torch.device("cpu"))
    t_dali = images_per_s(dali.unlabeled(0), args.batches, device)
    t0 = time.perf_counter()
    for rec in records[: 2 * args.batch]:
        decode_image(rec)
    decode_only = min(2 * args.batch, len(records)) / (time.perf_counter() - t0) * args.workers
    print(f"data stage on {describe(device)}: {len(records)} COCO images, weak + strong views, scales "
          f"{aug.scales[0]}..{aug.scales[-1]} (max {aug.max_size}), batch {args.batch}, {args.workers} workers")
    print(f"{'fallback img/s':>15} {'DALI img/s':>11} {'DALI/fallback':>14} {'decode-only img/s':>18}")
    print(f"{t_fallback:15.1f} {t_dali:11.1f} {t_dali / t_fallback:14.2f} {decode_only:18.1f}")


if __name__ == "__main__":
    main()
