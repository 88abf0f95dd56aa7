"""Selective supervision: per-box regression weights in the RPN and RoI losses."""
import copy

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from conftest import seeds
from acrst_fast.config import ModelConfig
from acrst_fast.models.detector import build_detector
from acrst_fast.models.weighted_heads import KeySampler, MaskMatcher, WeightedRoIHeads, WeightedRPN

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


@pytest.mark.parametrize("empty_image", [False, True])
def test_unit_weights_equal_torchvision_losses(empty_image):
    torch.manual_seed(0)
    model = build_detector(CFG, num_classes=3).train()
    assert isinstance(model.rpn, WeightedRPN) and isinstance(model.roi_heads, WeightedRoIHeads)
    # torchvision's proposal filter on both sides: the batched one gives the same proposals, but ties in score
    # (frequent from an untrained RPN) in another order, and the samplers then draw other proposals
    model.rpn.batched_filter = False
    # and torchvision's samplers: the key sampler draws other subsets (tests below)
    model.rpn.fg_bg_sampler.__class__ = model.roi_heads.fg_bg_sampler.__class__ = BalancedPositiveNegativeSampler
    plain = copy.deepcopy(model)
    plain.rpn.__class__, plain.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    plain.rpn.proposal_matcher.__class__ = plain.roi_heads.proposal_matcher.__class__ = Matcher
    images, targets = _batch()
    if empty_image:  # an image without boxes (an unlabeled image with no pseudo-label)
        images, targets = images + [torch.rand(3, 96, 96)], targets + [{"boxes": torch.zeros(0, 4),
                                                                        "labels": torch.zeros(0, dtype=torch.int64)}]
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


@pytest.mark.parametrize("seed", seeds())
@pytest.mark.parametrize("high,low,allow_low", [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.4, True)])
def test_mask_matcher_equals_torchvision(seed, high, low, allow_low):
    g = torch.Generator().manual_seed(seed)
    for m, n in ((1, 40), (5, 300), (12, 1000)):
        # coarse values (many ties, also for a gt's best) and gts whose best match is under the thresholds
        q = (torch.rand(m, n, generator=g) * torch.rand(m, 1, generator=g) * 0.9).round(decimals=1)
        q[:, torch.randint(0, n, (3,), generator=g)] = 0.0  # columns of no overlap at all
        ref, ours = Matcher(high, low, allow_low), MaskMatcher(high, low, allow_low)
        assert torch.equal(ours(q.clone()), ref(q.clone())), (m, n)
    with pytest.raises(ValueError, match="No ground-truth boxes"):
        MaskMatcher(0.7, 0.3, True)(torch.zeros(0, 5))


def _labels(g, n, n_pos, n_neg):
    labels = torch.full((n,), -1, dtype=torch.int64)
    perm = torch.randperm(n, generator=g)
    labels[perm[:n_pos]] = torch.randint(1, 5, (n_pos,), generator=g)
    labels[perm[n_pos:n_pos + n_neg]] = 0
    return labels


@pytest.mark.parametrize("seed", seeds())
def test_key_sampler_counts_and_candidates(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sampler = KeySampler(64, 0.25)
    cases = [(500, 40, 300), (500, 5, 300), (500, 0, 20), (30, 10, 10), (500, 200, 3), (8, 0, 0)]
    labels = [_labels(g, *c) for c in cases]
    pos, neg = sampler(labels)
    for (n, n_pos, n_neg), lab, p, q in zip(cases, labels, pos, neg):
        take_pos = min(n_pos, 16)
        assert p.dtype == torch.uint8 and int(p.sum()) == take_pos and int(q.sum()) == min(n_neg, 64 - take_pos)
        assert bool((lab[p.bool()] >= 1).all()) and bool((lab[q.bool()] == 0).all())
    fits = [c for c in cases if c[1] <= 16 and c[2] <= 64 - c[1]]  # every candidate taken: torchvision's masks
    ref_pos, ref_neg = BalancedPositiveNegativeSampler(64, 0.25)([labels[cases.index(c)] for c in fits])
    ours_pos, ours_neg = sampler([labels[cases.index(c)] for c in fits])
    assert all(torch.equal(a, b) for a, b in zip(ours_pos + ours_neg, ref_pos + ref_neg))


def test_key_sampler_is_uniform():
    torch.manual_seed(0)
    labels = torch.tensor([1] * 10 + [0] * 30 + [-1] * 5)
    sampler = KeySampler(16, 0.25)  # 4 of the 10 positives, 12 of the 30 negatives
    pos = torch.zeros(45)
    neg = torch.zeros(45)
    for _ in range(3000):
        p, q = sampler([labels])
        pos += p[0]
        neg += q[0]
    assert torch.allclose(pos[:10] / 3000, torch.full((10,), 0.4), atol=0.04)
    assert torch.allclose(neg[10:40] / 3000, torch.full((30,), 0.4), atol=0.04)
    assert float(pos[10:].sum() + neg[:10].sum() + neg[40:].sum()) == 0
