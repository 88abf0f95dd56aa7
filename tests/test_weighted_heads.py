"""Selective supervision: per-box regression weights in the RPN and RoI losses."""
import copy

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from acrst_fast.config import ModelConfig
from acrst_fast.models.detector import build_detector
from acrst_fast.models.weighted_heads import WeightedRoIHeads, WeightedRPN

CFG = ModelConfig(backbone="mobilenet_v2", fpn_channels=16, representation_size=32, anchor_sizes=[16, 32, 64, 128, 256],
                  rpn_batch_size_per_image=64, box_batch_size_per_image=64)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40], [30.0, 50, 90, 90]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 5, 60, 70]]), "labels": torch.tensor([3])}]
    return images, targets


def _losses(model, images, targets, seed=7):
    torch.manual_seed(seed)  # the same anchor/proposal sampling
    return model(images, targets)


def test_unit_weights_equal_torchvision_losses():
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    assert isinstance(model.rpn, WeightedRPN) and isinstance(model.roi_heads, WeightedRoIHeads)
    plain = copy.deepcopy(model)
    plain.rpn.__class__, plain.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    images, targets = _batch()
    ours = _losses(model, images, targets)
    ref = _losses(plain, images, targets)
    ones = _losses(model, images, [dict(t, reg_weight=torch.ones(len(t["boxes"]))) for t in targets])
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ones[k], ref[k], rtol=1e-5, atol=1e-6)


def test_zero_weights_remove_only_regression():
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    images, targets = _batch()
    full = _losses(model, images, targets)
    zero = _losses(model, images, [dict(t, reg_weight=torch.zeros(len(t["boxes"]))) for t in targets])
    assert zero["loss_rpn_box_reg"] == 0 and zero["loss_box_reg"] == 0
    assert full["loss_rpn_box_reg"] > 0 and full["loss_box_reg"] > 0
    for k in ("loss_objectness", "loss_classifier"):  # classification terms are unchanged
        torch.testing.assert_close(zero[k], full[k])
    # weighting one box: regression falls strictly between none and all
    part = _losses(model, images, [dict(targets[0], reg_weight=torch.tensor([1.0, 0.0])),
                                   dict(targets[1], reg_weight=torch.tensor([0.0]))])
    for k in ("loss_rpn_box_reg", "loss_box_reg"):
        assert 0 < part[k] < full[k]


def test_zero_weight_gives_no_regression_gradient():
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    images, targets = _batch()
    losses = _losses(model, images, [dict(t, reg_weight=torch.zeros(len(t["boxes"]))) for t in targets])
    (losses["loss_box_reg"] + losses["loss_rpn_box_reg"]).backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad is None or \
        model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() == 0


def test_images_without_boxes():
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    images, _ = _batch()
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "reg_weight": torch.zeros(0)}] * 2
    losses = _losses(model, images, empty)
    assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_classifier"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_loss_against_its_formula(seed):
    """Softmax focal loss (Unbiased Teacher): mean of (1 - p_y)^gamma * CE; gamma 0 is cross-entropy."""
    from acrst_fast.models.weighted_heads import focal_cross_entropy

    g = torch.Generator().manual_seed(seed)
    logits, labels = torch.randn(50, 5, generator=g) * 3, torch.randint(0, 5, (50,), generator=g)
    p = torch.softmax(logits, 1)[torch.arange(50), labels]
    want = ((1 - p) ** 1.5 * -torch.log(p)).mean()
    torch.testing.assert_close(focal_cross_entropy(logits, labels, 1.5), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(focal_cross_entropy(logits, labels, 0.0), torch.nn.functional.cross_entropy(logits, labels))
    assert focal_cross_entropy(logits, labels, 1.5) < focal_cross_entropy(logits, labels, 0.0)


def test_unsup_focal_gamma_applies_to_the_unlabeled_forward_only():
    from acrst_fast.engine.mean_teacher import StudentLosses

    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    images, targets = _batch()
    plain, focal = StudentLosses(model, 0.0), StudentLosses(model, 1.5)
    torch.manual_seed(7)
    sup_a, unsup_a = plain(images, targets, images, targets)
    torch.manual_seed(7)
    sup_b, unsup_b = focal(images, targets, images, targets)
    for k in sup_a:  # the labeled group's losses, and every term but the RoI classification, are unchanged
        torch.testing.assert_close(sup_a[k], sup_b[k])
        if k != "loss_classifier":
            torch.testing.assert_close(unsup_a[k], unsup_b[k])
    assert unsup_b["loss_classifier"] < unsup_a["loss_classifier"] and model.roi_heads.focal_gamma == 0.0
