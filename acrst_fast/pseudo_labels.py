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

MODES = ("single", "two_stage", "mining")


def filter_pseudo_labels(predictions: list[dict[str, torch.Tensor]], tau_cls: float,
                         image_probs: torch.Tensor | None = None, mode: str = "single", tau_ml: float = 0.2,
                         tau_pos: float = 0.7, mining_min_score: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """The kept predictions, detached, per image (same dict keys)."""
    if mode not in MODES:
        raise ValueError(f"pseudo-label filter mode must be one of {', '.join(MODES)}; got '{mode}'")
    if mode != "single":
        if image_probs is None:
            raise ValueError(f"pseudo-label filter mode '{mode}' needs the classifier's image_probs")
        if image_probs.dim() != 2 or len(image_probs) != len(predictions):
            raise ValueError(f"image_probs must be Tensor[{len(predictions)}, K], got {tuple(image_probs.shape)}")
    out = []
    for i, p in enumerate(predictions):
        keep = p["scores"] >= tau_cls
        if mode != "single" and len(p["labels"]):
            if int(p["labels"].max()) > image_probs.shape[1] or int(p["labels"].min()) < 1:
                raise ValueError(f"image {i}: prediction labels must lie in 1..{image_probs.shape[1]}")
            cls_prob = image_probs[i].to(p["scores"].device)[p["labels"] - 1]
            if mode == "two_stage":
                keep = keep & (cls_prob >= tau_ml)
            else:
                keep = keep | ((cls_prob >= tau_pos) & (p["scores"] >= mining_min_score))
        out.append({k: v[keep].detach() for k, v in p.items() if k in ("boxes", "labels", "scores")})
    return out
