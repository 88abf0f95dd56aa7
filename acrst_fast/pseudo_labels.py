"""Pseudo-label filtering of teacher detections (paper Eq. 3 and "Two-stage Pseudo-label Filtering").

    pseudo = filter_pseudo_labels(predictions, tau_cls)                                   # single stage
    pseudo = filter_pseudo_labels(predictions, tau_cls, probs, mode="two_stage", tau_ml=0.2)
    pseudo = filter_pseudo_labels(predictions, tau_cls, probs, mode="mining", tau_pos=0.7)

predictions: list (one per image) of dicts with boxes Tensor[N, 4] (x1, y1, x2, y2), labels
Tensor[N] int64 1..K, scores Tensor[N]. probs: Tensor[B, K], the image-level classifier's
probabilities (class k at column k - 1).

- single:    keep score >= tau_cls.
- two_stage: stage 1 as single; stage 2 drops predictions whose class the classifier marks
             negative (probability < tau_ml).
- mining:    keep score >= tau_cls, or classifier-positive class (probability >= tau_pos) with
             score >= mining_min_score (Table 10's alternative; more recall, less precision).
"""
from __future__ import annotations

import torch

from acrst_fast.host import upload
from acrst_fast.modes import FILTER_MODES

MODES = FILTER_MODES


def filter_pseudo_labels(predictions: list[dict[str, torch.Tensor]], tau_cls: float,
                         image_probs: torch.Tensor | None = None, mode: str = "single", tau_ml: float = 0.2,
                         tau_pos: float = 0.7, mining_min_score: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """The kept predictions, detached, per image (same dict keys), in their original order.

    Vectorised over the batch with one host read (the kept count of each image); the kept rows are
    gathered with `nonzero_static`, so no other call waits for the device.
    """
    if mode not in MODES:
        raise ValueError(f"pseudo-label filter mode must be one of {', '.join(MODES)}; got '{mode}'")
    if mode != "single":
        if image_probs is None:
            raise ValueError(f"pseudo-label filter mode '{mode}' needs the classifier's image_probs")
        if image_probs.dim() != 2 or len(image_probs) != len(predictions):
            raise ValueError(f"image_probs must be Tensor[{len(predictions)}, K], got {tuple(image_probs.shape)}")
    if not predictions:
        return []
    sizes = [len(p["scores"]) for p in predictions]
    device = predictions[0]["scores"].device
    boxes = torch.cat([p["boxes"].detach().reshape(-1, 4) for p in predictions])
    labels = torch.cat([p["labels"].detach() for p in predictions])
    scores = torch.cat([p["scores"].detach() for p in predictions])
    image = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                    upload(torch.tensor(sizes), device), output_size=sum(sizes))
    keep = scores >= tau_cls
    bad = torch.zeros((), dtype=torch.int64, device=device)
    if mode != "single" and len(labels):
        k = image_probs.shape[1]
        bad = ((labels < 1) | (labels > k)).sum()
        cls_prob = image_probs.to(device)[image, (labels - 1).clamp(0, k - 1)]
        if mode == "two_stage":
            keep = keep & (cls_prob >= tau_ml)
        else:
            keep = keep | ((cls_prob >= tau_pos) & (scores >= mining_min_score))
    per_image = torch.zeros(len(sizes), dtype=torch.int64, device=device).index_add_(0, image, keep.long())
    counts = torch.cat([per_image, bad[None]]).tolist()  # the one host read
    if counts[-1]:
        raise ValueError(f"prediction labels must lie in 1..{image_probs.shape[1]}")
    counts = counts[:-1]
    idx = torch.nonzero_static(keep, size=sum(counts)).flatten()
    kept = {"boxes": boxes[idx], "labels": labels[idx], "scores": scores[idx]}
    parts = {key: value.split(counts) for key, value in kept.items()}
    return [{key: parts[key][i] for key in predictions[i] if key in parts} for i in range(len(sizes))]
