"""Benchmark: the teacher's EMA update, fused (`ema_update`) vs per-parameter reference vs roofline.

    python bench/ema.py [--device auto] [--backbone resnet50] [--repeat 20]

Builds the detector of the paper configs (Faster R-CNN, ResNet-50 FPN, 80 classes; random
weights) as student and teacher and prints median milliseconds of `ema_update` (one
torch._foreach_lerp_ over all float parameters, then the buffers copied), `ema_update_ref` (a
mul_/add_ pair per parameter) and the memory roofline: a plain copy moving the same 3 x
parameter bytes (the update reads teacher and student and writes the teacher), with the ratios.
copy/fused is the fraction of the roofline the fused update reaches.
"""
from __future__ import annotations

import argparse
import copy

import torch

from _timing import copy_ms, describe, median_ms, pick_device
from acrst_fast.config import ModelConfig
from acrst_fast.engine.ema import ema_update, ema_update_ref
from acrst_fast.models.detector import build_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet18", "mobilenet_v2"])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    device = pick_device(args.device)
    student = build_detector(ModelConfig(backbone=args.backbone, trainable_backbone_layers=5), 80).to(device)
    teacher = copy.deepcopy(student)
    params = [p for p in student.parameters() if p.is_floating_point()]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    t_fast = median_ms(lambda: ema_update(teacher, student, 0.9996), args.repeat, device)
    t_ref = median_ms(lambda: ema_update_ref(teacher, student, 0.9996), args.repeat, device)
    t_copy = copy_ms(3 * nbytes, args.repeat, device)
    print(f"EMA on {describe(device)}: {args.backbone} detector, {len(params)} tensors, "
          f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters ({nbytes / 2**20:.0f} MiB)")
    print(f"{'fused ms':>9} {'ref ms':>9} {'copy ms':>11} {'ref/fused':>10} {'copy/fused':>11} {'GB/s fused':>11}")
    print(f"{t_fast:9.3f} {t_ref:9.3f} {t_copy:11.3f} {t_ref / t_fast:10.2f} {t_copy / t_fast:11.2f} "
          f"{3 * nbytes / t_fast / 1e6:11.1f}")


if __name__ == "__main__":
    main()
