"""Benchmark: the teacher's EMA update, fused (`EmaPlan.apply`, as training runs it) vs the per-tensor
reference vs the memory roofline.

    python bench/ema.py [--device auto] [--backbone resnet50] [--trainable-layers 3] [--no-frozen-bn] [--repeat 20]

Builds the detector of the paper configs (Faster R-CNN, ResNet-50 FPN, 80 classes; random weights; by default
as the paper trains it: FrozenBatchNorm2d and the stem and first stage frozen, i.e. 3 trainable stages) as
student and teacher, and prints median milliseconds of
- fused: `EmaPlan.apply` (one `_foreach_lerp_` per dtype over the trainable float parameters, one
  `_foreach_copy_` per dtype over the buffers training changes; frozen tensors skipped; planned once);
- the bf16 compute copy's refresh (`EmaTeacher(compute_dtype=bf16)`: the teacher's conv/linear weights);
- ref: `ema_update_ref` (a mul_/add_ pair per parameter, a copy_ per buffer, frozen ones included);
- copy: a plain copy moving the bytes the fused update must move (it reads teacher and student and writes
  the teacher: 3 x the averaged bytes, plus 2 x the copied buffer bytes).
copy/fused is the fraction of the roofline the fused update reaches (the target is >= 0.8 on a GPU).
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from _timing import copy_ms, describe, median_ms, pick_device
from acrst_fast.config import ModelConfig
from acrst_fast.engine.ema import EmaPlan, EmaTeacher, ema_update_ref
from acrst_fast.models.detector import build_detector


def frozen_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with its statistics (what ImageNet weights give)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, k).copy_(getattr(child, k).detach())
            setattr(module, name, frozen)
        else:
            frozen_bn(child)
    return module


def _bytes(groups) -> int:
    return sum(t.numel() * t.element_size() for ts, _ in groups for t in ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet50", choices=["resnet50", "resnet18", "mobilenet_v2"])
    ap.add_argument("--trainable-layers", type=int, default=3)
    ap.add_argument("--no-frozen-bn", action="store_true", help="trainable BatchNorm (random-init configs)")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    device = pick_device(args.device)
    student = build_detector(ModelConfig(backbone=args.backbone, trainable_backbone_layers=args.trainable_layers), 80)
    if not args.no_frozen_bn:
        frozen_bn(student)
    student = student.to(device)
    teacher = copy.deepcopy(student)
    plan = EmaPlan.build(teacher, student)
    ema = EmaTeacher(student, 0.9996, compute_dtype=torch.bfloat16)
    averaged, copied = _bytes(plan.lerp), _bytes(plan.copy)
    moved = 3 * averaged + 2 * copied
    t_fast = median_ms(lambda: plan.apply(0.9996), args.repeat, device)
    t_cast = median_ms(lambda: ema._refresh(ema._compute_live), args.repeat, device)
    t_ref = median_ms(lambda: ema_update_ref(teacher, student, 0.9996), args.repeat, device)
    t_copy = copy_ms(moved, args.repeat, device)
    n_lerp = sum(len(t) for t, _ in plan.lerp)
    print(f"EMA on {describe(device)}: {args.backbone} detector, {'FrozenBN' if not args.no_frozen_bn else 'BatchNorm'}, "
          f"{args.trainable_layers} trainable stages: {n_lerp} averaged tensors ({averaged / 2**20:.0f} MiB) in "
          f"{len(plan.lerp)} group(s), {sum(len(t) for t, _ in plan.copy)} copied buffers in {len(plan.copy)}, "
          f"{plan.skipped} frozen tensors skipped")
    print(f"{'fused ms':>9} {'bf16 copy ms':>13} {'ref ms':>9} {'copy ms':>9} {'ref/fused':>10} {'copy/fused':>11} "
          f"{'GB/s fused':>11}")
    print(f"{t_fast:9.3f} {t_cast:13.3f} {t_ref:9.3f} {t_copy:9.3f} {t_ref / t_fast:10.2f} {t_copy / t_fast:11.2f} "
          f"{moved / t_fast / 1e6:11.1f}")


if __name__ == "__main__":
    main()
