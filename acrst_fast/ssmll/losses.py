"""Focal binary cross-entropy for multi-label targets (Lin et al. 2017, applied per class).

    FL(p, y) = -[ y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p) ],  p = sigmoid(logit)

averaged over images and classes. gamma = 0 is plain BCE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def focal_bce(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """logits, targets: Tensor[B, K] (targets in {0, 1}, or soft in [0, 1]). Returns a scalar.

    Numerically stable: log p and log(1 - p) come from logsigmoid, so large logits stay finite.
    """
    logits = logits.float()
    targets = targets.to(logits.dtype)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    loss = -(targets * (1 - p).pow(gamma) * log_p + (1 - targets) * p.pow(gamma) * log_not_p)
    return loss.mean()


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def focal_bce_ref(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The definition, element by element in float64 Python floats (tests only), with
    log p = -softplus(-z) and log(1 - p) = -softplus(z) so saturated logits stay exact."""
    total, n = 0.0, 0
    for z, y in zip(logits.double().flatten().tolist(), targets.double().flatten().tolist()):
        log_p, log_not_p = -_softplus(-z), -_softplus(z)
        p = math.exp(log_p)
        total += -(y * (1 - p) ** gamma * log_p + (1 - y) * p ** gamma * log_not_p)
        n += 1
    return torch.tensor(total / max(1, n), dtype=torch.float64)
