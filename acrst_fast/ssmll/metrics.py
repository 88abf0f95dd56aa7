"""Image-level labels from boxes, and the quality of negative image-level pseudo-labels (Table 9)."""
from __future__ import annotations

import torch


def image_labels(labels: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """Per-image box labels (Tensor[N_i] int64, 1..K) -> multi-hot Tensor[B, K] float32."""
    out = torch.zeros((len(labels), num_classes), dtype=torch.float32)
    for i, lab in enumerate(labels):
        if len(lab):
            out[i, lab.long().cpu() - 1] = 1.0
    return out


def negative_metrics(probs: torch.Tensor, targets: torch.Tensor, tau: float) -> dict[str, float]:
    """A class is predicted negative for an image when its probability is < tau.

    negative accuracy = truly absent among predicted negative (TN / (TN + FN));
    negative recall   = predicted negative among truly absent (TN / (TN + FP)).
    probs, targets: Tensor[B, K]. Undefined ratios (empty denominators) are NaN.
    """
    neg_pred = probs < tau
    absent = targets < 0.5
    tn = float((neg_pred & absent).sum())
    n_pred, n_absent = float(neg_pred.sum()), float(absent.sum())
    return {"neg_accuracy": tn / n_pred if n_pred else float("nan"),
            "neg_recall": tn / n_absent if n_absent else float("nan"),
            "true_negative": tn, "neg_predicted": n_pred, "absent": n_absent}
