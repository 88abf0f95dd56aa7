"""The drop-in module's contract (augment/contract.py, augment/targets.py): the formats other frameworks use
give the same result as ours, misuse gets one line naming the call and the argument, targets keep their fields."""
import warnings

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_convert

from acrst_fast.augment import ACRST, PasteConfig
from conftest import seeds

K = 4


def _scene(seed: int, n_images: int = 3):
    """Random float images in [0, 1] with 1..K labels and xyxy boxes (some images empty)."""
    g = torch.Generator().manual_seed(seed)
    images, boxes, labels = [], [], []
    for i in range(n_images):
        h, w = int(torch.randint(48, 80, (), generator=g)), int(torch.randint(48, 80, (), generator=g))
        images.append(torch.rand(3, h, w, generator=g))
        n = 0 if i == 1 else int(torch.randint(1, 5, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 20, h - 20])
        wh = 6 + torch.rand(n, 2, generator=g) * 14
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(1, K + 1, (n,), generator=g))
    return images, boxes, labels


def _filled(seed: int, **kw) -> tuple[ACRST, tuple]:
    acrst = ACRST(K, capacity=8, crop_size=16, paste=PasteConfig(n_min=2, n_max=4), beta=0.6, pr_window=4, **kw)
    scene = _scene(seed)
    images, boxes, labels = scene
    if kw.get("label_offset") == 0:
        labels = [lab - 1 for lab in labels]
    if kw.get("box_format", "xyxy") != "xyxy":
        boxes = [box_convert(b, "xyxy", kw["box_format"]) for b in boxes]
    acrst.add_ground_truth(images, boxes, labels)
    return acrst, scene


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + seed)


@pytest.mark.parametrize("seed", seeds())
def test_uint8_images_paste_like_floats(seed):
    """uint8 in, uint8 out: the same banks and the same pastes as the float images /255, within rounding."""
    images, boxes, labels = _scene(seed)
    as_u8 = [(im * 255).round().to(torch.uint8) for im in images]
    as_float = [im.float() / 255 for im in as_u8]
    a = ACRST(K, capacity=8, crop_size=16, paste=PasteConfig(n_min=2, n_max=4))
    b = ACRST(K, capacity=8, crop_size=16, paste=PasteConfig(n_min=2, n_max=4))
    a.add_ground_truth(as_u8, boxes, labels)
    b.add_ground_truth(as_float, boxes, labels)
    assert torch.equal(a.bank.pixels, b.bank.pixels) and a.bank.pixels[a.bank.valid].float().mean() < 200  # not white
    out_u8 = a.rebalance(as_u8, boxes, labels, _gen(seed))
    out_f = b.rebalance(as_float, boxes, labels, _gen(seed))
    assert all(im.dtype == torch.uint8 for im in out_u8[0])
    for x, y in zip(out_u8[0], out_f[0]):
        assert (x.float() - y * 255).abs().max() <= 0.5 + 1e-3
    for x, y in zip(out_u8[1:], out_f[1:]):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_float_range_refused_unless_never():
    images, boxes, labels = _scene(0)
    with pytest.raises(ValueError, match=r"ACRST.add_ground_truth: images hold values in .*0\.\.255 floats"):
        ACRST(K).add_ground_truth([im * 255 for im in images], boxes, labels)
    normalised = [(im - 0.45) / 0.225 for im in images]
    with pytest.raises(ValueError, match=r"rebalance: images hold .*mean/std-normalised"):
        ACRST(K).rebalance(normalised, boxes, labels, _gen(0))
    assert ACRST(K, range_check="never").add_ground_truth(normalised, boxes, labels) > 0
    first, always = ACRST(K), ACRST(K, range_check="always")
    for acrst in (first, always):
        acrst.add_ground_truth(images, boxes, labels)  # the first call reads the range: fine
    first.add_ground_truth(normalised, boxes, labels)  # "first": checked once only
    with pytest.raises(ValueError, match="mean/std-normalised"):
        always.add_ground_truth(normalised, boxes, labels)


def test_image_shapes_and_dtypes_named():
    images, boxes, labels = _scene(0)
    hwc = [images[0], images[1].permute(1, 2, 0)]
    with pytest.raises(ValueError, match=r"ACRST.rebalance: images\[1\] has shape .* channels last \(HWC\)"):
        ACRST(K).rebalance(hwc, boxes[:2], labels[:2], _gen(0))
    with pytest.raises(ValueError, match=r"images\[0\] has shape \(1, 8, 8\); ACRST takes Tensor\[3, H, W\]"):
        ACRST(K).add_ground_truth([torch.rand(1, 8, 8)], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"images\[0\] has dtype torch.int32"):
        ACRST(K).add_ground_truth([torch.zeros(3, 8, 8, dtype=torch.int32)], [torch.zeros(0, 4)],
                                  [torch.zeros(0, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"boxes has 2 entries for 3 images"):
        ACRST(K).add_ground_truth(images, boxes[:2], labels)
    with pytest.raises(ValueError, match=r"labels\[0\] must be an integer Tensor"):
        ACRST(K).add_ground_truth(images, boxes, [lab.float() for lab in labels])
    with pytest.raises(ValueError, match=r"boxes\[2\] has shape \(2, 5\)"):
        ACRST(K).add_ground_truth(images, boxes[:2] + [torch.zeros(2, 5)], labels)


@pytest.mark.parametrize("seed", seeds())
def test_zero_based_labels_match_one_based(seed):
    one, (images, boxes, labels) = _filled(seed)
    zero, _ = _filled(seed, label_offset=0)
    r1 = one.rebalance(images, boxes, labels, _gen(seed))
    r0 = zero.rebalance(images, boxes, [lab - 1 for lab in labels], _gen(seed))
    assert all(torch.equal(a, b) for a, b in zip(r1[0], r0[0]))
    assert all(torch.equal(a, b + 1) for a, b in zip(r1[2], r0[2]))
    assert min(int(lab.min()) for lab in r0[2] if len(lab)) >= 0 and max(int(lab.max()) for lab in r0[2]) <= K - 1


def test_label_values_named_with_their_offset():
    images, boxes, labels = _scene(0)
    zero_based = [lab - 1 for lab in labels]
    with pytest.raises(ValueError, match=r"add_ground_truth: labels\[\d\] holds class 0, outside 1\.\.4 "
                                         r"\(label_offset=1\) \(0-based labels: label_offset=0\)"):
        ACRST(K).add_ground_truth(images, boxes, [lab.clamp(max=0) if len(lab) else lab for lab in zero_based])
    acrst, _ = _filled(0)
    with pytest.raises(ValueError, match=r"rebalance: labels\[2\] holds class 9, outside 1\.\.4"):
        acrst.rebalance(images, boxes, labels[:2] + [torch.full_like(labels[2], 9)], _gen(0))
    teacher = [{"boxes": b, "labels": lab, "scores": torch.full((len(b),), 0.9)} for b, lab in zip(boxes, labels)]
    with pytest.raises(ValueError, match=r"observe_teacher: predictions' labels hold classes 1\.\.4, outside 0\.\.3"):
        ACRST(K, label_offset=0).observe_teacher(images, teacher, [{k: v[:0] for k, v in t.items()} for t in teacher])


@pytest.mark.parametrize("seed", seeds())
@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_formats_match_xyxy(seed, fmt):
    xyxy, (images, boxes, labels) = _filled(seed)
    other, _ = _filled(seed, box_format=fmt)
    r = xyxy.rebalance(images, boxes, labels, _gen(seed))
    as_fmt = [box_convert(b, "xyxy", fmt) for b in boxes]
    r_plain = other.rebalance(images, as_fmt, labels, _gen(seed))
    for a, b in zip(r[1], r_plain[1]):
        torch.testing.assert_close(box_convert(a, "xyxy", fmt), b)
    # a BoundingBoxes says its own format, whatever box_format is, and comes back as one
    third, _ = _filled(seed)
    bb = [tv_tensors.BoundingBoxes(b, format=fmt.upper(), canvas_size=tuple(im.shape[1:]))
          for b, im in zip(as_fmt, images)]
    r_bb = third.rebalance(images, bb, labels, _gen(seed))
    for a, b, im in zip(r_bb[1], r_plain[1], images):
        assert isinstance(a, tv_tensors.BoundingBoxes) and a.format.name == fmt.upper()
        assert tuple(a.canvas_size) == tuple(im.shape[1:])
        torch.testing.assert_close(a.as_subclass(torch.Tensor), b)


def test_unknown_formats_refused():
    with pytest.raises(ValueError, match="box_format must be one of"):
        ACRST(K, box_format="xxyy")
    with pytest.raises(ValueError, match="label_offset must be 0"):
        ACRST(K, label_offset=2)


@pytest.mark.parametrize("seed", seeds())
def test_callers_tensors_never_modified(seed):
    acrst, (images, boxes, labels) = _filled(seed)
    before = [im.clone() for im in images]
    out = acrst.rebalance(images, boxes, labels, _gen(seed))
    assert all(torch.equal(a, b) for a, b in zip(images, before))
    assert any(not torch.equal(a, b) for a, b in zip(out[0], before))  # something was pasted


def test_device_mismatch_named_once():
    acrst, (images, boxes, labels) = _filled(0)
    meta = [im.to("meta") for im in images]
    with pytest.raises(ValueError, match=r"rebalance: images\[0\] is on meta, but must be on the ACRST's device "
                                         r"\(cpu\); move it with .to\('cpu'\)"):
        acrst.rebalance(meta, boxes, labels, _gen(0))
    with pytest.raises(ValueError, match=r"add_ground_truth: boxes\[0\] is on meta"):
        acrst.add_ground_truth(images, [b.to("meta") for b in boxes], labels)


def test_missing_scores_key_named():
    images, boxes, labels = _scene(0)
    teacher = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    with pytest.raises(ValueError, match=r"observe_teacher: predictions\[0\] has no 'scores' key "
                                         r"\(it has \['boxes', 'labels'\]\)"):
        ACRST(K).observe_teacher(images, teacher, teacher)


@pytest.mark.parametrize("seed", seeds())
def test_targets_keep_their_fields(seed):
    acrst, (images, boxes, labels) = _filled(seed)
    twin, _ = _filled(seed)
    targets = [{"boxes": b, "labels": lab, "scores": torch.rand(len(b)), "iscrowd": torch.zeros(len(b), dtype=torch.long),
                "area": (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), "reg_uncs": torch.rand(len(b), 4),
                "image_id": i, "orig_size": torch.tensor([7, 7])} for i, (b, lab) in enumerate(zip(boxes, labels))]
    out_images, out = acrst.rebalance_targets(images, targets, _gen(seed))
    ref = twin.rebalance(images, boxes, labels, _gen(seed))
    assert all(torch.equal(a, b) for a, b in zip(out_images, ref[0]))
    for t, new, b, lab, pasted in zip(targets, out, *ref[1:]):
        src = new["source_index"]
        assert torch.equal(new["boxes"], b) and torch.equal(new["labels"], lab)
        assert torch.equal(src < 0, pasted) and torch.equal(new["reg_weight"], pasted.float())
        own = src >= 0
        assert torch.equal(new["boxes"][own], t["boxes"][src[own]])  # source_index points at the input rows
        for key in ("scores", "iscrowd", "reg_uncs"):
            assert torch.equal(new[key][own], t[key][src[own]])
        assert (new["scores"][~own] == 1).all() and (new["iscrowd"][~own] == 0).all()
        wh = new["boxes"][:, 2:] - new["boxes"][:, :2]
        torch.testing.assert_close(new["area"], wh[:, 0] * wh[:, 1])
        assert new["image_id"] == t["image_id"] and torch.equal(new["orig_size"], t["orig_size"])
    assert any(bool((n["source_index"] < 0).any()) for n in out)
    _, labeled = twin.rebalance_targets(images, targets, _gen(seed), selective_supervision=False,
                                        fill={"scores": 0.5}, per_box=("scores",))
    assert all((n["reg_weight"] == 1).all() for n in labeled)
    assert all((n["scores"][n["source_index"] < 0] == 0.5).all() for n in labeled)
    assert all(torch.equal(n["iscrowd"], t["iscrowd"]) for n, t in zip(labeled, targets))  # not named: as it was


def test_targets_misuse_named():
    acrst, (images, boxes, labels) = _filled(0)
    with pytest.raises(ValueError, match=r"rebalance_targets: targets\[1\] has no 'labels' key"):
        acrst.rebalance_targets(images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)][:1] +
                                [{"boxes": boxes[1]}, {"boxes": boxes[2], "labels": labels[2]}], _gen(0))
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    with pytest.raises(ValueError, match=r"targets\[0\]\['scores'\] must be a tensor with one row per box"):
        acrst.rebalance_targets(images, targets, _gen(0), per_box=("scores",))


def test_warns_when_heads_ignore_reg_weight():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from acrst_fast.augment import enable_box_weights

    acrst, (images, boxes, labels) = _filled(0)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=K + 1)
    with pytest.warns(UserWarning, match=r"ignore 'reg_weight'.*enable_box_weights"):
        acrst.rebalance_targets(images, targets, _gen(0), model=model)
    enable_box_weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acrst.rebalance_targets(images, targets, _gen(1), model=model)
        acrst.rebalance_targets(images, targets, _gen(2), model=torch.nn.Linear(2, 2))  # not a detector: no opinion
