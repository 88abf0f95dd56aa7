"""The sync-free segmented NMS kernel keeps exactly what torchvision's `nms` keeps on each segment's valid
entries: random segments, crowded ones, padding, no valid entry, one entry, degenerate boxes."""

import pytest
import torch

from conftest import cpu_and_cuda, seeds
from acrst_fast.kernels.nms import nms_segments, nms_segments_ref, nms_segments_triton

SEEDS = seeds()
DEVICES = cpu_and_cuda(triton=True)


def _segments(g: torch.Generator, n_seg: int, k: int, spread: float, p_valid: float = 0.8):
    xy = torch.rand(n_seg, k, 2, generator=g) * spread
    wh = 2 + torch.rand(n_seg, k, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], dim=2)
    scores = torch.rand(n_seg, k, generator=g)
    valid = torch.rand(n_seg, k, generator=g) < p_valid
    return boxes, scores, valid


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,spread,thr", [(70, 12.0, 0.7), (100, 40.0, 0.5), (33, 150.0, 0.3)])
def test_kernel_keeps_what_torchvision_keeps(seed, device, k, spread, thr):
    g = torch.Generator().manual_seed(seed)
    boxes, scores, valid = (t.to(device) for t in _segments(g, 3, k, spread))
    ref = nms_segments_ref(boxes, scores, valid, thr)
    got = nms_segments_triton(boxes, scores, valid, thr)
    assert got.dtype == torch.bool and got.shape == valid.shape
    assert torch.equal(got, ref), f"seed {seed}: {int((got != ref).sum())} entries differ"
    assert not got[~valid].any() and 0 < int(got.sum()) < int(valid.sum())  # suppression happened


@pytest.mark.parametrize("device", DEVICES)
def test_edges(device):
    g = torch.Generator().manual_seed(7)
    boxes, scores, valid = _segments(g, 4, 40, 60.0)
    valid[0] = False  # no valid entry
    valid[1] = False
    valid[1, 5] = True  # one entry
    boxes[2, :10] = torch.tensor([10.0, 10, 10, 30])  # zero-width boxes: IoU 0 / 0 is never > threshold
    boxes[3] = torch.tensor([5.0, 5, 50, 50])  # all the same box: only the best-scored survives
    boxes, scores, valid = boxes.to(device), scores.to(device), valid.to(device)
    got = nms_segments_triton(boxes, scores, valid, 0.5)
    assert torch.equal(got, nms_segments_ref(boxes, scores, valid, 0.5))
    assert not got[0].any() and got[1].nonzero().flatten().tolist() == [5]
    assert int(got[3].sum()) == 1 and bool(got[3, torch.where(valid[3], scores[3], -1.0).argmax()])
    empty = torch.zeros(0, 5, 4, device=device)
    assert nms_segments_triton(empty, empty[..., 0], empty[..., 0].bool(), 0.5).shape == (0, 5)


def test_dispatch_runs_the_reference_on_cpu():
    g = torch.Generator().manual_seed(1)
    boxes, scores, valid = _segments(g, 2, 50, 100.0)
    assert torch.equal(nms_segments(boxes, scores, valid, 0.7), nms_segments_ref(boxes, scores, valid, 0.7))
