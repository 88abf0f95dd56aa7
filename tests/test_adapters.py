"""The detectron2 and mmdet adapters: each equals plain ACRST on the same data (labels shifted, images
converted), carries every per-instance field, never modifies the caller's structures and names bad input.
detectron2 by stand-ins of its structures (d2_structures.py); mmdet with mmengine's real InstanceData."""
from __future__ import annotations

import pytest
import torch
from mmengine.structures import BaseDataElement, InstanceData

from acrst_fast.augment import ACRST, PasteConfig
from acrst_fast.augment.adapters import Detectron2ACRST, MMDetACRST
from conftest import seeds
from d2_structures import Boxes, Instances, PolygonMasks

K = 4
KW = dict(capacity=8, crop_size=24, paste=PasteConfig(n_min=2, n_max=4), device="cpu")


def _scene(seed: int):
    """Two uint8 images (3, H, W), xyxy boxes and 0-based labels (class 0 included), per-box scores."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(60, 80), (48, 52)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    boxes, labels = [], []
    for (h, w), n in zip(sizes, (3, 2)):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 6 + torch.rand(n, 2, generator=g) * 14
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
        labels.append(torch.randint(0, K, (n,), generator=g))
    labels[0][0] = 0
    scores = [torch.rand(len(b), generator=g) for b in boxes]
    return images, boxes, labels, scores


def _plain(images, boxes, labels, scores, seed):
    """The reference: ACRST with 1-based labels on the same images."""
    ref = ACRST(K, **KW)
    ref.add_ground_truth(images, boxes, [lab + 1 for lab in labels])
    targets = [{"boxes": b, "labels": lab + 1, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
    return ref.rebalance_targets(images, targets, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- detectron2 / Unbiased Teacher
def _d2_inputs(images, boxes, labels, scores):
    return [{"image": im, "file_name": f"{i}.jpg", "height": im.shape[1], "width": im.shape[2],
             "instances": Instances(tuple(im.shape[1:]), gt_boxes=Boxes(b), gt_classes=lab, scores=s)}
            for i, (im, b, lab, s) in enumerate(zip(images, boxes, labels, scores))]


@pytest.mark.parametrize("seed", seeds())
def test_detectron2_adapter_equals_plain_acrst(seed):
    images, boxes, labels, scores = _scene(seed)
    inputs = _d2_inputs(images, boxes, labels, scores)
    kept = [im.clone() for im in images]
    d2 = Detectron2ACRST(K, **KW)
    d2.add_ground_truth(inputs)
    out = d2.rebalance(inputs, torch.Generator().manual_seed(seed))
    ref_images, ref_targets = _plain(images, boxes, labels, scores, seed)
    assert any((t["source_index"] < 0).any() for t in ref_targets)
    for d, o, im, t in zip(inputs, out, ref_images, ref_targets):
        inst = o["instances"]
        assert type(inst) is Instances and type(inst.gt_boxes) is Boxes and inst.image_size == d["instances"].image_size
        assert o["image"].dtype == torch.uint8 and torch.equal(o["image"], im)
        assert torch.equal(inst.gt_boxes.tensor, t["boxes"]) and torch.equal(inst.gt_classes, t["labels"] - 1)
        assert torch.equal(inst.scores, t["scores"]) and torch.equal(inst.gt_source_index, t["source_index"])
        assert torch.equal(inst.gt_reg_weight, (t["source_index"] < 0).float())  # selective supervision
        assert o["file_name"] == d["file_name"] and o["height"] == d["height"]
    for d, im, b in zip(inputs, kept, boxes):  # the caller's dicts, images and Instances are untouched
        assert torch.equal(d["image"], im) and torch.equal(d["instances"].gt_boxes.tensor, b)
        assert not d["instances"].has("gt_reg_weight")


def test_detectron2_adapter_teacher_and_bad_input():
    images, boxes, labels, scores = _scene(0)
    d2 = Detectron2ACRST(K, **KW)
    preds = [Instances(tuple(im.shape[1:]), pred_boxes=Boxes(b), pred_classes=lab, scores=s)
             for im, b, lab, s in zip(images, boxes, labels, scores)]
    pseudo = [Instances(p.image_size, gt_boxes=p.pred_boxes, gt_classes=p.pred_classes, scores=p.scores) for p in preds]
    d2.observe_teacher(_d2_inputs(images, boxes, labels, scores), preds, pseudo)
    assert d2.acrst.bank.fill().sum() == sum(len(b) for b in boxes)  # pseudo-labels into the Pseudo bank
    no_scores = [Instances(p.image_size, pred_boxes=p.pred_boxes, pred_classes=p.pred_classes) for p in preds]
    with pytest.raises(ValueError, match=r"predictions\[0\] has no field 'scores'"):
        d2.observe_teacher(_d2_inputs(images, boxes, labels, scores), no_scores, pseudo)
    bad = _d2_inputs(images, boxes, labels, scores)
    bad[1]["instances"].gt_masks = PolygonMasks([[0]] * 2)
    with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['instances'\].gt_masks is a PolygonMasks"):
        d2.rebalance(bad, torch.Generator().manual_seed(0))
    one_based = _d2_inputs(images, boxes, [lab + 1 for lab in labels], scores)
    one_based[0]["instances"].gt_classes[0] = K  # class K is out of range for 0-based labels
    with pytest.raises(ValueError, match=r"outside 0..3 \(label_offset=0\)"):
        d2.add_ground_truth(one_based)
    with pytest.raises(TypeError, match="label_offset"):
        Detectron2ACRST(K, label_offset=1)


# ---------------------------------------------------------------- mmdetection / SoftTeacher
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class HorizontalBoxes:
    """mmdet's box type: a `.tensor` of xyxy boxes."""

    def __init__(self, tensor):
        self.tensor = torch.as_tensor(tensor, dtype=torch.float32).reshape(-1, 4)

    def __len__(self):
        return len(self.tensor)


def _mm_batch(images, boxes, labels, scores, box_type=None):
    """A DetDataPreprocessor-style batch: normalised float, padded to a multiple of 32 with zeros, and
    data samples (mmengine BaseDataElement, as DetDataSample) with img_shape and gt_instances."""
    mean, std = torch.tensor(MEAN).reshape(3, 1, 1), torch.tensor(STD).reshape(3, 1, 1)
    batch = torch.zeros(len(images), 3, 64, 96)
    samples = []
    for i, (im, b, lab, s) in enumerate(zip(images, boxes, labels, scores)):
        h, w = im.shape[1:]
        batch[i, :, :h, :w] = (im.float() - mean) / std
        inst = InstanceData(bboxes=box_type(b) if box_type else b, labels=lab, scores=s, reg_uncs=s * 2)
        samples.append(BaseDataElement(gt_instances=inst, metainfo=dict(img_shape=(h, w), pad_shape=(64, 96))))
    return batch, samples


@pytest.mark.parametrize("seed", seeds())
@pytest.mark.parametrize("box_type", [None, HorizontalBoxes], ids=["tensor", "HorizontalBoxes"])
def test_mmdet_adapter_equals_plain_acrst(seed, box_type):
    images, boxes, labels, scores = _scene(seed)
    floats = [im.float() / 255 for im in images]
    batch, samples = _mm_batch(images, boxes, labels, scores, box_type)
    kept = batch.clone()
    mm = MMDetACRST(K, mean=MEAN, std=STD, **KW)
    mm.add_ground_truth(batch, samples)
    out, new = mm.rebalance(batch, samples, torch.Generator().manual_seed(seed))
    ref_images, ref_targets = _plain(floats, boxes, labels, scores, seed)
    assert torch.equal(batch, kept)  # the caller's batch is untouched
    mean, std = torch.tensor(MEAN).reshape(3, 1, 1), torch.tensor(STD).reshape(3, 1, 1)
    for i, (sample, im, t) in enumerate(zip(new, ref_images, ref_targets)):
        h, w = sample.metainfo["img_shape"]
        torch.testing.assert_close(out[i, :, :h, :w], (im * 255 - mean) / std, atol=2e-4, rtol=0)
        assert torch.equal(out[i, :, h:], kept[i, :, h:]) and torch.equal(out[i, :, :, w:], kept[i, :, :, w:])
        g = sample.gt_instances
        assert type(g) is InstanceData and sample.metainfo["pad_shape"] == (64, 96)
        got = g.bboxes.tensor if box_type else g.bboxes
        assert type(g.bboxes) is (box_type or torch.Tensor)
        torch.testing.assert_close(got, t["boxes"], atol=1e-4, rtol=0)
        assert torch.equal(g.labels, t["labels"] - 1) and torch.equal(g.source_index, t["source_index"])
        assert torch.equal(g.reg_weight, (t["source_index"] < 0).float())
        own = t["source_index"] >= 0
        assert torch.equal(g.reg_uncs[own], scores[i][t["source_index"][own]] * 2)  # SoftTeacher's field re-aligned
        assert len(samples[i].gt_instances) == len(boxes[i]) and "reg_weight" not in samples[i].gt_instances


def test_mmdet_adapter_teacher_and_bad_input():
    images, boxes, labels, scores = _scene(1)
    batch, samples = _mm_batch(images, boxes, labels, scores)
    mm = MMDetACRST(K, mean=MEAN, std=STD, **KW)
    preds = [InstanceData(bboxes=b, labels=lab, scores=s) for b, lab, s in zip(boxes, labels, scores)]
    mm.observe_teacher(batch, samples, preds, preds)
    assert mm.acrst.bank.fill().sum() == sum(len(b) for b in boxes)
    with pytest.raises(ValueError, match=r"predictions\[1\] has no field 'scores'"):
        mm.observe_teacher(batch, samples, [preds[0], InstanceData(bboxes=boxes[1], labels=labels[1])], preds)
    wrong_norm = MMDetACRST(K, mean=(0, 0, 0), std=(1, 1, 1), **KW)  # the batch is normalised, this says not
    with pytest.raises(ValueError, match="float images must be in"):
        wrong_norm.add_ground_truth(batch, samples)
    no_shape = [BaseDataElement(gt_instances=s.gt_instances) for s in samples]
    with pytest.raises(ValueError, match=r"data_samples\[0\] has no metainfo 'img_shape'"):
        mm.add_ground_truth(batch, no_shape)
    with pytest.raises(ValueError, match=r"3 data_samples for a batch of 2"):
        mm.add_ground_truth(batch, samples + samples[:1])
    with pytest.raises(ValueError, match=r"inputs must be the preprocessed batch"):
        mm.add_ground_truth(batch[0], samples)
