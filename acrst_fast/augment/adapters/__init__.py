"""ACRST for the two most used SSOD code bases, on their own data structures.

- `Detectron2ACRST`: detectron2 / Unbiased Teacher (dataset dicts with a uint8 BGR CHW `image` and
  `instances`: `Instances` with `gt_boxes` (`Boxes`, xyxy) and 0-based `gt_classes`).
- `MMDetACRST`: mmdetection's SemiBaseDetector / SoftTeacher (a normalised, padded `Tensor[B, 3, H, W]`
  batch and `DetDataSample`s whose `gt_instances` is mmengine's `InstanceData`, 0-based `labels`).

Neither imports its framework: they read and rebuild the structures they are given (`type(x)(...)`),
so they load without detectron2 or mmdet installed and follow whatever version the caller runs.
"""
from __future__ import annotations

__all__ = ["Detectron2ACRST", "MMDetACRST"]


def __getattr__(name: str):
    if name == "Detectron2ACRST":
        from acrst_fast.augment.adapters.detectron2 import Detectron2ACRST

        return Detectron2ACRST
    if name == "MMDetACRST":
        from acrst_fast.augment.adapters.mmdet import MMDetACRST

        return MMDetACRST
    raise AttributeError(f"module 'acrst_fast.augment.adapters' has no attribute {name!r}")
