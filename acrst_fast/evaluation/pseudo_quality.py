"""Pseudo-label quality against the hidden ground truth of unlabeled images (the logged `pseudo/` metrics):
true positives, pseudo-labels and ground truths per class, from one-to-one, class-aware matching.

This is not the VOC AP matcher of `coco_eval.voc_ap50` on purpose: VOC's rule matches a detection to its
best-overlapping ground truth only (taken already: a false positive), crowd boxes aside; here a pseudo-label
takes the best still-free ground truth, which is what "how many of the teacher's labels are right" counts.
"""
from __future__ import annotations

import numpy as np
import torch

from acrst_fast.ops import box_iou_ref


def match_counts(pseudo: list[dict[str, torch.Tensor]], gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor],
                 num_classes: int, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class k = 1..K (index k - 1): (true positives, pseudo-labels, ground truths), int64[K] each.
    One-to-one, class-aware matching at IoU >= `iou`, pseudo-labels taken by decreasing score.
    Precision_k = tp_k / pseudo-labels_k, recall_k = tp_k / ground truths_k."""
    labels = [int(x) for p in pseudo for x in p["labels"].tolist()] + [int(x) for g in gt_labels for x in g.tolist()]
    k = max([num_classes, *labels])  # a label beyond num_classes widens the counts rather than failing
    tp, n_pl, n_gt = (np.zeros(k, dtype=np.int64) for _ in range(3))
    for p, gb, gl in zip(pseudo, gt_boxes, gt_labels):
        gb, gl = gb.to(p["boxes"].device), gl.to(p["boxes"].device)
        np.add.at(n_pl, p["labels"].cpu().numpy().astype(np.int64) - 1, 1)
        np.add.at(n_gt, gl.cpu().numpy().astype(np.int64) - 1, 1)
        if len(p["boxes"]) == 0 or len(gb) == 0:
            continue
        ious = box_iou_ref(p["boxes"].float(), gb.float())
        ious[p["labels"][:, None] != gl[None, :]] = 0.0
        used = torch.zeros(len(gb), dtype=torch.bool, device=gb.device)
        for i in torch.argsort(p["scores"], descending=True).tolist():
            cand = ious[i].masked_fill(used, 0.0)
            j = int(torch.argmax(cand))
            if cand[j] >= iou:
                used[j] = True
                tp[int(p["labels"][i]) - 1] += 1
    return tp, n_pl, n_gt
