"""The RoI heads' detections for a whole batch with no host read: torchvision's `postprocess_detections`
(softmax, decode, clip, score threshold, small boxes, per-class NMS, the best `detections_per_img`) as
fixed-shape tensors with a valid mask, where torchvision shrinks tensors image by image (three reads each).

Segments of the NMS are (image, class): every proposal's box for that class (`kernels/nms.py`). Returns
boxes Tensor[N, D, 4] (x1, y1, x2, y2, canvas pixels), scores Tensor[N, D], labels Tensor[N, D] int64 (1..K)
and valid Tensor[N, D] bool, D = min(detections_per_img, proposals x K): image n's valid entries, first and in
order, are torchvision's detections of image n, up to the order of equal scores (tests/test_batched_rpn.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from acrst_fast.kernels.nms import nms_segments
from acrst_fast.models.batched_rpn import best_kept, clip_to_images


def _padded(t: torch.Tensor, sizes: list[int], rows: int, value: float) -> torch.Tensor:
    """Tensor[sum sizes, ...] -> Tensor[N, rows, ...], each image's rows padded with `value`."""
    parts = t.split(sizes)
    pad = [0, 0] * (t.dim() - 1)
    return torch.stack([F.pad(p, pad + [0, rows - len(p)], value=value) for p in parts])


def postprocess_detections_batched(heads, class_logits: torch.Tensor, box_regression: torch.Tensor,
                                   proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]],
                                   nms=nms_segments) -> tuple[torch.Tensor, ...]:
    """`heads.postprocess_detections` (same settings) as fixed-shape tensors (module doc). class_logits:
    Tensor[R, C] over all images' proposals (R = sum R_i), box_regression: Tensor[R, 4 C]."""
    sizes = [int(p.shape[0]) for p in proposals]  # host shapes
    n, r, c = len(sizes), max(sizes, default=0), class_logits.shape[-1]
    device = class_logits.device
    if r == 0:  # no proposal in any image: no detection
        return (torch.zeros(n, 0, 4, device=device), torch.zeros(n, 0, device=device),
                torch.zeros(n, 0, dtype=torch.int64, device=device), torch.zeros(n, 0, dtype=torch.bool, device=device))
    decoded = heads.box_coder.decode(box_regression, proposals).reshape(-1, c, 4)
    boxes = clip_to_images(_padded(decoded, sizes, r, 0.0)[:, :, 1:], image_shapes)  # [N, r, K, 4]
    scores = _padded(F.softmax(class_logits, -1), sizes, r, -1.0)[:, :, 1:]  # [N, r, K]; padding under thresh
    ok = (scores > heads.score_thresh) & (boxes[..., 2] - boxes[..., 0] >= 1e-2) & (boxes[..., 3] - boxes[..., 1] >= 1e-2)
    k = c - 1
    seg = (boxes.permute(0, 2, 1, 3).reshape(n * k, r, 4), scores.permute(0, 2, 1).reshape(n * k, r),
           ok.permute(0, 2, 1).reshape(n * k, r))
    keep = nms(*seg, heads.nms_thresh).reshape(n, k, r).permute(0, 2, 1)  # [N, r, K], torchvision's layout
    ranked = torch.where(keep, scores, float("-inf")).reshape(n, r * k)
    d = min(heads.detections_per_img, r * k)
    best, idx, valid = best_kept(ranked, d)
    return boxes.reshape(n, r * k, 4).gather(1, idx[..., None].expand(n, d, 4)), best, idx % k + 1, valid
