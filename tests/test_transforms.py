"""Geometry maps pixels and boxes together; strong views keep the weak geometry; streams are exact."""
import itertools

import pytest
import torch

from acrst_fast.config import AugmentConfig
from acrst_fast.data.loader import ShardedStreamSampler, sample_seed
from acrst_fast.data.transforms import (
    Geometry, apply_geometry_to_boxes, apply_geometry_to_image, boxes_to_original, sample_geometry, strong_photometric,
)


def _image_with_box(h, w, box):
    img = torch.zeros(3, h, w)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 1.0
    return img


@pytest.mark.parametrize("seed", range(6))
def test_box_follows_pixels(seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 90, 120
    box = (20, 30, 70, 60)
    aug = AugmentConfig(scales=[60, 90, 180], max_size=400, flip_prob=0.5, crop_prob=0.5, crop_min_frac=0.7)
    g = sample_geometry(gen, h, w, aug, train=True)
    out = apply_geometry_to_image(_image_with_box(h, w, box), g)
    boxes, keep = apply_geometry_to_boxes(torch.tensor([box], dtype=torch.float32), g)
    assert out.shape[1:] == g.out_hw
    if not keep[0]:
        return
    x1, y1, x2, y2 = boxes[0].tolist()
    inside = out[0, int(y1) + 2:int(y2) - 1, int(x1) + 2:int(x2) - 1]
    assert inside.numel() > 0 and inside.min() > 0.9  # the box's interior is the object
    mask = torch.ones_like(out[0], dtype=torch.bool)
    mask[max(0, int(y1) - 2):int(y2) + 3, max(0, int(x1) - 2):int(x2) + 3] = False
    assert out[0][mask].max() < 0.1  # nothing of the object outside the box


def test_round_trip_to_original():
    g = Geometry(scale=0.5, resized_hw=(50, 80), crop=(10, 5, 60, 40), flip=True)
    boxes = torch.tensor([[30.0, 20.0, 100.0, 80.0]])
    view, keep = apply_geometry_to_boxes(boxes, g)
    assert keep.all()
    torch.testing.assert_close(boxes_to_original(view, g), boxes)


def test_boxes_cropped_out_are_dropped_and_border_boxes_clipped():
    g = Geometry(scale=1.0, resized_hw=(100, 100), crop=(50, 0, 50, 100), flip=False)
    boxes = torch.tensor([[0.0, 0, 20, 20], [40.0, 10, 70, 30], [0.0, 0, 0, 0]])
    out, keep = apply_geometry_to_boxes(boxes, g)
    assert keep.tolist() == [False, True, False]
    torch.testing.assert_close(out, torch.tensor([[0.0, 10, 20, 30]]))
    empty, keep = apply_geometry_to_boxes(torch.zeros((0, 4)), g)
    assert empty.shape == (0, 4) and keep.shape == (0,)


def test_test_geometry_is_fixed_scale():
    aug = AugmentConfig(test_scale=100, max_size=150)
    g = sample_geometry(None, 200, 400, aug, train=False)
    assert g.flip is False and g.crop == (0, 0, 150, 75) and g.scale == pytest.approx(150 / 400)


def test_strong_view_photometric_only_and_deterministic():
    img = torch.rand(3, 40, 50)
    aug = AugmentConfig(jitter_prob=1.0, blur_prob=1.0, grayscale_prob=0.5)
    a = strong_photometric(img, torch.Generator().manual_seed(5), aug)
    b = strong_photometric(img, torch.Generator().manual_seed(5), aug)
    c = strong_photometric(img, torch.Generator().manual_seed(6), aug)
    assert a.shape == img.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, img)


def _take(it, n):
    return list(itertools.islice(iter(it), n))


@pytest.mark.parametrize("size,world", [(10, 1), (10, 3), (7, 2)])
def test_sharded_stream_covers_each_epoch_once(size, world):
    per_rank = [[i for i, _ in _take(ShardedStreamSampler(size, 0, 1, r, world), 3 * size)] for r in range(world)]
    merged = [per_rank[g % world][g // world] for g in range(3 * size)]  # global order
    for epoch in range(3):
        assert sorted(merged[epoch * size:(epoch + 1) * size]) == list(range(size))
    assert merged[:size] != merged[size:2 * size]  # reshuffled per epoch


def test_stream_resumes_exactly():
    full = _take(ShardedStreamSampler(9, 4, 0, 1, 2), 25)
    resumed = _take(ShardedStreamSampler(9, 4, 0, 1, 2, start=11), 14)
    assert resumed == full[11:]
    assert len({s for _, s in full}) == len(full)  # distinct sample seeds
    assert sample_seed(1, 0, 5) != sample_seed(1, 1, 5)


def test_finite_val_stream_partitions():
    parts = [list(ShardedStreamSampler(7, 0, 2, r, 3, infinite=False)) for r in range(3)]
    assert sorted(i for p in parts for i, _ in p) == list(range(7))
    assert [len(ShardedStreamSampler(7, 0, 2, r, 3, infinite=False)) for r in range(3)] == [3, 2, 2]


def test_weak_crop_in_the_data_stage(tiny_demo):
    """The paper's weak view crops: weak and strong views share the crop, boxes are clipped to it, and boxes
    the crop leaves smaller than augment.crop_min_box are dropped (with their labels)."""
    from acrst_fast.data.build import load_datasets
    from acrst_fast.data.loader import TorchDataStage
    from conftest import tiny_config_dict
    from acrst_fast.config import DataConfig

    raw = tiny_config_dict(tiny_demo, tiny_demo / "unused")["data"]
    data = load_datasets(DataConfig(**raw))
    counts = {}
    for min_box in (1.0, 30.0):
        aug = AugmentConfig(scales=[96], max_size=128, crop_prob=1.0, crop_min_frac=0.5, crop_min_box=min_box)
        stage = TorchDataStage(data.labeled, data.unlabeled, data.val, aug, 4, 4, seed=3, rank=0, world=1,
                               num_workers=0, labeled_views=("weak", "strong"))
        batch = next(stage.labeled(0))
        n = 0
        for weak, strong, boxes, labels, g in zip(batch.weak, batch.strong, batch.boxes, batch.labels, batch.geometry):
            assert weak.shape == strong.shape and weak.shape[1:] == g.out_hw
            assert g.out_hw != g.resized_hw  # cropped
            w_h = boxes[:, 2:] - boxes[:, :2]
            assert len(boxes) == len(labels) and bool((w_h >= min_box).all())
            assert bool((boxes[:, 2] <= g.out_hw[1]).all() and (boxes[:, 3] <= g.out_hw[0]).all())
            n += len(boxes)
        counts[min_box] = n
    assert counts[30.0] < counts[1.0]  # the same crops: the larger minimum drops boxes
