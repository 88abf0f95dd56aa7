"""AFFR: Pseudo Recall (paper Eq. 8) and the class sampling distribution mu (Eq. 9).

PR_k = sum of teacher confidences of predictions of class k with score >= 0.1, accumulated over
the last `window` steps and summed over all ranks (so every rank samples with the same mu).

mu_k = (1 / PR_k)^beta / sum_j (1 / PR_j)^beta. beta = 0 is uniform sampling (plain FBR).
A class with PR_k = 0 (never predicted yet) is treated as having the smallest positive PR of
any class, so it gets the largest weight without inf/NaN; with no predictions at all mu is uniform.
"""
from __future__ import annotations

import torch

from acrst_fast import dist


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boxes per class, Tensor[K] float64 on the labels' device, from labels Tensor[N] int64 (1..K count;
    labels past K, such as those of a runner built without class names (K = 0), are not counted). No host read."""
    out = torch.zeros(num_classes, dtype=torch.float64, device=labels.device)
    if num_classes == 0:
        return out
    index = labels.long() - 1  # bincount would read max() back to size its output: a host wait on CUDA
    inside = ((index >= 0) & (index < num_classes)).double()  # labels past K are not counted
    return out.index_add_(0, index.clamp(0, num_classes - 1), inside)


def sampling_probs(pseudo_recall: torch.Tensor, beta: float) -> torch.Tensor:
    """mu (Tensor[K] float64, sums to 1, on PR's device) from PR (Tensor[K] >= 0); no host read."""
    pr = pseudo_recall.detach().to(torch.float64)
    uniform = torch.full_like(pr, 1.0 / len(pr))
    if beta == 0:
        return uniform
    positive = pr > 0
    floor = torch.where(positive, pr, torch.full_like(pr, float("inf"))).min()
    w = pr.clamp(min=floor).pow(-beta)
    return torch.where(positive.any(), w / w.sum(), uniform)


class PseudoRecall:
    """Windowed, all-reduced Pseudo Recall per class (labels 1..K), kept on `device`."""

    def __init__(self, num_classes: int, window: int, threshold: float = 0.1, device: torch.device | str = "cpu"):
        if window < 1:
            raise ValueError(f"PseudoRecall window must be >= 1, got {window}")
        self.num_classes, self.window, self.threshold = num_classes, window, threshold
        self.history = torch.zeros((window, num_classes), dtype=torch.float64, device=device)
        self.steps = 0

    def update(self, predictions: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Add one step's teacher predictions (dicts with scores Tensor[N], labels Tensor[N] 1..K).

        Collective when distributed: every rank must call it once per step. Returns this step's
        all-reduced per-class sums, Tensor[K].
        """
        step_sum = dist.all_reduce(self.local_sums(predictions))
        self.push(step_sum)
        return step_sum

    def local_sums(self, predictions: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """This rank's per-class confidence sums of one step, Tensor[K] float64 on the window's device;
        computed on the device in one pass over the batch (no host read)."""
        step_sum = torch.zeros(self.num_classes, dtype=torch.float64, device=self.history.device)
        if predictions:
            scores = torch.cat([p["scores"].detach().reshape(-1) for p in predictions]).to(step_sum.device)
            labels = torch.cat([p["labels"].reshape(-1) for p in predictions]).to(step_sum.device, torch.int64)
            weight = torch.where(scores >= self.threshold, scores.double(), torch.zeros_like(scores, dtype=torch.float64))
            step_sum.index_add_(0, (labels - 1).clamp(0, self.num_classes - 1), weight)
        return step_sum

    def push(self, step_sum: torch.Tensor) -> None:
        """Add one step's all-reduced sums (Tensor[K]) to the window."""
        self.history[self.steps % self.window] = step_sum.to(self.history.device)
        self.steps += 1

    def value(self) -> torch.Tensor:
        """PR over the window, Tensor[K] float64 (on the window's device)."""
        return self.history.sum(0)

    def state_dict(self) -> dict:
        return {"history": self.history.cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.history.copy_(state["history"])
        self.steps = int(state["steps"])
