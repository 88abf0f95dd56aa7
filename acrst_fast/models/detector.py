"""Faster R-CNN with FPN (torchvision), built from `ModelConfig`.

The data stage owns geometry (resize, flip, crop), so the model's transform only normalises and
batches: `DataOwnedGeometryTransform` skips torchvision's resize, and boxes in and out are in the
pixels of the images given to the model.

Weights are random unless the config names them (`models/weights.py` reads the files):
- `backbone_weights`: `imagenet` (torchvision's ImageNet weights through the torch hub cache,
  `models/pretrained.py`), `random`, or a local ImageNet classifier state dict (torchvision layout).
  A file named like torchvision's downloads (`name-<8 hex>.pth`) must have a sha256 starting with
  those 8 hex.
- `weights`: a detector state dict, or an acrst_fast checkpoint: its teacher, or its student for a
  checkpoint at or before the end of burn-in (`checkpoint_weights`); read with `weights_only=True`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from acrst_fast.config import ModelConfig
from acrst_fast.models.roi_pool import CountedMultiScaleRoIAlign
from acrst_fast.models.weighted_heads import KeySampler, enable_box_weights
from acrst_fast.models.weights import backbone_file, load_matching, load_state_dict_file

log = logging.getLogger(__name__)


class DataOwnedGeometryTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: images arrive already resized by the data stage. The mean and std are
    device constants made once per (dtype, device), where torchvision uploads them for every image, and
    boxes come back in the pixels they were predicted in (torchvision's postprocess would rescale them by
    ratios of 1, uploading four scalars per image)."""

    def resize(self, image, target=None):
        return image, target

    def _constants(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_norm_constants", {})
        key = (dtype, str(device))
        if key not in cache:
            cache[key] = tuple(torch.tensor(v, dtype=dtype).to(device)[:, None, None]
                               for v in (self.image_mean, self.image_std))
        return cache[key]

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"Expected input images to be of floating type (in range [0, 1]), "
                            f"but found type {image.dtype} instead")
        mean, std = self._constants(image.dtype, image.device)
        return (image - mean) / std

    def postprocess(self, result, image_shapes, original_image_sizes):
        if any(tuple(a) != tuple(b) for a, b in zip(image_shapes, original_image_sizes)):  # host shapes
            return super().postprocess(result, image_shapes, original_image_sizes)
        return result


class Detector(FasterRCNN):
    """torchvision's Faster R-CNN whose forward checks the targets for degenerate boxes with one host read
    for the batch, where torchvision reads once per image (the same error)."""

    def forward(self, images, targets=None):
        if self.training:
            torch._assert(targets is not None, "targets should not be none when in training mode")
            for target in targets:
                boxes = target["boxes"]
                torch._assert(isinstance(boxes, torch.Tensor) and boxes.dim() == 2 and boxes.shape[-1] == 4,
                              f"Expected target boxes to be a tensor of shape [N, 4], got {getattr(boxes, 'shape', boxes)}.")
        original_image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images, targets = self.transform(images, targets)
        if targets is not None:
            _check_degenerate([t["boxes"] for t in targets])
        features = self.backbone(images.tensors)
        proposals, proposal_losses = self.rpn(images, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        detections = self.transform.postprocess(detections, images.image_sizes, original_image_sizes)
        return {**detector_losses, **proposal_losses} if self.training else detections


def _check_degenerate(boxes: list[torch.Tensor]) -> None:
    """torchvision's check that every target box has positive height and width, with one read."""
    if not any(b.numel() for b in boxes):
        return
    if not bool(torch.cat([(b[:, 2:] <= b[:, :2]).any(dim=1) for b in boxes]).any()):
        return
    for i, b in enumerate(boxes):  # the error path: find the first, as torchvision names it
        bad = (b[:, 2:] <= b[:, :2]).any(dim=1)
        if bool(bad.any()):
            torch._assert(False, "All bounding boxes should have positive height and width."
                                 f" Found invalid box {b[bad][0].tolist()} for target at index {i}.")


def _freeze(modules: list[nn.Module]) -> None:
    for mod in modules:
        for p in mod.parameters():
            p.requires_grad_(False)


def _resnet_backbone(cfg: ModelConfig, norm: type[nn.Module], weights: str) -> BackboneWithFPN:
    net = (resnet50 if cfg.backbone == "resnet50" else resnet18)(weights=None, norm_layer=norm)
    if weights:
        load_matching(net, load_state_dict_file(weights), weights, ignore=("fc.",))
    stages = [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
    _freeze(stages[: 5 - cfg.trainable_backbone_layers])
    in_channels = [c * (4 if cfg.backbone == "resnet50" else 1) for c in (64, 128, 256, 512)]
    return BackboneWithFPN(net, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, in_channels,
                           cfg.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=None)


def _mobilenet_backbone(cfg: ModelConfig, norm: type[nn.Module], weights: str) -> BackboneWithFPN:
    net = mobilenet_v2(weights=None, norm_layer=norm)
    if weights:
        load_matching(net, load_state_dict_file(weights), weights, ignore=("classifier.",))
    # stages end at strides 2, 4, 8, 16, 32: features[0:2], [2:4], [4:7], [7:14], [14:19]
    starts = [0, 2, 4, 7, 14, 19]
    frozen_upto = starts[5 - cfg.trainable_backbone_layers]
    _freeze(list(net.features[:frozen_upto]))
    return BackboneWithFPN(net.features, {"3": "0", "6": "1", "13": "2", "18": "3"}, [24, 32, 96, 1280],
                           cfg.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=None)


def build_detector(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """Faster R-CNN for `num_classes` foreground classes (labels 1..K; 0 is background).

    Normalisation layers of the backbone are frozen (FrozenBatchNorm2d) when ImageNet weights are
    loaded, as in Detectron2; with random init they are ordinary BatchNorm2d, which needs training.
    """
    if not 0 <= cfg.trainable_backbone_layers <= 5:
        raise ValueError(f"model.trainable_backbone_layers must be in [0, 5], got {cfg.trainable_backbone_layers}")
    weights = backbone_file(cfg.backbone_weights, cfg.backbone, "model.backbone_weights")
    norm = FrozenBatchNorm2d if weights else nn.BatchNorm2d
    backbone = (_mobilenet_backbone if cfg.backbone == "mobilenet_v2" else _resnet_backbone)(cfg, norm, weights)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
    resolution = 7
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=CountedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=resolution,
                                               sampling_ratio=cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(cfg.fpn_channels * resolution**2, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, num_classes + 1),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
    )
    model.__class__ = Detector
    enable_box_weights(model)  # per-box regression weights (selective supervision); 1 = torchvision's losses
    model.rpn.batched_filter = model.roi_heads.batched_nms = cfg.batched_nms
    if cfg.key_sampler:
        model.rpn.fg_bg_sampler.__class__ = model.roi_heads.fg_bg_sampler.__class__ = KeySampler
    model.transform = DataOwnedGeometryTransform(
        min_size=1, max_size=1, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if cfg.weights:
        n = load_matching(model, load_state_dict_file(cfg.weights), cfg.weights)
        log.info("%s: loaded %d tensors into the detector", cfg.weights, n)
    return model

