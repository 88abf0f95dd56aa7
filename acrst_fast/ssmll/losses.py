"""Focal binary cross-entropy for multi-label targets (Lin et al. 2017, applied per class).

    FL(p, y) = -[ y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p) ],  p = sigmoid(logit)

averaged over images and classes. gamma = 0 is plain BCE.
"""
from __future__ import annotations

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


def focal_bce_ref(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The definition, element by element in float64 (tests only)."""
    total = 0.0
    lg, tg = logits.double().flatten().tolist(), targets.double().flatten().tolist()
    for z, y in zip(lg, tg):
        p = 1.0 / (1.0 + torch.exp(torch.tensor(-z, dtype=torch.float64)).item())
        total += -(y * (1 - p) ** gamma * torch.log(torch.tensor(p, dtype=torch.float64)).item()
                   + (1 - y) * p ** gamma * torch.log1p(torch.tensor(-p, dtype=torch.float64)).item())
    return torch.tensor(total / max(1, len(lg)), dtype=torch.float64)
