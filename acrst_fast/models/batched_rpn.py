"""The RPN's proposal filter for a whole batch with no host read: padded proposals with a valid mask.

torchvision's `RegionProposalNetwork.filter_proposals` loops over the images and shrinks tensors by data
(small boxes, the score threshold, `batched_nms`, whose output size the host reads): several
synchronisations per image. Here every step keeps its shape and marks what torchvision would drop:

1. per level, the top `pre_nms_top_n` anchors by objectness (torchvision's `_get_top_n_idx`);
2. clip to each image's size (device constants), mark boxes narrower or shorter than `min_size` and scores
   under `score_thresh` invalid;
3. NMS per (image, level) segment (`kernels/nms.py`: the Triton kernel on CUDA, torchvision's `nms`
   elsewhere);
4. the `post_nms_top_n` kept proposals of highest score per image, in decreasing score (equal scores in
   candidate order; torchvision's unstable sort may order them otherwise, and its samplers then draw other
   proposals).

Returns boxes Tensor[N, P, 4] (x1, y1, x2, y2, canvas pixels), scores Tensor[N, P] (objectness
probabilities) and valid Tensor[N, P] bool, P = min(post_nms_top_n, candidates): image n's valid entries,
in order, are torchvision's proposals of image n, up to the order of equal scores (tests/test_batched_rpn.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import RegionProposalNetwork

from acrst_fast.host import upload
from acrst_fast.kernels.nms import nms_segments


def clip_to_images(boxes: torch.Tensor, image_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """torchvision's `clip_boxes_to_image` for a batch: boxes Tensor[N, ..., 4] (x1, y1, x2, y2), those of image
    n clipped to image_shapes[n] = (h, w), the sizes uploaded once."""
    hw = upload(torch.tensor(image_shapes, dtype=torch.float32).reshape(-1, 2), boxes.device)
    shape = (-1,) + (1,) * (boxes.dim() - 1)
    x = boxes[..., 0::2].clamp(min=0).minimum(hw[:, 1].view(shape))
    y = boxes[..., 1::2].clamp(min=0).minimum(hw[:, 0].view(shape))
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def best_kept(score: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `count` best entries of each row of score (Tensor[N, M], -inf where dropped), in decreasing score as
    torchvision's batched_nms orders its kept indices (equal scores in position order: a stable sort).
    Returns (scores, 0 where invalid; indices into M; valid), each Tensor[N, count]."""
    best, idx = (t[:, :count] for t in torch.sort(score, dim=1, descending=True, stable=True))
    valid = best > float("-inf")
    return torch.where(valid, best, 0.0), idx, valid


def filter_proposals_batched(rpn: RegionProposalNetwork, proposals: torch.Tensor, objectness: torch.Tensor,
                             image_shapes: list[tuple[int, int]], num_anchors_per_level: list[int],
                             nms=nms_segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rpn.filter_proposals` (same settings) as fixed-shape tensors (module doc). proposals: Tensor[N, A, 4]
    decoded boxes; objectness: Tensor[N * A, 1] or [N, A] logits; num_anchors_per_level: host ints."""
    n = proposals.shape[0]
    device = proposals.device
    logits = objectness.detach().reshape(n, -1)
    top = rpn._get_top_n_idx(logits, num_anchors_per_level)  # [N, sum_l k_l], level by level
    ks = [min(rpn.pre_nms_top_n(), a) for a in num_anchors_per_level]  # host: each level's k_l
    k = max(ks)
    rows = torch.arange(n, device=device)[:, None]
    boxes_all, prob_all = proposals[rows, top], torch.sigmoid(logits[rows, top])
    boxes_all = clip_to_images(boxes_all, image_shapes)
    wide = (boxes_all[..., 2] - boxes_all[..., 0] >= rpn.min_size) & (boxes_all[..., 3] - boxes_all[..., 1] >= rpn.min_size)
    ok_all = wide & (prob_all >= rpn.score_thresh)
    seg_boxes, seg_prob, seg_ok, at = [], [], [], 0
    for kl in ks:  # each level's candidates, padded to k: segments [N, L, k]
        pad = k - kl
        seg_boxes.append(F.pad(boxes_all[:, at:at + kl], (0, 0, 0, pad)))
        seg_prob.append(F.pad(prob_all[:, at:at + kl], (0, pad), value=float("-inf")))
        seg_ok.append(F.pad(ok_all[:, at:at + kl], (0, pad), value=False))
        at += kl
    boxes, prob, ok = (torch.stack(t, dim=1) for t in (seg_boxes, seg_prob, seg_ok))
    levels = len(ks)
    keep = nms(boxes.reshape(n * levels, k, 4), prob.reshape(n * levels, k), ok.reshape(n * levels, k), rpn.nms_thresh)
    score = torch.where(keep.reshape(n, levels * k), prob.reshape(n, levels * k), float("-inf"))
    p = min(rpn.post_nms_top_n(), levels * k)
    best, idx, valid = best_kept(score, p)
    return boxes.reshape(n, levels * k, 4).gather(1, idx[..., None].expand(n, p, 4)), best, valid
