"""The multi-level RoIAlign with one read per call gives torchvision's `MultiScaleRoIAlign` numbers: boxes of
every level, levels with no box, an image with no box, bf16 features."""
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from conftest import cpu_and_cuda, seeds
from acrst_fast.models.roi_pool import CountedMultiScaleRoIAlign

NAMES = ["0", "1", "2", "3"]


def _features(g, n, device, dtype=torch.float32):
    return {name: torch.randn(n, 8, 256 // 2 ** (i + 2), 320 // 2 ** (i + 2), generator=g).to(device, dtype)
            for i, name in enumerate(NAMES)}


def _boxes(g, k, scale):
    xy = torch.rand(k, 2, generator=g) * 200
    return torch.cat([xy, xy + 2 + torch.rand(k, 2, generator=g) * scale], 1)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", seeds())
def test_equals_torchvision(seed, device):
    g = torch.Generator().manual_seed(seed)
    feats = _features(g, 3, device)
    boxes = [_boxes(g, 40, 300).to(device), torch.zeros(0, 4, device=device), _boxes(g, 7, 30).to(device)]
    shapes = [(256, 320)] * 3
    ours = CountedMultiScaleRoIAlign(NAMES, output_size=7, sampling_ratio=2)(feats, boxes, shapes)
    ref = MultiScaleRoIAlign(NAMES, output_size=7, sampling_ratio=2)(feats, boxes, shapes)
    assert ours.shape == (47, 8, 7, 7) and torch.equal(ours, ref)
    small = [_boxes(g, 5, 8).to(device)] * 3  # every box on the finest level: the others get none
    assert torch.equal(CountedMultiScaleRoIAlign(NAMES, 7, 2)(feats, small, shapes),
                       MultiScaleRoIAlign(NAMES, 7, 2)(feats, small, shapes))


def test_bf16_features_and_no_boxes_at_all():
    g = torch.Generator().manual_seed(0)
    feats = _features(g, 2, "cpu", torch.bfloat16)
    boxes = [_boxes(g, 9, 200), _boxes(g, 4, 60)]
    shapes = [(256, 320)] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the detector runs it
        ours = CountedMultiScaleRoIAlign(NAMES, 7, 2)(feats, boxes, shapes)
        ref = MultiScaleRoIAlign(NAMES, 7, 2)(feats, boxes, shapes)
    assert ours.dtype == ref.dtype == torch.bfloat16 and torch.equal(ours, ref)
    empty = [torch.zeros(0, 4)] * 2
    assert CountedMultiScaleRoIAlign(NAMES, 7, 2)(feats, empty, shapes).shape == (0, 8, 7, 7)
