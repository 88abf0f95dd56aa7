"""Targets in, targets out: a rebalanced target dict keeps every per-box field of the caller's.

After a paste, an image's boxes are its own boxes that stayed visible (in their order), then the
pasted ones (`merge_boxes`). `source_index` (int64 Tensor[M]) says where each came from: the row of
the input target, or -1 for a pasted box. Every per-box field of the input (scores, iscrowd, area,
mmdet's reg_uncs, masks: any tensor with one row per box) is gathered by it; pasted rows get a fill
value (`fill`, default: `DEFAULT_FILL`; `area` defaults to the pasted box's own area). Masks are
re-aligned, not redrawn: a pasted row gets the fill (zeros), and an own mask is not cut where a
paste covers it.
"""
from __future__ import annotations

import warnings
import weakref

import numpy as np
import torch

# keys that describe the image, never a box, even when their length happens to equal the box count
PER_IMAGE_KEYS = frozenset({"image_id", "orig_size", "size", "img_shape", "ori_shape", "pad_shape", "scale_factor",
                            "height", "width", "file_name"})
OWN_KEYS = frozenset({"boxes", "labels", "reg_weight", "source_index"})
DEFAULT_FILL = {"scores": 1.0}  # a pasted crop is an annotation (or a kept pseudo-label): full confidence


def survivor_index(own_boxes: np.ndarray, merged: torch.Tensor, pasted: torch.Tensor) -> np.ndarray:
    """int64[M] source index of each merged box: its row in `own_boxes` (float32[N, 4], the boxes the
    planner was given), -1 where `pasted` (bool Tensor[M]). The merge keeps own boxes in order and
    copies them exactly, and identical boxes share their fate, so an in-order match is exact."""
    out = np.full(len(merged), -1, dtype=np.int64)
    own_rows = np.flatnonzero(~pasted.numpy())
    kept = merged.numpy()[own_rows]
    j = 0
    for row, box in zip(own_rows, kept):
        while j < len(own_boxes) and not np.array_equal(own_boxes[j], box):
            j += 1
        if j == len(own_boxes):
            raise AssertionError("merge_boxes returned a box that is not among the image's own boxes")
        out[row] = j
        j += 1
    return out


def per_box_keys(call: str, where: str, target: dict, n: int, per_box) -> list[str]:
    """The fields of `target` to re-align: `per_box` when given (each checked), else every tensor with
    one row per box outside `PER_IMAGE_KEYS`."""
    if per_box is None:
        return [k for k, v in target.items() if k not in OWN_KEYS and k not in PER_IMAGE_KEYS
                and isinstance(v, torch.Tensor) and v.dim() >= 1 and len(v) == n]
    for k in per_box:
        v = target.get(k)
        if not isinstance(v, torch.Tensor) or v.dim() < 1 or len(v) != n:
            got = "missing" if v is None else (tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__)
            raise ValueError(f"{call}: {where}[{k!r}] must be a tensor with one row per box ({n}), got {got}")
    return list(per_box)


def realign(key: str, value: torch.Tensor, source: torch.Tensor, boxes_xyxy: torch.Tensor, fill: dict) -> torch.Tensor:
    """`value` (Tensor[N, ...]) re-aligned to the merged boxes by `source` (int64 Tensor[M], -1 pasted)."""
    src = source.to(value.device)
    gathered = value[src.clamp(min=0)] if len(value) else value.new_zeros((len(src), *value.shape[1:]))
    if key == "area" and key not in fill:
        wh = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).to(value.device)
        filler = (wh[:, 0] * wh[:, 1]).to(value.dtype).reshape(-1, *[1] * (value.dim() - 1))
    else:
        filler = torch.as_tensor(fill.get(key, DEFAULT_FILL.get(key, 0)), dtype=value.dtype, device=value.device)
    pasted = (src < 0).reshape(-1, *[1] * (value.dim() - 1))
    return torch.where(pasted, filler, gathered)


_WARNED: "weakref.WeakSet" = weakref.WeakSet()


def warn_if_reg_weight_ignored(model) -> None:
    """Warn once per model when it is a torchvision two-stage detector whose heads ignore `reg_weight`."""
    if model is None:
        return
    model = getattr(model, "module", model)  # DistributedDataParallel
    rpn, roi = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
    if rpn is None or roi is None or model in _WARNED:
        return
    from acrst_fast.models.weighted_heads import WeightedRoIHeads, WeightedRPN  # only for torchvision detectors

    if not (isinstance(rpn, WeightedRPN) and isinstance(roi, WeightedRoIHeads)):
        _WARNED.add(model)
        warnings.warn(f"{type(model).__name__}'s heads ({type(rpn).__name__}, {type(roi).__name__}) ignore "
                      "'reg_weight': selective supervision has no effect; call "
                      "acrst_fast.augment.enable_box_weights(model) once after building it", stacklevel=3)
