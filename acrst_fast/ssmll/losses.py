"""Focal binary cross-entropy for multi-label targets (Lin et al. 2017, applied per class).

    FL(p, y) = -[ y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p) ],  p = sigmoid(logit)

averaged over images and classes. gamma = 0 is plain BCE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def focal_bce(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, mask: torch.Tensor | None = None,
              pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """logits, targets: Tensor[B, K] (targets in {0, 1}, or soft in [0, 1]). Returns a scalar: the mean
    over the entries where `mask` (Tensor[B, K] bool; default all) is set. pos_weight: Tensor[K], a
    weight on each class's positive term (class rebalancing; default 1).

    Numerically stable: log p and log(1 - p) come from logsigmoid, so large logits stay finite.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos = targets * (1 - p).pow(gamma) * log_p
    if pos_weight is not None:
        pos = pos * pos_weight.to(logits)
    loss = -(pos + (1 - targets) * p.pow(gamma) * log_not_p)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def focal_bce_ref(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, mask: torch.Tensor | None = None,
                  pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, element by element in float64 Python floats (tests only), with
    log p = -softplus(-z) and log(1 - p) = -softplus(z) so saturated logits stay exact."""
    k = logits.shape[-1]
    mask = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask
    weights = [1.0] * k if pos_weight is None else pos_weight.double().tolist()
    total, n = 0.0, 0
    for i, (z, y, m) in enumerate(zip(logits.double().flatten().tolist(), targets.double().flatten().tolist(),
                                      mask.flatten().tolist())):
        if not m:
            continue
        log_p, log_not_p = -_softplus(-z), -_softplus(z)
        p = math.exp(log_p)
        total += -(weights[i % k] * y * (1 - p) ** gamma * log_p + (1 - y) * p ** gamma * log_not_p)
        n += 1
    return torch.tensor(total / max(1, n), dtype=torch.float64)
