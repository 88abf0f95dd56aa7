"""The strong views' photometric ops over one padded batch: what `transforms.apply_strong` does image by
image (colour jitter in each image's own order, grayscale, Gaussian blur, CutOut, clamp), in a fixed
number of batched launches instead of a few per image.

    out = apply_strong_batch(images, params)   # images: list of Tensor[3, H_i, W_i] float in [0, 1]

Each image keeps its own draws (`StrongParams`). The per-image factors, kernels and rectangles are packed
on the host and uploaded once (`acrst_fast.host.upload`: page-locked, non-blocking); which images an op
touches is host knowledge (the draws), so nothing reads the device. An op runs only on the images that
draw it: jitter slot j runs each of the four ops on the images whose j-th op it is, the blur one grouped
conv per kernel size. Means (contrast) are taken over each image's own pixels, and the blur reflects at
each image's own border, as on the unpadded image. Returns new tensors, views of one padded batch whose
padding is zero. Equal to the per-image path up to float rounding (tests/test_photometric_batch.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
from torchvision.transforms.v2.functional._misc import _get_gaussian_kernel2d

from acrst_fast.host import upload
from acrst_fast.data.transforms import StrongParams, blur_kernel_size

_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue
_GRAY = (0.2989, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Tensor[B, 1, H, W]: torchvision's luma of Tensor[B, 3, H, W]."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(ratio x + (1 - ratio) other) clamped to [0, 1], with per-image ratio and 1 - ratio (Tensor[B])."""
    return (x * ratio.view(-1, 1, 1, 1) + other * rest.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _jitter(op: int, x: torch.Tensor, f: torch.Tensor, rest: torch.Tensor, area: torch.Tensor,
            valid: torch.Tensor) -> torch.Tensor:
    """Op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) on Tensor[B, 3, H, W] with per-image factors."""
    if op == 0:
        return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == 1:
        mean = (_gray(x) * valid).sum(dim=(1, 2, 3), keepdim=True) / area.view(-1, 1, 1, 1)
        return _blend(x, mean, f, rest)
    if op == 2:
        return _blend(x, _gray(x), f, rest)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=1)
    return _hsv_to_rgb(torch.stack(((h + f.view(-1, 1, 1)).remainder_(1.0), s, v), dim=1))


def _reflect_index(n: int, size: torch.Tensor, pad: int) -> torch.Tensor:
    """Tensor[B, n + 2 pad]: for each image of valid length `size` (Tensor[B]), the source index of every
    position -pad .. n + pad - 1 under reflect padding at the image's own border."""
    pos = torch.arange(-pad, n + pad, device=size.device).view(1, -1)
    last = (size - 1).view(-1, 1)
    idx = torch.where(pos < 0, -pos, torch.where(pos > last, 2 * last - pos, pos))
    return idx.clamp_(0, n - 1)


def _blur(x: torch.Tensor, kernels: torch.Tensor, hw: torch.Tensor, k: int) -> torch.Tensor:
    """Per-image Gaussian blur (kernels: Tensor[B, k, k]) with reflect padding at each image's border."""
    b, c, h, w = x.shape
    r = k // 2
    cols = _reflect_index(w, hw[:, 1], r)[:, None, None, :].expand(b, c, h, w + 2 * r)
    rows = _reflect_index(h, hw[:, 0], r)[:, None, :, None].expand(b, c, h + 2 * r, w + 2 * r)
    padded = x.gather(3, cols).gather(2, rows)
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # [B * C, 1, k, k]
    return F.conv2d(padded.reshape(1, b * c, h + 2 * r, w + 2 * r), weight, groups=b * c).reshape(b, c, h, w)


def _host_tables(params: list[StrongParams]) -> dict[str, torch.Tensor]:
    factors = [(p.brightness, p.contrast, p.saturation, p.hue) for p in params]
    n_rect = max((len(p.erase) for p in params), default=0)
    rects = torch.zeros(len(params), max(n_rect, 1), 7, dtype=torch.float64)  # y, x, h, w, r, g, b
    for i, p in enumerate(params):
        for j, (y, x, eh, ew, fill) in enumerate(p.erase):
            rects[i, j] = torch.tensor([y, x, eh, ew, *fill], dtype=torch.float64)
    f = torch.tensor(factors, dtype=torch.float64).reshape(-1, 4)
    return {"factor": f.float(), "rest": (1.0 - f).float(), "rects": rects.float()}


def _subset(x: torch.Tensor, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    sel = upload(torch.tensor(idx, dtype=torch.int64), device)
    return sel, x.index_select(0, sel)


def apply_strong_batch(images: list[torch.Tensor], params: list[StrongParams]) -> list[torch.Tensor]:
    """`apply_strong(images[i], params[i])` for every i, batched (module doc). images: list of Tensor[3, H_i,
    W_i] float in [0, 1] on one device; returns list of Tensor[3, H_i, W_i] (views of one padded batch)."""
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images but {len(params)} photometric draws")
    if not images:
        return []
    device, n = images[0].device, len(images)
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]  # host shapes
    h_max, w_max = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = images[0].new_zeros((n, 3, h_max, w_max))
    for i, im in enumerate(images):
        x[i, :, :sizes[i][0], :sizes[i][1]] = im
    host = _host_tables(params)
    hw = upload(torch.tensor(sizes, dtype=torch.int64), device)
    t = {k: upload(v, device) for k, v in host.items()}
    ys, xs = torch.arange(h_max, device=device).view(1, -1, 1), torch.arange(w_max, device=device).view(1, 1, -1)
    valid = ((ys < hw[:, :1, None]) & (xs < hw[:, 1:, None])).unsqueeze(1)  # [N, 1, H, W]
    area = hw.prod(dim=1).to(x.dtype)
    for slot in range(4):
        for op in range(4):
            idx = [i for i, p in enumerate(params) if len(p.jitter_order) > slot and p.jitter_order[slot] == op
                   and (p.brightness, p.contrast, p.saturation, p.hue)[op] != _IDENTITY[op]]
            if idx:
                sel, sub = _subset(x, idx, device)
                out = _jitter(op, sub, t["factor"][sel, op], t["rest"][sel, op], area[sel], valid[sel])
                x.index_copy_(0, sel, out)
    gray = [i for i, p in enumerate(params) if p.grayscale]
    if gray:
        sel, sub = _subset(x, gray, device)
        x.index_copy_(0, sel, _gray(sub).expand(-1, 3, -1, -1))
    for k in sorted({blur_kernel_size(p.blur_sigma) for p in params if p.blur_sigma > 0}):
        idx = [i for i, p in enumerate(params) if p.blur_sigma > 0 and blur_kernel_size(p.blur_sigma) == k]
        bad = [i for i in idx if k // 2 >= min(sizes[i])]
        if bad:
            raise ValueError(f"blur kernel {k} needs images larger than {k // 2} px; image {bad[0]} is "
                             f"{sizes[bad[0]][0]}x{sizes[bad[0]][1]}")
        kernels = torch.stack([_get_gaussian_kernel2d([k, k], [params[i].blur_sigma] * 2, torch.float32,
                                                      torch.device("cpu")) for i in idx])
        sel, sub = _subset(x, idx, device)
        x.index_copy_(0, sel, _blur(sub, upload(kernels, device), hw[sel], k))
    rects = t["rects"]
    for j in range(max((len(p.erase) for p in params), default=0)):
        y0, x0, eh, ew = (rects[:, j, c].view(-1, 1, 1) for c in range(4))
        inside = ((ys >= y0) & (ys < y0 + eh) & (xs >= x0) & (xs < x0 + ew)).unsqueeze(1)
        x = torch.where(inside, rects[:, j, 4:7].view(-1, 3, 1, 1), x)
    x = x.clamp_(0.0, 1.0).mul_(valid)
    return [x[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
