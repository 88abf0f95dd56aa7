"""Shared by bench/train_step.py's paper mode: torchvision's stock Faster R-CNN training step, counted FLOPs,
the device's measured matmul peak, and a ResNet-50 "ImageNet-format" weights file with calibrated statistics.

- `stock_detector`: `fasterrcnn_resnet50_fpn` exactly as torchvision builds it for ImageNet backbone weights
  (FrozenBatchNorm2d, 3 trainable stages, its own GeneralizedRCNNTransform 800 / 1333, 91 COCO ids), random
  weights. The engine most SSOD code bases build on.
- `count_flops(fn)`: FLOPs of the aten matmuls and convolutions `fn` runs, forward and backward
  (`torch.utils.flop_counter.FlopCounterMode`; RoIAlign, NMS and elementwise work are not counted, so the
  floor is a lower bound).
- `peak_flops(device, dtype)`: FLOP/s of a large square matmul in `dtype`, measured now.
- `calibrated_resnet50(path)`: a torchvision-layout ResNet-50 state dict whose BatchNorm statistics are
  those of one random batch, so that the engine's ImageNet-weights path (FrozenBatchNorm2d, like the paper)
  runs with activations of a sane scale. Only the numbers are random; the compute is the paper's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


def calibrated_resnet50(path: Path, seed: int = 0) -> Path:
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    net = resnet50(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics = this batch's
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 224, 224))
    torch.save(net.state_dict(), path)
    return path


def stock_detector(device: torch.device, weights: Path | None = None, min_size: int = 800,
                   max_size: int = 1333) -> nn.Module:
    """torchvision 0.29's `fasterrcnn_resnet50_fpn(weights_backbone=IMAGENET1K_V1, num_classes=91)`, built the
    same way without the download (optionally from the calibrated backbone file); its transform resizes to
    min_size / max_size (torchvision's 800 / 1333 by default)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    backbone = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
    if weights is not None:
        backbone.load_state_dict(torch.load(weights, weights_only=True), strict=False)
    return FasterRCNN(_resnet_fpn_extractor(backbone, 3), num_classes=91, min_size=min_size,
                      max_size=max_size).to(device)


def stock_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: list[torch.Tensor],
               targets: list[dict[str, torch.Tensor]], dtype: torch.dtype | None) -> None:
    """One supervised training step as torchvision's detection reference trains (autocast, sum of losses)."""
    model.train()
    with torch.autocast(images[0].device.type, dtype=dtype, enabled=dtype is not None):
        losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, dtype: torch.dtype, n: int = 0, repeat: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device` (n: 8192 on CUDA, 1024 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeat / (time.perf_counter() - t0)
