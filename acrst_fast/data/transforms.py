"""Weak (geometric) and strong (photometric) views, plain torch (the fallback data stage).

Images are float32 Tensor[3, H, W] in [0, 1]; boxes are float32 Tensor[N, 4] (x1, y1, x2, y2)
in absolute pixels. All randomness comes from a `torch.Generator` seeded per sample, so a view
depends only on (run seed, stream, position in the stream): the same for any number of loader
workers, and again after a resume.

The strong view is the weak view plus photometric ops only, so teacher boxes predicted on the
weak view land on the strong view's pixels unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from acrst_fast.config import AugmentConfig


@dataclass(frozen=True)
class Geometry:
    """original (h, w) -> resize by `scale` -> optional crop (x0, y0, out_w, out_h) -> optional h-flip."""

    scale: float
    resized_hw: tuple[int, int]
    crop: tuple[int, int, int, int]  # x0, y0, width, height inside the resized image
    flip: bool

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.crop[3], self.crop[2]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _bernoulli(gen: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=gen)) < p


def resize_scale(h: int, w: int, short: int, max_size: int) -> float:
    """Scale that brings the short side to `short` unless the long side would exceed `max_size`."""
    return min(short / min(h, w), max_size / max(h, w))


def sample_geometry(gen: torch.Generator | None, h: int, w: int, cfg: AugmentConfig, train: bool) -> Geometry:
    """Random resize (short side from cfg.scales), crop and flip for training; fixed test scale otherwise."""
    if train:
        short = cfg.scales[int(torch.randint(len(cfg.scales), (), generator=gen))]
    else:
        short = cfg.test_scale
    scale = resize_scale(h, w, short, cfg.max_size)
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    crop = (0, 0, rw, rh)
    flip = False
    if train:
        if _bernoulli(gen, cfg.crop_prob):
            cw = max(1, round(rw * _uniform(gen, cfg.crop_min_frac, 1.0)))
            ch = max(1, round(rh * _uniform(gen, cfg.crop_min_frac, 1.0)))
            x0 = int(torch.randint(rw - cw + 1, (), generator=gen))
            y0 = int(torch.randint(rh - ch + 1, (), generator=gen))
            crop = (x0, y0, cw, ch)
        flip = _bernoulli(gen, cfg.flip_prob)
    return Geometry(scale, (rh, rw), crop, flip)


def apply_geometry_to_image(image: torch.Tensor, g: Geometry) -> torch.Tensor:
    """image (Tensor[3, H, W] float) -> Tensor[3, out_h, out_w]."""
    out = F.interpolate(image[None], size=g.resized_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    x0, y0, cw, ch = g.crop
    out = out[:, y0:y0 + ch, x0:x0 + cw]
    if g.flip:
        out = out.flip(-1)
    return out.clamp_(0.0, 1.0).contiguous()


def apply_geometry_to_boxes(boxes: torch.Tensor, g: Geometry, min_size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """boxes (Tensor[N, 4]) in original pixels -> (boxes in view pixels, keep mask Tensor[N] bool).

    Boxes are clipped to the crop; those left narrower or shorter than `min_size` pixels are dropped.
    """
    x0, y0, cw, ch = g.crop
    b = boxes * g.scale
    b = b - torch.tensor([x0, y0, x0, y0], dtype=b.dtype)
    b[:, 0::2] = b[:, 0::2].clamp(0, cw)
    b[:, 1::2] = b[:, 1::2].clamp(0, ch)
    if g.flip:
        b = torch.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], dim=1)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    return b[keep], keep


def boxes_to_original(boxes: torch.Tensor, g: Geometry) -> torch.Tensor:
    """Inverse of `apply_geometry_to_boxes` (without the clipping): view pixels -> original pixels."""
    x0, y0, cw, _ = g.crop
    b = boxes.clone()
    if g.flip:
        b = torch.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], dim=1)
    b = b + torch.tensor([x0, y0, x0, y0], dtype=b.dtype)
    return b / g.scale


@dataclass(frozen=True)
class StrongParams:
    """The random draws of one strong view (identity values where an op is off).

    jitter_order: order of (brightness, contrast, saturation, hue), empty when jitter is off;
    hue in [-0.5, 0.5] turns; blur_sigma 0 = no blur; erase: (y, x, h, w, (r, g, b)) rectangles."""

    jitter_order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float
    erase: tuple[tuple[int, int, int, int, tuple[float, float, float]], ...]


def sample_strong(gen: torch.Generator, cfg: AugmentConfig, h: int, w: int) -> StrongParams:
    """Draw the strong view's parameters for an image of h x w (the same draws, in the same order,
    whichever pipeline then applies them)."""
    order, factors = (), [1.0, 1.0, 1.0, 0.0]
    if _bernoulli(gen, cfg.jitter_prob):
        b, c, s, hue = cfg.jitter
        order = tuple(torch.randperm(4, generator=gen).tolist())
        drawn = [_uniform(gen, max(0.0, 1 - b), 1 + b), _uniform(gen, max(0.0, 1 - c), 1 + c),
                 _uniform(gen, max(0.0, 1 - s), 1 + s), _uniform(gen, -hue, hue)]
        factors = [d if amount > 0 else ident for d, amount, ident in zip(drawn, cfg.jitter, factors)]
    gray = _bernoulli(gen, cfg.grayscale_prob)
    sigma = _uniform(gen, cfg.blur_sigma[0], cfg.blur_sigma[1]) if _bernoulli(gen, cfg.blur_prob) else 0.0
    erase = []
    for p, lo, hi in cfg.cutout:
        if not _bernoulli(gen, p):
            continue
        area = _uniform(gen, lo, hi) * h * w
        aspect = math.exp(_uniform(gen, math.log(0.3), math.log(3.3)))
        eh = min(h, max(1, round(math.sqrt(area * aspect))))
        ew = min(w, max(1, round(math.sqrt(area / aspect))))
        y = int(torch.randint(h - eh + 1, (), generator=gen))
        x = int(torch.randint(w - ew + 1, (), generator=gen))
        erase.append((y, x, eh, ew, tuple(torch.rand(3, generator=gen).tolist())))
    return StrongParams(order, *factors, gray, sigma, tuple(erase))


def blur_kernel_size(sigma: float) -> int:
    return max(3, int(2 * math.ceil(3 * sigma) + 1))


def apply_strong(image: torch.Tensor, p: StrongParams) -> torch.Tensor:
    """Colour jitter, grayscale, Gaussian blur, CutOut on Tensor[3, H, W] in [0, 1] (new tensor)."""
    img = image.clone()
    ops = (lambda x: TF.adjust_brightness(x, p.brightness), lambda x: TF.adjust_contrast(x, p.contrast),
           lambda x: TF.adjust_saturation(x, p.saturation), lambda x: TF.adjust_hue(x, p.hue))
    identity = (p.brightness == 1.0, p.contrast == 1.0, p.saturation == 1.0, p.hue == 0.0)
    for op in p.jitter_order:
        if not identity[op]:
            img = ops[op](img)
    if p.grayscale:
        img = TF.rgb_to_grayscale(img, num_output_channels=3).contiguous()  # expand()ed view otherwise
    if p.blur_sigma > 0:
        k = blur_kernel_size(p.blur_sigma)
        img = TF.gaussian_blur(img, kernel_size=[k, k], sigma=[p.blur_sigma, p.blur_sigma])
    for y, x, eh, ew, fill in p.erase:
        for c, value in enumerate(fill):  # scalar fills: no host-to-device copy when the image is on a GPU
            img[c, y:y + eh, x:x + ew] = value
    return img.clamp_(0.0, 1.0)


def strong_photometric(image: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Colour jitter, random grayscale, Gaussian blur, CutOut on Tensor[3, H, W] in [0, 1] (new tensor)."""
    return apply_strong(image, sample_strong(gen, cfg, image.shape[1], image.shape[2]))
