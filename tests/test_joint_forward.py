"""One student forward over labeled and unlabeled images (StudentLosses(joint=True)) equals a forward per group:
the same sup and unsup losses and the same gradients, with frozen BatchNorm and one canvas size. The samplers
are made to take every candidate (a batch per image larger than the anchors and proposals), so the two paths
sample the same sets whatever order they draw in."""
import copy

import pytest
import torch
from torch import nn

from conftest import seeds
from acrst_fast.config import ModelConfig
from acrst_fast.engine.mean_teacher import StudentLosses
from acrst_fast.models.detector import build_detector

SEEDS = seeds()
CFG = ModelConfig(backbone="mobilenet_v2", fpn_channels=16, representation_size=32, anchor_sizes=[16, 32, 64, 128, 256],
                  rpn_batch_size_per_image=100_000, box_batch_size_per_image=100_000,
                  rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=40)


def _frozen_bn_train(model: nn.Module) -> nn.Module:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # running statistics: BatchNorm as FrozenBatchNorm2d computes it
    return model


def _group(g: torch.Generator, n: int, size: int, pseudo: bool):
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for i in range(n):
        k = 0 if (pseudo and i == 0) else int(torch.randint(1, 4, (), generator=g))  # an image without boxes
        xy = torch.rand(k, 2, generator=g) * (size - 24)
        boxes = torch.cat([xy, xy + 8 + torch.rand(k, 2, generator=g) * 16], 1)
        t = {"boxes": boxes, "labels": torch.randint(1, 4, (k,), generator=g)}
        if pseudo:
            t["reg_weight"] = (torch.rand(k, generator=g) > 0.5).float()  # pasted instances only
        targets.append(t)
    return images, targets


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_joint_forward_equals_two_forwards(seed, gamma):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    detector = _frozen_bn_train(build_detector(CFG, 3))
    lab, unl = _group(g, 2, 64, pseudo=False), _group(g, 3, 64, pseudo=True)
    results = []
    for joint in (False, True):
        model = copy.deepcopy(detector)
        sup, unsup = StudentLosses(model, gamma, joint=joint)(lab[0], lab[1], unl[0], unl[1])
        assert sup.keys() == unsup.keys() and all(v.dim() == 0 for v in (*sup.values(), *unsup.values()))
        (sum(sup.values()) + 2.0 * sum(unsup.values())).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sup, unsup, grads))
        assert model.roi_heads.group_split is None and model.roi_heads.focal_gamma == 0.0  # reset after the call
    (sup_a, unsup_a, grad_a), (sup_b, unsup_b, grad_b) = results
    for k in sup_a:
        torch.testing.assert_close(sup_b[k], sup_a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"sup {k}: {m}")
        torch.testing.assert_close(unsup_b[k], unsup_a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"unsup {k}: {m}")
    assert float(unsup_a["loss_box_reg"].detach()) != float(sup_a["loss_box_reg"].detach())  # the groups are told apart
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 10
    for n in grad_a:
        torch.testing.assert_close(grad_b[n], grad_a[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {n}: {m}")


def test_joint_forward_without_unlabeled_images_is_the_plain_forward():
    torch.manual_seed(0)
    detector = _frozen_bn_train(build_detector(CFG, 3))
    lab = _group(torch.Generator().manual_seed(0), 2, 64, pseudo=False)
    sup, unsup = StudentLosses(detector, joint=True)(*lab)
    ref = detector(*lab)
    assert unsup == {} and all(torch.equal(sup[k], ref[k]) for k in ref)
