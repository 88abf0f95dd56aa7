"""The batched proposal filter gives torchvision's proposals, image by image, in order: random objectness and
boxes (some outside the image, some clipped to nothing), training and test top-n, the reference NMS and the
kernel (interpreted on the CPU, compiled on a GPU)."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from conftest import seeds
from acrst_fast.kernels.nms import nms_segments_ref, nms_segments_triton
from acrst_fast.models.batched_rpn import filter_proposals_batched

SEEDS = seeds()
LEVELS = [1200, 600, 300, 150]  # anchors per level: > 1000 candidates a image, so torchvision's batched_nms is
# its per-level loop (below that it offsets the boxes by level, which rounds IoUs differently)
PATHS = [pytest.param("cpu", nms_segments_ref, id="cpu-reference"),
         pytest.param("cuda", nms_segments_triton, id="cuda-kernel", marks=pytest.mark.cuda)]


def _rpn(training: bool) -> RegionProposalNetwork:
    rpn = RegionProposalNetwork(AnchorGenerator(), RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
                                pre_nms_top_n={"training": 400, "testing": 250},
                                post_nms_top_n={"training": 300, "testing": 120}, nms_thresh=0.7)
    return rpn.train(training)


def _inputs(g: torch.Generator, n: int, device: str):
    a = sum(LEVELS)
    centre = torch.rand(n, a, 2, generator=g) * torch.tensor([260.0, 200.0])  # some beyond the images
    half = 1 + torch.rand(n, a, 2, generator=g) * 30
    proposals = torch.cat([centre - half, centre + half], dim=2)
    objectness = torch.randn(n * a, 1, generator=g) * 3
    shapes = [(int(torch.randint(120, 200, (), generator=g)), int(torch.randint(150, 240, (), generator=g)))
              for _ in range(n)]
    return proposals.to(device), objectness.to(device), shapes


@pytest.mark.parametrize("device,nms", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_batched_filter_gives_torchvision_proposals(seed, training, device, nms):
    g = torch.Generator().manual_seed(seed)
    rpn = _rpn(training).to(device)
    proposals, objectness, shapes = _inputs(g, 3, device)
    ref_boxes, ref_scores = rpn.filter_proposals(proposals, objectness, shapes, LEVELS)
    boxes, scores, valid = filter_proposals_batched(rpn, proposals, objectness, shapes, LEVELS, nms=nms)
    assert boxes.shape[:2] == scores.shape == valid.shape and boxes.shape[1] == (300 if training else 120)
    for i in range(len(shapes)):
        v = valid[i]
        assert int(v.sum()) == len(ref_boxes[i]) > 0 and bool(v[: int(v.sum())].all())  # valid entries first
        assert torch.equal(boxes[i][v], ref_boxes[i]) and torch.equal(scores[i][v], ref_scores[i])


@pytest.mark.triton_cpu
def test_batched_filter_with_the_interpreted_kernel():
    """The kernel path on the CPU (one case: the interpreter takes about 15 s; tests/test_nms_kernel.py holds
    the kernel to torchvision's nms on many more)."""
    test_batched_filter_gives_torchvision_proposals(SEEDS[0], False, "cpu", nms_segments_triton)


def test_image_with_nothing_left():
    """Every box outside the image: clipped to nothing, no proposal, all invalid."""
    rpn = _rpn(False)
    proposals, objectness, shapes = _inputs(torch.Generator().manual_seed(3), 2, "cpu")
    proposals[1] = proposals[1].clamp(min=0) + 1000.0  # beyond image 1
    boxes, scores, valid = filter_proposals_batched(rpn, proposals, objectness, shapes, LEVELS)
    assert not valid[1].any() and valid[0].any() and float(scores[1].abs().sum()) == 0.0
    assert len(rpn.filter_proposals(proposals, objectness, shapes, LEVELS)[0][1]) == 0


def _heads(score_thresh: float, detections: int):
    from torchvision.models.detection.roi_heads import RoIHeads

    return RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, 0.5, detections)


@pytest.mark.parametrize("device,nms", PATHS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("score_thresh,detections", [(0.0, 100), (0.2, 30)])
def test_batched_detections_give_torchvision_detections(seed, device, nms, score_thresh, detections):
    from acrst_fast.models.batched_detections import postprocess_detections_batched

    g = torch.Generator().manual_seed(seed)
    classes = 6  # background + 5: > 1000 candidates a image at threshold 0, torchvision's per-class loop
    sizes = [300, 0, 170]  # proposals per image, one without any
    proposals = [_boxes_in(g, k, 160, 200).to(device) for k in sizes]
    logits = (torch.randn(sum(sizes), classes, generator=g) * 2).to(device)
    deltas = (torch.randn(sum(sizes), 4 * classes, generator=g) * 0.2).to(device)
    shapes = [(160, 200), (150, 190), (140, 180)]
    heads = _heads(score_thresh, detections)
    ref = heads.postprocess_detections(logits, deltas, proposals, shapes)
    boxes, scores, labels, valid = postprocess_detections_batched(heads, logits, deltas, proposals, shapes, nms=nms)
    assert boxes.shape[:2] == scores.shape == labels.shape == valid.shape == (3, detections)
    for i in range(3):
        v = valid[i]
        count = int(v.sum())
        assert count == len(ref[0][i]) and bool(v[:count].all())
        assert torch.equal(boxes[i][v], ref[0][i]) and torch.equal(scores[i][v], ref[1][i])
        assert torch.equal(labels[i][v], ref[2][i])
    assert not valid[1].any() and valid[0].any()
    none = postprocess_detections_batched(heads, logits[:0], deltas[:0], [p[:0] for p in proposals], shapes, nms=nms)
    assert [t.shape[:2] for t in none] == [(3, 0)] * 4  # no proposal in any image
    assert [len(b) for b in heads.postprocess_detections(logits[:0], deltas[:0], [p[:0] for p in proposals],
                                                         shapes)[0]] == [0, 0, 0]


def _boxes_in(g, k, h, w):
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w - 10.0, h - 10.0])
    return torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g) * 60], 1)
