"""ACRST core: CropBank, paste planning/pixels, merge with occlusion removal, AFFR sampling."""
import math

import pytest
import torch

from acrst_fast.augment import (
    ACRST, LABELED, PSEUDO, CropBank, PasteConfig, PseudoRecall, class_histogram, kl_divergence, merge_boxes,
    paste_pixels_ref,
    plan_paste_ref, sampling_probs,
)
from acrst_fast.augment.paste import OP_FLIP, OP_H, OP_SLOT, OP_W, OP_X0, OP_Y0, covered_area
from conftest import seeds


def _gen(seed: int):
    """A generator of a fixed seed (from `seeds()`: fixed cases, plus a fresh one with ACRST_FRESH_SEEDS)."""
    return seed, torch.Generator().manual_seed(seed)


def _solid_bank(num_classes=3, capacity=4, crop_size=8):
    """A bank whose crop for class k is a solid colour k * 40 (all channels), box size 10 x 20."""
    bank = CropBank(num_classes, capacity, crop_size)
    for k in range(1, num_classes + 1):
        img = torch.full((3, 40, 40), k * 40 / 255.0)
        bank.add(LABELED, [img], [torch.tensor([[5.0, 5.0, 25.0, 15.0]])], [torch.tensor([k])])
    return bank


# ---------------------------------------------------------------- CropBank

def test_bank_stores_crops_with_sizes_and_budget():
    bank = _solid_bank()
    assert bank.fill()[LABELED].tolist() == [1, 1, 1] and bank.fill()[PSEUDO].sum() == 0
    slots, classes, size_hw = bank.entries((LABELED,))
    assert classes.tolist() == [1, 2, 3]
    assert size_hw.tolist() == [[10.0, 20.0]] * 3
    assert (bank.pixels[slots[1]] == 80).all()
    assert bank.nbytes == 2 * 3 * 4 * (3 * 8 * 8 + 4 + 4 + 4 + 1)  # fixed at construction


def test_labeled_reservoir_and_pseudo_ring():
    bank = CropBank(1, capacity=3, crop_size=4)
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 20, 20)
    for i in range(10):
        box = torch.tensor([[0.0, 0.0, 4.0 + i, 4.0]])
        bank.add(LABELED, [img], [box], [torch.tensor([1])], generator=gen)
        bank.add(PSEUDO, [img], [box], [torch.tensor([1])], [torch.tensor([0.5 + i / 100])], gen)
    assert bank.fill()[:, 0].tolist() == [3, 3] and bank.seen[:, 0].tolist() == [10, 10]
    _, _, pseudo_sizes = bank.entries((PSEUDO,))
    assert sorted(pseudo_sizes[:, 1].tolist()) == [11.0, 12.0, 13.0]  # the ring keeps the newest 3
    _, _, lab_sizes = bank.entries((LABELED,))
    assert len(set(lab_sizes[:, 1].tolist())) == 3  # a reservoir sample of distinct offers


def test_reservoir_is_uniform():
    counts = torch.zeros(20)
    for trial in range(300):
        bank = CropBank(1, capacity=5, crop_size=2)
        gen = torch.Generator().manual_seed(trial)
        img = torch.rand(3, 30, 30)
        for i in range(20):
            bank.add(LABELED, [img], [torch.tensor([[0.0, 0.0, 2.0 + i * 0.5, 2.0]])], [torch.tensor([1])],
                     generator=gen)
        _, _, sizes = bank.entries((LABELED,))
        for w in sizes[:, 1].tolist():
            counts[round((w - 2.0) / 0.5)] += 1
    expected = 300 * 5 / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8, (chi2, counts)  # chi-square, 19 degrees of freedom, p = 0.001


def test_bank_state_round_trip_and_bad_label():
    bank = _solid_bank()
    other = CropBank(3, 4, 8)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.pixels, bank.pixels) and (other.seen == bank.seen).all()
    with pytest.raises(ValueError, match="CropBank state is for"):
        CropBank(3, 5, 8).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError, match="label 4 is outside 1..3"):
        bank.add(LABELED, [torch.rand(3, 9, 9)], [torch.tensor([[0.0, 0, 5, 5]])], [torch.tensor([4])])


# ---------------------------------------------------------------- pixels and boxes

@pytest.mark.parametrize("seed", seeds(tuple(range(8))))
def test_pasted_pixels_appear_exactly_where_boxes_say(seed):
    seed, gen = _gen(seed)
    bank = _solid_bank()
    slots, classes, size_hw = bank.entries((LABELED,))
    cfg = PasteConfig(n_min=1, n_max=3, scale_min=0.5, scale_max=2.0, min_size=2)
    hw = [(30, 50), (64, 40)]
    empty = [torch.zeros((0, 4)), torch.zeros((0, 4))]
    plan = plan_paste_ref(hw, empty, [torch.zeros(0, dtype=torch.int64)] * 2, slots, classes, size_hw,
                          torch.full((3,), 1 / 3), cfg, gen)
    images = paste_pixels_ref([torch.zeros(3, h, w) for h, w in hw], plan.ops, bank.pixels)
    for i, image in enumerate(images):
        expect = torch.zeros(image.shape[1:])
        for op in plan.ops[plan.ops[:, 0] == i].tolist():
            x0, y0, h, w = op[OP_X0], op[OP_Y0], op[OP_H], op[OP_W]
            value = (int(classes[slots.tolist().index(op[OP_SLOT])]) * 40) / 255.0
            expect[max(y0, 0):max(0, y0 + h), max(x0, 0):max(0, x0 + w)] = value  # later pastes win
        assert torch.allclose(image[0], expect, atol=1e-6), f"seed {seed}"
        # every kept box is the clipped rectangle of its paste, inside the image
        for b in plan.boxes[i]:
            assert 0 <= b[0] < b[2] <= image.shape[2] and 0 <= b[1] < b[3] <= image.shape[1]


def test_flip_and_scale_of_a_gradient_crop():
    bank = CropBank(1, 1, crop_size=4)
    img = torch.zeros(3, 10, 10)
    img[:, 0:4, 0:4] = torch.tensor([0.0, 0.25, 0.5, 0.75])  # a left-to-right ramp
    bank.add(LABELED, [img], [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [torch.tensor([1])])
    ops = torch.tensor([[0, 0, 2, 3, 4, 4, 1]])  # same size, flipped, at (2, 3)
    out = paste_pixels_ref([torch.ones(3, 10, 10)], ops, bank.pixels)[0]
    stored = bank.pixels[0, 0, 0].float() / 255
    torch.testing.assert_close(out[0, 3, 2:6], stored.flip(0), atol=1e-6, rtol=0)
    assert (out[:, :3] == 1).all() and (out[:, 7:] == 1).all()


def test_border_crops_clip_pixels_and_boxes_together():
    bank = _solid_bank()
    slot = int(bank.entries((LABELED,))[0][0])
    ops = torch.tensor([[0, slot, -4, 22, 10, 20, 0]])  # hangs over the left and bottom borders
    out = paste_pixels_ref([torch.zeros(3, 30, 30)], ops, bank.pixels)[0]
    painted = torch.nonzero(out[0] > 0)
    assert painted[:, 1].min() == 0 and painted[:, 1].max() == 15  # x in [0, 16)
    assert painted[:, 0].min() == 22 and painted[:, 0].max() == 29  # y in [22, 30)
    gen = torch.Generator().manual_seed(3)
    slots, classes, size_hw = bank.entries((LABELED,))
    for _ in range(20):
        plan = plan_paste_ref([(30, 30)], [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.int64)], slots, classes,
                              size_hw, torch.ones(3) / 3, PasteConfig(n_min=5, n_max=5, min_size=1), gen)
        img = paste_pixels_ref([torch.zeros(3, 30, 30)], plan.ops, bank.pixels)[0]
        last = plan.ops[-1].tolist()
        box = plan.boxes[0][-1]  # the last paste is never occluded
        x1, y1, x2, y2 = (int(v) for v in box.tolist())
        assert (x1, y1, x2, y2) == (max(last[OP_X0], 0), max(last[OP_Y0], 0),
                                    min(last[OP_X0] + last[OP_W], 30), min(last[OP_Y0] + last[OP_H], 30))
        assert (img[0, y1:y2, x1:x2] > 0).all()


def test_covered_area_exact():
    box = torch.tensor([0.0, 0, 10, 10])
    assert covered_area(box, torch.zeros((0, 4))) == 0
    assert covered_area(box, torch.tensor([[0.0, 0, 5, 10], [5.0, 0, 10, 10]])) == pytest.approx(100)
    assert covered_area(box, torch.tensor([[0.0, 0, 6, 6], [4.0, 4, 10, 10]])) == pytest.approx(36 + 36 - 4)
    assert covered_area(box, torch.tensor([[-5.0, -5, 2, 2], [20.0, 20, 30, 30]])) == pytest.approx(4)


def test_merge_removes_fully_occluded_keeps_partly_covered():
    own = torch.tensor([[10.0, 10, 20, 20], [30.0, 30, 40, 40], [0.0, 0, 4, 4]])
    own_labels = torch.tensor([1, 2, 3])
    pastes = torch.tensor([[8.0, 8, 22, 15], [8.0, 15, 22, 22], [35.0, 35, 50, 50], [0.0, 0, 3, 3]])
    boxes, labels, pasted = merge_boxes(own, own_labels, pastes, torch.tensor([4, 5, 6, 7]), 0.0)
    # own box 1 is covered by the union of pastes 1+2 (neither alone covers it): removed
    assert labels.tolist() == [2, 3, 4, 5, 6, 7] and pasted.tolist() == [False, False, True, True, True, True]
    # a paste covered by a later one is removed too; an earlier paste does not hide a later one
    boxes, labels, _ = merge_boxes(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64),
                                   torch.tensor([[5.0, 5, 8, 8], [0.0, 0, 10, 10]]), torch.tensor([1, 2]), 0.0)
    assert labels.tolist() == [2]
    # visibility threshold: box 30..40 is 25% covered -> 75% visible; removed at threshold 0.8
    _, labels, _ = merge_boxes(own[1:2], own_labels[1:2], pastes[2:3], torch.tensor([6]), 0.8)
    assert labels.tolist() == [6]


def test_empty_bank_and_images_without_boxes():
    bank = CropBank(3, 4, 8)
    slots, classes, size_hw = bank.entries((LABELED, PSEUDO))
    gen = torch.Generator().manual_seed(0)
    own = [torch.tensor([[1.0, 1, 5, 5]]), torch.zeros((0, 4))]
    own_labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
    plan = plan_paste_ref([(20, 20), (20, 20)], own, own_labels, slots, classes, size_hw, torch.ones(3) / 3,
                          PasteConfig(n_min=2, n_max=5), gen)
    assert plan.ops.shape == (0, 7) and plan.boxes[0].tolist() == [[1.0, 1, 5, 5]] and len(plan.boxes[1]) == 0
    acrst = ACRST(3, capacity=2, crop_size=8)
    images = [torch.rand(3, 20, 20)]
    before = images[0].clone()
    out, boxes, labels, pasted = acrst.rebalance(images, [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.int64)],
                                                 gen)
    assert torch.equal(out[0], before) and len(boxes[0]) == 0 and pasted[0].dtype == torch.bool


# ---------------------------------------------------------------- AFFR

def test_sampling_probs_formula_and_edge_cases():
    pr = torch.tensor([1.0, 4.0, 16.0])
    mu = sampling_probs(pr, 0.5)
    torch.testing.assert_close(mu, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64) / 1.75)
    assert torch.equal(sampling_probs(pr, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    zero = sampling_probs(torch.tensor([0.0, 2.0, 8.0]), 0.6)  # unseen class: weight of the rarest seen
    assert torch.isfinite(zero).all() and zero[0] == zero[1] and zero.sum() == pytest.approx(1)
    assert torch.equal(sampling_probs(torch.zeros(4), 0.6), torch.full((4,), 0.25, dtype=torch.float64))


def test_pseudo_recall_window_and_threshold():
    pr = PseudoRecall(num_classes=3, window=2, threshold=0.1)
    pred = lambda s, l: {"scores": torch.tensor(s), "labels": torch.tensor(l)}  # noqa: E731
    pr.update([pred([0.9, 0.05, 0.3], [1, 2, 3])])
    pr.update([pred([0.5], [1]), pred([], [])])
    torch.testing.assert_close(pr.value(), torch.tensor([1.4, 0.0, 0.3], dtype=torch.float64))
    pr.update([pred([0.2], [2])])  # the first step leaves the window
    torch.testing.assert_close(pr.value(), torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64))
    copy = PseudoRecall(3, 2)
    copy.load_state_dict(pr.state_dict())
    assert torch.equal(copy.value(), pr.value()) and copy.steps == 3


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.5])
@pytest.mark.parametrize("seed", seeds())
def test_class_sampling_follows_mu(beta, seed):
    """Chi-square goodness of fit of sampled pasted classes against mu (restricted to available classes), at
    p = 0.001 (3 degrees of freedom): fixed seeds, so CI does not fail one run in a few hundred by chance."""
    seed, gen = _gen(seed)
    bank = _solid_bank(num_classes=4)
    slots, classes, size_hw = bank.entries((LABELED,))
    mu = sampling_probs(torch.tensor([50.0, 10.0, 2.0, 1.0]), beta)
    plan = plan_paste_ref([(200, 200)] * 400, [torch.zeros((0, 4))] * 400, [torch.zeros(0, dtype=torch.int64)] * 400,
                          slots, classes, size_hw, mu, PasteConfig(n_min=5, n_max=5, min_size=1), gen)
    # count the paste ops (what was sampled), not the merged boxes (occlusion removes some)
    op_classes = classes[[slots.tolist().index(s) for s in plan.ops[:, OP_SLOT].tolist()]]
    counts = torch.bincount(op_classes - 1, minlength=4).double()
    expected = mu * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, f"seed {seed}: chi2 {chi2}, counts {counts.tolist()}, expected {expected.tolist()}"


def test_classes_missing_from_bank_are_not_sampled():
    bank = CropBank(3, 2, 8)
    bank.add(LABELED, [torch.rand(3, 20, 20)], [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([2])])
    slots, classes, size_hw = bank.entries((LABELED,))
    plan = plan_paste_ref([(40, 40)] * 10, [torch.zeros((0, 4))] * 10, [torch.zeros(0, dtype=torch.int64)] * 10,
                          slots, classes, size_hw, torch.tensor([0.9, 0.05, 0.05]), PasteConfig(n_min=2, n_max=2),
                          torch.Generator().manual_seed(0))
    assert len(plan.ops) > 0 and set(torch.cat(plan.labels).tolist()) == {2}


@pytest.mark.parametrize("seed", seeds())
def test_sampled_distribution_matches_the_planner(seed):
    """`sampled_distribution` (what the logs show) is the planner's: mu with classes lacking a crop removed,
    renormalised. Chi-square of the planner's draws against it, with class 1 (the largest mu) not banked."""
    from acrst_fast.augment.rebalance import sampled_distribution

    seed, gen = _gen(seed)
    bank = CropBank(3, 4, 8)
    for c in (2, 3):
        bank.add(LABELED, [torch.rand(3, 20, 20)], [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([c])])
    mu = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    sampled = sampled_distribution(mu, bank.fill()[LABELED] > 0)
    assert torch.allclose(sampled, torch.tensor([0.0, 2 / 3, 1 / 3], dtype=torch.float64))
    assert sampled_distribution(mu, torch.zeros(3, dtype=torch.bool)).sum() == 0  # nothing to paste
    slots, classes, size_hw = bank.entries((LABELED,))
    plan = plan_paste_ref([(60, 60)] * 300, [torch.zeros((0, 4))] * 300, [torch.zeros(0, dtype=torch.int64)] * 300,
                          slots, classes, size_hw, mu, PasteConfig(n_min=3, n_max=3, min_size=1), gen)
    op_classes = classes[[slots.tolist().index(s) for s in plan.ops[:, OP_SLOT].tolist()]]
    counts = torch.bincount(op_classes - 1, minlength=3).double()
    assert counts[0] == 0
    expected = sampled[1:] * counts.sum()
    chi2 = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi2 < 10.83, f"seed {seed}: chi2 {chi2}, counts {counts.tolist()}"  # 1 dof, p = 0.001


def test_acrst_end_to_end_and_kl():
    gen = torch.Generator().manual_seed(0)
    acrst = ACRST(3, capacity=4, crop_size=8, paste=PasteConfig(n_min=2, n_max=2, min_size=1), beta=0.6, pr_window=5)
    weak = [torch.rand(3, 40, 40)]
    acrst.add_ground_truth(weak, [torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([1])])
    preds = [{"boxes": torch.tensor([[5.0, 5, 20, 25], [1.0, 1, 4, 4]]), "labels": torch.tensor([3, 1]),
              "scores": torch.tensor([0.9, 0.2])}]
    pseudo = [{k: v[:1] for k, v in preds[0].items()}]
    acrst.observe_teacher(weak, preds, pseudo, gen)
    assert acrst.bank.fill().tolist() == [[1, 0, 0], [0, 0, 1]]
    torch.testing.assert_close(acrst.recall.value(), torch.tensor([0.2, 0.0, 0.9], dtype=torch.float64))
    images, boxes, labels, pasted = acrst.rebalance([torch.zeros(3, 50, 50)], [torch.tensor([[0.0, 0, 5, 5]])],
                                                    [torch.tensor([2])], gen)
    assert pasted[0].sum() == 2 and labels[0][~pasted[0]].tolist() in ([2], [])
    d = acrst.diagnostics(torch.tensor([1.0, 1.0, 1.0]))
    assert d["pasted_per_image"] == 2 and math.isfinite(d["kl_gt_pl"]) and d["kl_gt_pl"] > 0
    assert kl_divergence(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(0.0)
    clone = ACRST(3, capacity=4, crop_size=8, pr_window=5)
    clone.load_state_dict(acrst.state_dict())
    assert torch.equal(clone.bank.pixels, acrst.bank.pixels) and torch.equal(clone.recall.value(), acrst.recall.value())


def test_class_histogram():
    counts = class_histogram(torch.tensor([3, 1, 3, 3]), 4)
    assert counts.dtype == torch.float64 and counts.tolist() == [1.0, 0.0, 3.0, 0.0]
    assert class_histogram(torch.zeros(0, dtype=torch.int64), 2).tolist() == [0.0, 0.0]


def test_crops_keep_their_shape_and_detail():
    """A crop is stored at its own aspect ratio (scaled down only past crop_size) in its cell's top-left
    corner; a box that fits is stored pixel for pixel, and pasted back at its size it is the original."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 60, 140, generator=gen)
    image = (image * 255).round() / 255
    bank = CropBank(1, 2, crop_size=32)
    small, wide = [5.0, 7.0, 35.0, 17.0], [10.0, 20.0, 130.0, 50.0]  # 30 x 10 (fits), 120 x 30 (scaled down)
    bank.add(LABELED, [image], [torch.tensor([small, wide])], [torch.tensor([1, 1])])
    slots, _, size_hw = bank.entries((LABELED,))
    stored = torch.from_numpy(bank.stored_hw_host())[slots]
    assert stored.tolist() == [[10, 30], [8, 32]]  # 30 / 120 * 32 = 8: the aspect kept, never squashed
    cell = bank.pixels[slots[0]]
    torch.testing.assert_close(cell[:, :10, :30].float(), image[:, 7:17, 5:35] * 255, rtol=0, atol=0.5)
    canvas = torch.zeros(3, 10, 30)
    ops = torch.tensor([[0, int(slots[0]), 0, 0, 10, 30, 0]])
    out = paste_pixels_ref([canvas], ops, bank.pixels, bank_hw=bank.stored_hw_host())[0]
    torch.testing.assert_close(out, image[:, 7:17, 5:35], rtol=0, atol=1 / 255)
    squashed = paste_pixels_ref([torch.zeros(3, 10, 30)], ops, bank.pixels)[0]  # the whole cell, as before
    assert (squashed - image[:, 7:17, 5:35]).abs().mean() > 10 * (out - image[:, 7:17, 5:35]).abs().mean()
