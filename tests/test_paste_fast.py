"""Fast crop-paste paths against the reference: the C++ planner (bit-exact for the same draws)
and the Triton kernel (bit-exact under TRITON_INTERPRET=1 on CPU; on a GPU too, where one is)."""
import random
import warnings

import pytest
import torch

from acrst_fast import _ext
from acrst_fast.augment import (PasteConfig, draw_uniforms, merge_pastes, merge_pastes_ref, paste_pixels,
                                paste_pixels_ref, plan_paste, plan_paste_ref)
from acrst_fast.augment import planner
from acrst_fast.kernels.crop_paste import paste_pixels_triton
from conftest import cpu_and_cuda


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)  # fresh each run; reported on failure


def _scene(gen, n_images, n_boxes, n_classes, n_entries, max_hw=300):
    hw = [(int(torch.randint(8, max_hw, (), generator=gen)), int(torch.randint(8, max_hw, (), generator=gen)))
          for _ in range(n_images)]
    boxes, labels = [], []
    for h, w in hw:
        n = int(torch.randint(0, n_boxes + 1, (), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) - 5  # some cross the border
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) / 2
        wh[: n // 4] = 0  # degenerate boxes among them
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(1, n_classes + 1, (n,), generator=gen))
    slots = torch.randperm(4 * n_entries + 1, generator=gen)[:n_entries]
    classes = torch.randint(1, n_classes + 1, (n_entries,), generator=gen)
    size_hw = torch.rand(n_entries, 2, generator=gen) * 1.5 * max_hw + 1  # some larger than the image
    probs = torch.rand(n_classes, generator=gen, dtype=torch.float64)
    probs[torch.rand(n_classes, generator=gen) < 0.3] = 0
    return hw, boxes, labels, slots, classes, size_hw, probs


def _assert_same_plan(a, b, seed):
    assert torch.equal(a.ops, b.ops), f"seed {seed}"
    for x, y, name in ((a.boxes, b.boxes, "boxes"), (a.labels, b.labels, "labels"), (a.pasted, b.pasted, "pasted")):
        assert len(x) == len(y), f"seed {seed}: {name}"
        for i, (u, v) in enumerate(zip(x, y)):
            assert u.dtype == v.dtype and torch.equal(u, v), f"seed {seed}: {name} of image {i}"


@pytest.mark.parametrize("n_images,n_boxes,n_entries,cfg", [
    (1, 0, 0, PasteConfig()),                                     # empty bank: nothing pasted
    (3, 0, 5, PasteConfig(n_min=0, n_max=0)),                     # nothing asked for
    (8, 6, 20, PasteConfig(n_min=1, n_max=6, min_size=1)),
    (16, 50, 60, PasteConfig(n_min=10, n_max=10, visibility_threshold=0.3)),
    (4, 3, 10, PasteConfig(n_min=20, n_max=20, scale_min=2.0, scale_max=4.0, min_size=2)),  # heavy occlusion
])
def test_cpp_planner_equals_reference(n_images, n_boxes, n_entries, cfg):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    hw, boxes, labels, slots, classes, size_hw, probs = _scene(gen, n_images, n_boxes, 5, n_entries)
    draws = draw_uniforms(n_images, cfg, gen)
    ref = plan_paste_ref(hw, boxes, labels, slots, classes, size_hw, probs, cfg, draws=draws)
    fast = plan_paste(hw, boxes, labels, slots, classes, size_hw, probs, cfg, draws=draws)
    _assert_same_plan(ref, fast, seed)
    for (h, w), op in zip([hw[i] for i in fast.ops[:, 0].tolist()], fast.ops.tolist()):
        assert op[4] <= h and op[5] <= w  # the whole crop fits the image
        assert -(op[5] // 2) <= op[2] <= w - op[5] + op[5] // 2 and -(op[4] // 2) <= op[3] <= h - op[4] + op[4] // 2


def test_cpp_planner_is_seeded_by_the_generator():
    gen = torch.Generator().manual_seed(0)
    scene = _scene(gen, 6, 4, 3, 12)
    cfg = PasteConfig(n_min=3, n_max=5)
    a = plan_paste(*scene, cfg, torch.Generator().manual_seed(7))
    b = plan_paste(*scene, cfg, torch.Generator().manual_seed(7))
    c = plan_paste(*scene, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.ops, b.ops) and not torch.equal(a.ops, c.ops)


def test_given_placements_full_occlusion_and_borders():
    own = [torch.tensor([[10.0, 10, 20, 20], [30.0, 30, 35, 35]])]
    lab = [torch.tensor([1, 2])]
    ops = torch.tensor([[0, 5, 8, 8, 7, 14, 0],     # rows 8..15: covers the top of own box 0
                        [0, 6, 8, 15, 7, 14, 1],    # rows 15..22: the rest; together they hide it
                        [0, 7, -3, -3, 6, 6, 0],    # at the corner, clipped to 3 x 3 < min_size: dropped
                        [0, 8, 36, 36, 8, 8, 0]])   # hangs over the bottom-right border, clipped
    op_labels = torch.tensor([3, 4, 5, 6])
    for fn in (merge_pastes_ref, merge_pastes):
        plan = fn([(40, 40)], own, lab, ops, op_labels, 4, 0.0)
        assert plan.ops[:, 1].tolist() == [5, 6, 8]
        assert plan.labels[0].tolist() == [2, 3, 4, 6] and plan.pasted[0].tolist() == [False, True, True, True]
        assert plan.boxes[0][-1].tolist() == [36.0, 36, 40, 40]


@pytest.mark.parametrize("bad,match", [
    (dict(boxes=[torch.tensor([[0.0, 0, 5, 5], [4.0, 4, 2, 9]])], labels=[torch.tensor([1, 1])]),
     "box 1 of image 0 is non-finite or inverted"),
    (dict(boxes=[torch.tensor([[0.0, float("inf"), 5, 5]])]), "box 0 of image 0"),
    (dict(labels=[torch.tensor([1, 1])]), "labels has shape \\[2\\], expected \\[1\\]"),
    (dict(ops=torch.tensor([[0, 1, 0, 0, 50, 5, 0]])), "op 0: crop 50 x 5 is larger than image 0"),
    (dict(ops=torch.tensor([[0, 1, 0, 0, 5, 5, 0], [1, 1, 0, 0, 5, 5, 0]])), "op 1 names image 1 of 1"),
    (dict(hw=[(40, 40), (40, 40)]), "image sizes"),
])
def test_cpp_planner_rejects_bad_input(bad, match):
    args = dict(hw=[(40, 40)], boxes=[torch.tensor([[0.0, 0, 5, 5]])], labels=[torch.tensor([1])],
                ops=torch.tensor([[0, 1, 0, 0, 5, 5, 0]]))
    args.update(bad)
    op_labels = torch.ones(len(args["ops"]), dtype=torch.int64)
    with pytest.raises(ValueError, match=match):
        merge_pastes(args["hw"], args["boxes"], args["labels"], args["ops"], op_labels, 1, 0.0)


def test_cpp_planner_rejects_bad_bank_and_probs():
    gen = torch.Generator().manual_seed(0)
    hw, boxes, labels, slots, classes, size_hw, probs = _scene(gen, 2, 2, 3, 4)
    with pytest.raises(ValueError, match="class_probs\\[1\\]"):
        plan_paste(hw, boxes, labels, slots, classes, size_hw, torch.tensor([1.0, float("nan"), 1.0]), PasteConfig(), gen)
    with pytest.raises(ValueError, match="bank entry 0 has class 9"):
        plan_paste(hw, boxes, labels, slots, torch.full((4,), 9), size_hw, probs, PasteConfig(), gen)


def test_planner_falls_back_with_one_warning(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    scene = _scene(gen, 4, 3, 3, 8)
    cfg = PasteConfig(n_min=2, n_max=4)
    draws = draw_uniforms(4, cfg, gen)
    fast = plan_paste(*scene, cfg, draws=draws)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slow = planner.plan_paste(*scene, cfg, draws=draws)
        planner.plan_paste(*scene, cfg, draws=draws)
    assert sum(issubclass(w.category, RuntimeWarning) for w in caught) == 1
    _assert_same_plan(fast, slow, 1)


def _random_ops(gen, hw, n_slots, per_image):
    ops = []
    for n, (h_img, w_img) in enumerate(hw):
        for _ in range(per_image):
            h = int(torch.randint(1, h_img + 1, (), generator=gen))
            w = int(torch.randint(1, w_img + 1, (), generator=gen))
            x0 = int(torch.randint(-(w // 2), w_img - w + w // 2 + 1, (), generator=gen))
            y0 = int(torch.randint(-(h // 2), h_img - h + h // 2 + 1, (), generator=gen))
            ops.append([n, int(torch.randint(n_slots, (), generator=gen)), x0, y0, h, w,
                        int(torch.randint(2, (), generator=gen))])
    return torch.tensor(ops, dtype=torch.int64).reshape(-1, 7)


@pytest.mark.parametrize("device", cpu_and_cuda(triton=True))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("aspect", [False, True])  # crops stored at their own (h, w) in their cells
def test_triton_paste_equals_reference(device, dtype, channels_last, aspect):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    crop = int(torch.randint(2, 20, (), generator=gen))
    bank = torch.randint(0, 256, (12, 3, crop, crop), dtype=torch.uint8, generator=gen)
    bank_hw = torch.randint(1, crop + 1, (12, 2), generator=gen) if aspect else None
    hw = [(int(torch.randint(1, 45, (), generator=gen)), int(torch.randint(1, 70, (), generator=gen))) for _ in range(3)]
    hw_t = torch.tensor(hw)
    H, W = int(hw_t[:, 0].max()) + 3, int(hw_t[:, 1].max()) + 5  # padding the kernel must not touch
    ops = _random_ops(gen, hw, len(bank), per_image=7)  # overlapping pastes, some over the borders
    base = torch.rand(3, 3, H, W, generator=gen)
    base = (base * 255).round().to(dtype) if dtype == torch.uint8 else base.to(dtype)
    expect = paste_pixels_ref(base.clone(), ops, bank, hw, bank_hw)
    images = base.clone().to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    out = paste_pixels_triton(images, ops.to(device), bank.to(device), hw_t, bank_hw=bank_hw)
    assert out.data_ptr() == images.data_ptr()  # in place
    if device == "cpu":
        assert torch.equal(out, expect), f"seed {seed}: {(out.float() - expect.float()).abs().max()}"
    else:  # FMA contraction on the GPU may move a value across a rounding boundary
        torch.testing.assert_close(out.cpu().float(), expect.float(), atol=1.0 if dtype == torch.uint8 else 1e-2,
                                   rtol=0, msg=lambda m: f"seed {seed}: {m}")
    assert not torch.equal(expect, base)  # something was pasted


@pytest.mark.parametrize("device", cpu_and_cuda(triton=True))
def test_triton_paste_later_wins_and_empty_ops(device):
    bank = torch.stack([torch.full((3, 4, 4), 10, dtype=torch.uint8), torch.full((3, 4, 4), 200, dtype=torch.uint8)])
    bank = bank.to(device)
    images = torch.zeros(1, 3, 10, 10, dtype=torch.uint8, device=device)
    hw = torch.tensor([[10, 10]])
    assert torch.equal(paste_pixels_triton(images, torch.zeros((0, 7), dtype=torch.int64), bank, hw), torch.zeros_like(images))
    ops = torch.tensor([[0, 0, 0, 0, 6, 6, 0], [0, 1, 3, 3, 6, 6, 1]])
    out = paste_pixels_triton(images, ops, bank, hw)[0, 0].cpu()
    assert (out[3:9, 3:9] == 200).all() and (out[:3, :6] == 10).all() and (out[:3, 6:] == 0).all()


@pytest.mark.parametrize("bad,match", [
    (dict(images=torch.zeros(1, 3, 10, 10, dtype=torch.int32)), "uint8/float32"),
    (dict(images=torch.zeros(1, 3, 10, 20)[..., ::2]), "dense"),
    (dict(bank=torch.zeros(2, 3, 4, 4)), "uint8 Tensor"),
    (dict(bank=torch.zeros(2, 1, 4, 4, dtype=torch.uint8)), "channels"),
    (dict(ops=torch.tensor([[0, 5, 0, 0, 2, 2, 0]])), "slot outside"),
    (dict(ops=torch.tensor([[1, 0, 0, 0, 2, 2, 0]])), "names an image"),
    (dict(ops=torch.tensor([[0, 0, 0, 0, 2, 2, 0]], dtype=torch.int32)), "int64"),
    (dict(hw=torch.tensor([[10, 10], [10, 10]])), "image_hw"),
    (dict(bank_hw=torch.tensor([[4, 4], [5, 1]])), "bank_hw must lie in 1..4"),
    (dict(bank_hw=torch.tensor([[0, 4], [4, 4]])), "bank_hw must lie in 1..4"),
])
@pytest.mark.triton_cpu  # CPU tensors: the checks ahead of the launch, under the interpreter
def test_triton_paste_checks_inputs(bad, match):
    args = dict(images=torch.zeros(1, 3, 10, 10), hw=torch.tensor([[10, 10]]),
                ops=torch.tensor([[0, 0, 0, 0, 2, 2, 0], [0, 1, 1, 1, 2, 2, 0]]),
                bank=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), bank_hw=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        paste_pixels_triton(args["images"], args["ops"], args["bank"], args["hw"], bank_hw=args["bank_hw"])


def test_paste_pixels_dispatch_on_lists():
    gen = torch.Generator().manual_seed(_seed())
    bank = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    hw = [(20, 30), (33, 12)]
    ops = _random_ops(gen, hw, 4, per_image=3)
    images = [torch.rand(3, h, w, generator=gen) for h, w in hw]
    expect = paste_pixels_ref([im.clone() for im in images], ops, bank)
    out = paste_pixels([im.clone() for im in images], ops, bank)
    assert all(torch.equal(a, b) for a, b in zip(out, expect))
