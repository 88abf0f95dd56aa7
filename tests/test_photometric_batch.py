"""The batched strong photometric ops equal `apply_strong` image by image: random draws from the training
config, images of different sizes in one batch, and the edges (no op drawn, every op drawn, a blur kernel
almost as large as the image, CutOut at the borders, one image)."""

import pytest
import torch

from conftest import cpu_and_cuda, seeds
from acrst_fast.config import AugmentConfig
from acrst_fast.data.photometric_batch import apply_strong_batch
from acrst_fast.data.transforms import StrongParams, apply_strong, sample_strong

SEEDS = seeds()
DEVICES = cpu_and_cuda()
ATOL = 2e-5  # float rounding: fused vs separate multiply-adds, masked means, a kernel made on the host


def _images(g: torch.Generator, sizes, device):
    return [torch.rand(3, h, w, generator=g).to(device) for h, w in sizes]


def _check(images, params):
    got = apply_strong_batch(images, params)
    assert len(got) == len(images)
    for i, (im, p) in enumerate(zip(images, params)):
        ref = apply_strong(im, p)
        assert got[i].shape == ref.shape and got[i].device == ref.device
        torch.testing.assert_close(got[i], ref, atol=ATOL, rtol=0, msg=lambda m: f"image {i} ({p}): {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_random_draws_equal_the_per_image_path(seed, device):
    g = torch.Generator().manual_seed(seed)
    cfg = AugmentConfig(jitter_prob=0.9, grayscale_prob=0.3, blur_prob=0.6)
    sizes = [(int(torch.randint(24, 90, (), generator=g)), int(torch.randint(24, 90, (), generator=g)))
             for _ in range(9)]
    params = [sample_strong(g, cfg, h, w) for h, w in sizes]
    assert any(p.blur_sigma > 0 for p in params) and any(p.jitter_order for p in params)
    _check(_images(g, sizes, device), params)


def _params(order=(), factors=(1.0, 1.0, 1.0, 0.0), gray=False, sigma=0.0, erase=()):
    return StrongParams(tuple(order), *factors, gray, sigma, tuple(erase))


@pytest.mark.parametrize("device", DEVICES)
def test_edges(device):
    g = torch.Generator().manual_seed(5)
    sizes = [(40, 30), (13, 64), (64, 13), (50, 50)]
    params = [
        _params(),  # nothing drawn: the image itself
        _params(order=(3, 2, 1, 0), factors=(1.3, 0.6, 1.4, -0.1), gray=True, sigma=1.9,  # every op; kernel 13
                erase=((0, 0, 13, 5, (1.0, 0.0, 0.5)), (8, 60, 5, 4, (0.2, 0.3, 0.4)))),  # at the borders
        _params(order=(0, 1, 2, 3), factors=(0.7, 1.2, 0.0, 0.5), sigma=0.3, erase=((60, 9, 4, 4, (0.0, 0.0, 0.0)),)),
        _params(order=(1, 3, 0, 2), factors=(1.0, 1.4, 1.0, 0.05), gray=True),  # identity factors skipped
    ]
    _check(_images(g, sizes, device), params)
    _check(_images(g, [(20, 21)], device), [params[1]])  # one image (kernel 13 on 20 px)


def test_padding_is_zero_and_inputs_untouched():
    g = torch.Generator().manual_seed(0)
    images = _images(g, [(30, 20), (10, 40)], "cpu")
    before = [im.clone() for im in images]
    out = apply_strong_batch(images, [_params(order=(0,), factors=(1.5, 1, 1, 0)), _params(sigma=1.0)])
    base = out[0]._base if out[0]._base is not None else out[0]
    assert base.shape == (2, 3, 30, 40) and float(base[0, :, :, 20:].abs().max()) == 0.0
    assert float(base[1, :, 10:, :].abs().max()) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(images, before))


def test_mismatch_and_small_images_are_refused():
    with pytest.raises(ValueError, match="2 images but 1 photometric draws"):
        apply_strong_batch([torch.rand(3, 8, 8)] * 2, [_params()])
    with pytest.raises(ValueError, match="blur kernel 13 needs images larger than 6 px; image 0 is 6x30"):
        apply_strong_batch([torch.rand(3, 6, 30)], [_params(sigma=2.0)])
    assert apply_strong_batch([], []) == []
