"""RPN and RoI heads whose regression losses take a weight per ground-truth box (selective supervision).

A target dict may carry `reg_weight` (float Tensor[N], one per box). Each anchor or proposal
matched to box j has its regression term multiplied by reg_weight[j]; without the key every
weight is 1 and the losses are torchvision's. The normalisers are torchvision's too (number of
sampled anchors / proposals), so weight 0 removes exactly that box's regression contribution.
Classification terms are unchanged (paper Eq. 10: classification on all pseudo-labels,
regression on pasted instances only).

Only the loss paths are overridden; everything else is torchvision's `RegionProposalNetwork`
and `RoIHeads`. `enable_box_weights(model)` switches a built Faster R-CNN to these classes, both
box coders to `Float32BoxCoder` and its anchor generator to `Float32AnchorGenerator`
(`models/float32_boxes.py`): under bf16 autocast torchvision would round anchors, regression
targets, proposals, RoI boxes and detections to bf16 (2 px steps above 256 px); here boxes are
always in float32 while the convolutions and linear layers stay in the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from acrst_fast.models.batched_detections import postprocess_detections_batched
from acrst_fast.models.batched_rpn import filter_proposals_batched
from acrst_fast.models.float32_boxes import Float32AnchorGenerator, Float32BoxCoder



def group_sums(values: torch.Tensor, split: int | None) -> torch.Tensor:
    """`values` (Tensor[R]) summed: over all rows (0-dim) when `split` is None, else over rows [0, split) and
    [split, R) (Tensor[2]); host slicing, no device read."""
    if split is None:
        return values.sum()
    return torch.stack([values[:split].sum(), values[split:].sum()])


def group_means(values: torch.Tensor, split: int) -> torch.Tensor:
    """Tensor[2]: the means of `values` (Tensor[R]) over rows [0, split) and [split, R) (0 for an empty group),
    divided by host counts (no upload)."""
    return torch.stack([values[:split].sum() / max(split, 1), values[split:].sum() / max(len(values) - split, 1)])


def valid_prefixes(valid: torch.Tensor, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
    """Per image, the valid leading entries of each of `tensors` (Tensor[N, P, ...]; the batched filters put
    them first): one host read of the counts (valid: Tensor[N, P] bool). Returns a list per tensor."""
    counts = valid.sum(dim=1).tolist()
    return tuple([row[:c] for row, c in zip(t, counts)] for t in tensors)


def _weights_for(target: dict, matched_idxs: torch.Tensor) -> torch.Tensor:
    w = target.get("reg_weight")
    if w is None or w.numel() == 0:
        return torch.ones(len(matched_idxs), device=matched_idxs.device)
    return w.to(matched_idxs.device, torch.float32)[matched_idxs.clamp(min=0)]


class WeightedRPN(RegionProposalNetwork):
    """`group_split` (set per forward by the caller, None by default): the first `group_split` images of
    the batch are one group (the labeled images), the rest another (the unlabeled ones), and each loss is
    a Tensor[2], each group normalised by its own sampled anchors, as two forwards would be."""

    group_split: int | None = None
    batched_filter = False  # model.batched_nms: the proposal filter of `models/batched_rpn.py`

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """torchvision's filter, or (`batched_filter`) the batched one: the same proposals (tested), with one
        host read per call (how many each image kept) instead of several per image."""
        if not self.batched_filter:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        boxes, scores, valid = filter_proposals_batched(self, proposals, objectness, image_shapes,
                                                        num_anchors_per_level)
        return valid_prefixes(valid, boxes, scores)

    def assign_targets_to_anchors(self, anchors, targets):
        """torchvision's assignment (anchor labels 1 / 0 / -1 and matched boxes), on masks instead of
        boolean-index writes; also keeps each anchor's regression weight (`reg_weight` of its box)."""
        labels, matched_gt_boxes, weights = [], [], []
        for anchors_per_image, t in zip(anchors, targets):
            gt_boxes, device = t["boxes"], anchors_per_image.device
            if gt_boxes.numel() == 0:
                matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32, device=device))
                labels.append(torch.zeros((anchors_per_image.shape[0],), dtype=torch.float32, device=device))
                weights.append(torch.ones(len(anchors_per_image), device=device))
                continue
            matched = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_per_image))
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
            labels.append(torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, -1.0,
                                      (matched >= 0).to(torch.float32)))
            weights.append(_weights_for(t, matched))
        self._anchor_weights = weights
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        """torchvision's RPN loss with per-anchor regression weights, on masks instead of gathered
        indices (no data-dependent shapes, so no host read); equal up to float summation order."""
        anchors_per_image = len(labels[0])  # every image has the same anchors (one padded canvas)
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.cat(sampled_pos, dim=0).bool()
        sampled = pos | torch.cat(sampled_neg, dim=0).bool()
        n_sampled = sampled.sum()
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        weights = torch.cat(self._anchor_weights, dim=0)
        self._anchor_weights = None
        split = None if self.group_split is None else self.group_split * anchors_per_image
        n_sampled = group_sums(sampled.float(), split) if split is not None else n_sampled
        per_anchor = F.smooth_l1_loss(pred_bbox_deltas, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
        box_loss = group_sums(torch.where(pos, per_anchor * weights, 0.0), split) / n_sampled
        per_logit = F.binary_cross_entropy_with_logits(objectness, labels.clamp(0, 1), reduction="none")
        objectness_loss = group_sums(torch.where(sampled, per_logit, 0.0), split) / n_sampled
        return objectness_loss, box_loss


class MaskMatcher(Matcher):
    """torchvision's `Matcher` on masks: the same matches (tested), with `torch.where` selections instead of
    boolean-index writes and `nonzero` (each a host read on CUDA). match_quality_matrix: Tensor[M gt, N]."""

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        if match_quality_matrix.numel() == 0:
            return super().__call__(match_quality_matrix)  # torchvision's errors
        vals, matches = match_quality_matrix.max(dim=0)
        out = torch.where(vals < self.low_threshold, self.BELOW_LOW_THRESHOLD,
                          torch.where(vals < self.high_threshold, self.BETWEEN_THRESHOLDS, matches))
        if self.allow_low_quality_matches:  # predictions of highest quality for some gt keep their match
            best = match_quality_matrix.max(dim=1).values
            out = torch.where((match_quality_matrix == best[:, None]).any(dim=0), matches, out)
        return out


def _top_by_key(keys: torch.Tensor, candidates: torch.Tensor, k: int, count: torch.Tensor) -> torch.Tensor:
    """Bool mask of the `count` (a device scalar <= k and <= the candidates) candidates of largest key."""
    _, idx = torch.where(candidates, keys, -1.0).topk(k)  # keys are in [0, 1): every candidate before the rest
    chosen = torch.arange(k, device=keys.device) < count
    return torch.zeros(keys.shape, dtype=torch.bool, device=keys.device).scatter_(0, idx, chosen)


class KeySampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler drawn by random keys (model.key_sampler): per image the num_pos positives
    (label >= 1), then the num_neg negatives (label 0), of largest uniform random key, with num_pos =
    min(positives, batch x fraction) and num_neg = min(negatives, batch - num_pos). The same counts and the
    same uniform distribution over subsets as torchvision's `randperm` draws (other draws), by a top-k on
    the device instead of index lists, so nothing is read by the host. matched_idxs: list of Tensor[A_i]
    labels (-1 ignored); returns (positive masks, negative masks), uint8 Tensor[A_i] each, as torchvision."""

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cap = int(self.batch_size_per_image * self.positive_fraction)
        pos_masks, neg_masks = [], []
        for labels in matched_idxs:
            n = labels.numel()
            keys = torch.rand(labels.shape, device=labels.device)
            pos, neg = labels >= 1, labels == 0
            num_pos = pos.sum().clamp(max=cap)
            num_neg = torch.minimum(neg.sum(), self.batch_size_per_image - num_pos)
            pos_masks.append(_top_by_key(keys, pos, min(cap, n), num_pos).to(torch.uint8))
            neg_masks.append(_top_by_key(keys, neg, min(self.batch_size_per_image, n), num_neg).to(torch.uint8))
        return pos_masks, neg_masks


def focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Softmax focal loss, mean over the rows: (1 - p_y)^gamma * CE (Unbiased Teacher's RoI classification
    loss on pseudo-labels, gamma 1.5); gamma 0 is `F.cross_entropy`. logits: Tensor[N, C]; labels: Tensor[N]."""
    if gamma == 0:
        return F.cross_entropy(logits, labels)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def _grouped_classification(logits: torch.Tensor, labels: torch.Tensor, split: int, gamma: float) -> torch.Tensor:
    """Tensor[2]: the mean cross-entropy of rows [0, split) and the mean focal loss (`gamma`; 0 = cross-entropy)
    of rows [split, N)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if gamma > 0:
        second = torch.arange(len(ce), device=ce.device) >= split
        ce = torch.where(second, (1 - torch.exp(-ce)) ** gamma * ce, ce)
    return group_means(ce, split)


def weighted_fastrcnn_loss(class_logits, box_regression, labels, regression_targets, weights, focal_gamma=0.0,
                           split_images=None):
    """torchvision's fastrcnn_loss with a regression weight per sampled proposal (list of Tensor[S_i]),
    on a mask of the positive proposals instead of their indices (no host read); the classification term
    is the focal loss when `focal_gamma` > 0. split_images (None: one group): the first `split_images`
    images are one group, the rest another; each loss is then a Tensor[2], each group normalised by its own
    proposals, and the focal loss applies to the second group only."""
    split = None if split_images is None else sum(len(x) for x in labels[:split_images])  # host shapes
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    weights = torch.cat(weights, dim=0)
    if split is None:
        classification_loss = focal_cross_entropy(class_logits, labels, focal_gamma)
    else:
        classification_loss = _grouped_classification(class_logits, labels, split, focal_gamma)
    n, _ = class_logits.shape
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    own_class = box_regression[torch.arange(n, device=labels.device), labels]  # Tensor[n, 4]
    per_box = F.smooth_l1_loss(own_class, regression_targets, beta=1 / 9, reduction="none").sum(dim=1)
    per_box = torch.where(labels > 0, per_box * weights, 0.0)
    if split is None:
        return classification_loss, per_box.sum() / labels.numel()
    return classification_loss, group_means(per_box, split)


class WeightedRoIHeads(RoIHeads):
    """`focal_gamma` (set per forward by the caller, 0 by default): the focal loss for the RoI
    classification term (the Mean Teacher runner sets it for the unlabeled images). `group_split` (as
    `WeightedRPN.group_split`): two groups in one forward, each loss a Tensor[2]; the focal loss then
    applies to the second group only."""

    focal_gamma = 0.0
    group_split: int | None = None
    batched_nms = False  # model.batched_nms: the detections of `models/batched_detections.py`

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's detections, or (`batched_nms`) the batched ones: the same detections (tested), with
        one host read per call instead of three per image."""
        if not self.batched_nms:
            return super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        boxes, scores, labels, valid = postprocess_detections_batched(self, class_logits, box_regression, proposals,
                                                                      image_shapes)
        return valid_prefixes(valid, boxes, scores, labels)

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        """torchvision's assignment (matched box per proposal, labels with 0 background and -1 ignored), on
        masks instead of boolean-index writes."""
        matched_idxs, labels = [], []
        for props, boxes, classes in zip(proposals, gt_boxes, gt_labels):
            if boxes.numel() == 0:
                zeros = torch.zeros((props.shape[0],), dtype=torch.int64, device=props.device)
                matched_idxs.append(zeros)
                labels.append(zeros.clone())
                continue
            matched = self.proposal_matcher(box_iou(boxes, props))
            clamped = matched.clamp(min=0)
            own = classes[clamped].to(dtype=torch.int64)
            labels.append(torch.where(matched == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0,
                                      torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, -1, own)))
            matched_idxs.append(clamped)
        return matched_idxs, labels

    def subsample(self, labels):
        """torchvision's sampled proposal indices per image, with one host read for the batch (the counts)
        instead of a `torch.where` per image."""
        pos, neg = self.fg_bg_sampler(labels)
        masks = [p.bool() | n.bool() for p, n in zip(pos, neg)]
        counts = torch.stack([m.sum() for m in masks]).tolist() if masks else []
        return [torch.nonzero_static(m, size=c).flatten() for m, c in zip(masks, counts)]

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
                                                               regression_targets, weights, self.focal_gamma,
                                                               self.group_split)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


def enable_box_weights(model: FasterRCNN) -> FasterRCNN:
    """Switch the RPN and RoI heads of a built Faster R-CNN to the weighted-loss subclasses, the box coders
    to `Float32BoxCoder`, torchvision's anchor generator to `Float32AnchorGenerator` and its matchers to
    `MaskMatcher` (no new state)."""
    if type(model.rpn.anchor_generator) is AnchorGenerator:
        model.rpn.anchor_generator.__class__ = Float32AnchorGenerator
    for matcher in (model.rpn.proposal_matcher, model.roi_heads.proposal_matcher):
        if type(matcher) is Matcher:
            matcher.__class__ = MaskMatcher
    model.rpn.__class__ = WeightedRPN
    model.roi_heads.__class__ = WeightedRoIHeads
    model.rpn.box_coder.__class__ = Float32BoxCoder
    model.roi_heads.box_coder.__class__ = Float32BoxCoder
    return model
