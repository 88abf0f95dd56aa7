"""RPN and RoI heads whose regression losses take a weight per ground-truth box (selective supervision).

A target dict may carry `reg_weight` (float Tensor[N], one per box). Each anchor or proposal
matched to box j has its regression term multiplied by reg_weight[j]; without the key every
weight is 1 and the losses are torchvision's. The normalisers are torchvision's too (number of
sampled anchors / proposals), so weight 0 removes exactly that box's regression contribution.
Classification terms are unchanged (paper Eq. 10: classification on all pseudo-labels,
regression on pasted instances only).

Only the loss paths are overridden; everything else is torchvision's `RegionProposalNetwork`
and `RoIHeads`. `enable_box_weights(model)` switches a built Faster R-CNN to these classes, and
both box coders to `Float32BoxCoder`: torchvision's coder casts anchors and proposals to the
dtype of the regression output, so under bf16 autocast every proposal, RoI box and detection
would be rounded to bf16 (2 px steps above 256 px); here boxes are always decoded in float32
while the convolutions and linear layers stay in the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork


def _weights_for(target: dict, matched_idxs: torch.Tensor) -> torch.Tensor:
    w = target.get("reg_weight")
    if w is None or w.numel() == 0:
        return torch.ones(len(matched_idxs), device=matched_idxs.device)
    return w.to(matched_idxs.device, torch.float32)[matched_idxs.clamp(min=0)]


class _RecordingMatcher:
    """A Matcher that keeps what it returned, so the weights use the parent's own assignment (no re-run)."""

    def __init__(self, matcher):
        self.matcher, self.results = matcher, []

    def __call__(self, quality: torch.Tensor) -> torch.Tensor:
        out = self.matcher(quality)
        self.results.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.matcher, name)


class WeightedRPN(RegionProposalNetwork):
    def assign_targets_to_anchors(self, anchors, targets):
        matcher = self.proposal_matcher
        recording = self.proposal_matcher = _RecordingMatcher(matcher)
        try:
            labels, matched_gt_boxes = super().assign_targets_to_anchors(anchors, targets)
        finally:
            self.proposal_matcher = matcher
        matched = iter(recording.results)  # one per image with boxes, in order
        weights = []
        for anchors_per_image, t in zip(anchors, targets):
            if t["boxes"].numel() > 0:
                weights.append(_weights_for(t, next(matched)))
            else:
                weights.append(torch.ones(len(anchors_per_image), device=anchors_per_image.device))
        self._anchor_weights = weights
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        """torchvision's RPN loss with per-anchor regression weights, on masks instead of gathered
        indices (no data-dependent shapes, so no host read); equal up to float summation order."""
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.cat(sampled_pos, dim=0).bool()
        sampled = pos | torch.cat(sampled_neg, dim=0).bool()
        n_sampled = sampled.sum()
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        weights = torch.cat(self._anchor_weights, dim=0)
        self._anchor_weights = None
        per_anchor = F.smooth_l1_loss(pred_bbox_deltas, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
        box_loss = torch.where(pos, per_anchor * weights, 0.0).sum() / n_sampled
        per_logit = F.binary_cross_entropy_with_logits(objectness, labels.clamp(0, 1), reduction="none")
        objectness_loss = torch.where(sampled, per_logit, 0.0).sum() / n_sampled
        return objectness_loss, box_loss


def focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Softmax focal loss, mean over the rows: (1 - p_y)^gamma * CE (Unbiased Teacher's RoI classification
    loss on pseudo-labels, gamma 1.5); gamma 0 is `F.cross_entropy`. logits: Tensor[N, C]; labels: Tensor[N]."""
    if gamma == 0:
        return F.cross_entropy(logits, labels)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def weighted_fastrcnn_loss(class_logits, box_regression, labels, regression_targets, weights, focal_gamma=0.0):
    """torchvision's fastrcnn_loss with a regression weight per sampled proposal (list of Tensor[S_i]),
    on a mask of the positive proposals instead of their indices (no host read); the classification term
    is the focal loss when `focal_gamma` > 0."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    weights = torch.cat(weights, dim=0)
    classification_loss = focal_cross_entropy(class_logits, labels, focal_gamma)
    n, _ = class_logits.shape
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    own_class = box_regression[torch.arange(n, device=labels.device), labels]  # Tensor[n, 4]
    per_box = F.smooth_l1_loss(own_class, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
    box_loss = torch.where(labels > 0, per_box * weights, 0.0).sum() / labels.numel()
    return classification_loss, box_loss


class WeightedRoIHeads(RoIHeads):
    """`focal_gamma` (set per forward by the caller, 0 by default): the focal loss for the RoI
    classification term (the Mean Teacher runner sets it for the unlabeled images' forward)."""

    focal_gamma = 0.0

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or self.has_mask() or self.has_keypoint():
            return super().forward(features, proposals, image_shapes, targets)
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        weights = [_weights_for(t, m) if t["boxes"].numel() else torch.zeros(len(m), device=m.device)
                   for t, m in zip(targets, matched_idxs)]
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = weighted_fastrcnn_loss(class_logits, box_regression, labels,
                                                               regression_targets, weights, self.focal_gamma)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


class Float32BoxCoder(BoxCoder):
    """torchvision's `BoxCoder`, decoding in float32 whatever the dtype of the regression output."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


def enable_box_weights(model: FasterRCNN) -> FasterRCNN:
    """Switch the RPN and RoI heads of a built Faster R-CNN to the weighted-loss subclasses and the
    box coders to `Float32BoxCoder` (no new state)."""
    model.rpn.__class__ = WeightedRPN
    model.roi_heads.__class__ = WeightedRoIHeads
    model.rpn.box_coder.__class__ = Float32BoxCoder
    model.roi_heads.box_coder.__class__ = Float32BoxCoder
    return model
