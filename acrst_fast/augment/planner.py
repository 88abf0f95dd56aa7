"""Batched paste planning through the C++ extension, with the Python reference as fallback.

`plan_paste` and `merge_pastes` take and return what `plan_paste_ref` / `merge_pastes_ref` do
(paste.py states the conventions) and give the same plan for the same draws: the randomness is
drawn once per batch by `draw_uniforms` and the C++ code does the rest in one call. Without the
compiled extension they warn once and run the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from acrst_fast import _ext
from acrst_fast.host import mark_host, to_host
from acrst_fast.augment.paste import PasteConfig, PastePlan, draw_uniforms, merge_pastes_ref, plan_paste_ref


def _image_inputs(image_hw, boxes, labels, *more: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The planner's per-image inputs as NumPy (hw int64[N, 2], boxes float32[M, 4], labels int64[M],
    counts int64[N]), then `more` as float64 NumPy: all device-side values in one host read."""
    if not (len(image_hw) == len(boxes) == len(labels)):
        raise ValueError(f"plan_paste: {len(image_hw)} image sizes, {len(boxes)} box tensors and {len(labels)} "
                         "label tensors; they must match")
    hw = np.asarray([[int(h), int(w)] for h, w in image_hw], dtype=np.int64).reshape(-1, 2)
    read = to_host(*boxes, *labels, *more)  # one read for everything on the device
    n = len(boxes)
    flat = np.concatenate([r.reshape(-1, 4) for r in read[:n]]).astype(np.float32) if n else np.zeros((0, 4), np.float32)
    lab = np.concatenate([r.reshape(-1) for r in read[n:2 * n]]).astype(np.int64) if n else np.zeros(0, np.int64)
    counts = np.asarray([r.size // 4 for r in read[:n]], dtype=np.int64)
    return (hw, flat.reshape(-1, 4), lab, counts, *read[2 * n:])


def _to_plan(out: tuple) -> PastePlan:
    ops, boxes, labels, pasted, counts = out
    sizes = counts.tolist()
    return PastePlan(mark_host(torch.from_numpy(ops)), list(torch.from_numpy(boxes).split(sizes)),
                     list(torch.from_numpy(labels).split(sizes)), list(torch.from_numpy(pasted).split(sizes)))


def plan_paste(image_hw: list[tuple[int, int]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
               bank_slots: torch.Tensor, bank_classes: torch.Tensor, bank_size_hw: torch.Tensor,
               class_probs: torch.Tensor, cfg: PasteConfig, generator: torch.Generator | None = None,
               draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> PastePlan:
    """The whole batch's plan in one C++ call; see `plan_paste_ref` for the arguments.

    Returns a PastePlan whose tensors are on the CPU. Raises ValueError naming the image and box
    for non-finite or inverted boxes, and for inputs whose lengths do not match.
    """
    if draws is None:
        draws = draw_uniforms(len(image_hw), cfg, generator)
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
        return plan_paste_ref(image_hw, boxes, labels, bank_slots, bank_classes, bank_size_hw, class_probs, cfg,
                              draws=draws)
    bank = [mark_host(torch.from_numpy(x)) if isinstance(x, np.ndarray) else x  # host arrays: no read
            for x in (bank_slots, bank_classes, bank_size_hw)]
    hw, flat, lab, counts, slots, classes, size_hw, probs, n_draw, uniforms = _image_inputs(
        image_hw, boxes, labels, *bank, torch.as_tensor(class_probs), *draws)
    out = _ext._C.plan_paste(
        hw, flat, lab, counts, slots.astype(np.int64), classes.astype(np.int64), size_hw.astype(np.float32),
        probs.astype(np.float64), n_draw.astype(np.int64), uniforms.astype(np.float64),
        cfg.scale_min, cfg.scale_max, cfg.flip_prob, cfg.min_size, cfg.visibility_threshold)
    return _to_plan(out)


def merge_pastes(image_hw: list[tuple[int, int]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                 ops: torch.Tensor, op_labels: torch.Tensor, min_size: int, visibility_threshold: float) -> PastePlan:
    """Given placements (op table Tensor[P, 7] grouped by image, op_labels Tensor[P] 1..K): drop
    pastes smaller than `min_size` after clipping, merge boxes with occlusion removal. Raises
    ValueError naming the op for a crop larger than its image or ops out of image order."""
    if not _ext.HAS_EXT:
        _ext.warn_fallback()
        return merge_pastes_ref(image_hw, boxes, labels, ops, op_labels, min_size, visibility_threshold)
    hw, flat, lab, counts, ops_np, op_labels_np = _image_inputs(image_hw, boxes, labels, ops, op_labels)
    out = _ext._C.merge_pastes(hw, flat, lab, counts, ops_np.reshape(-1, 7).astype(np.int64),
                               op_labels_np.reshape(-1).astype(np.int64),
                               min_size, visibility_threshold)
    return _to_plan(out)
