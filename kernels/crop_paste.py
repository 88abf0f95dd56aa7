"""Triton kernel: paste every op of a batch from the CropBank pixel store in one launch.

    paste_pixels_triton(images, image_hw, ops, bank_pixels) -> images (modified in place)

- images: Tensor[N, C, H, W] uint8 (0..255) or float32/float16/bfloat16 (0..1), any dense
  layout (NCHW-contiguous or channels-last); image n's valid region is its top-left
  image_hw[n] = (h, w), Tensor[N, 2] int; pastes are clipped to it, padding is never written.
- ops: Tensor[P, 7] int64 (image, slot, x0, y0, h, w, flip), grouped by image in paste order
  (the table `plan_paste` emits); bank_pixels: Tensor[S, C, s, s] uint8, contiguous.
- Resampling is bilinear with align_corners=False and no antialiasing, the same as
  `F.interpolate(..., mode="bilinear")` in the reference `paste_pixels_ref`; flip mirrors the
  resized crop left-right. Uint8 images get the interpolated value rounded half up; float
  images get it divided by 255.
- Later pastes win where they overlap, without ordering between programs: each pixel of op p
  is written only if no later op of the same image covers it. Every pixel is written at most
  once, so the kernel moves exactly the bytes of the visible pasted pixels (plus crop reads).

Grid: one program per BLOCK_H x BLOCK_W tile that has work: the host lists, for every op, its
tiles (a table of (op, tile) pairs uploaded with the op table in one copy), so a large paste
beside small ones launches no empty programs. Strides and sizes are not specialised on, so padded
batches of new sizes do not recompile the kernel. On CPU tensors it runs under TRITON_INTERPRET=1
(tests).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from acrst_fast.kernels.op_table import OP_H, OP_IMAGE, OP_SLOT, OP_W

BLOCK_H, BLOCK_W = 16, 32
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["s_n", "s_c", "s_h", "s_w", "crop"])
def _paste_kernel(img_ptr,    # *images: the batch written in place, Tensor[N, C, H, W] (any dense layout)
                  bank_ptr,   # *uint8: the CropBank pixel store, Tensor[S, C, crop, crop], contiguous
                  ops_ptr,    # *int64: the op table, Tensor[P, 7] (image, slot, x0, y0, h, w, flip)
                  end_ptr,    # *int64: per op, the index past the last op of its image, Tensor[P]
                  hw_ptr,     # *int64: each image's valid (h, w), Tensor[N, 2]
                  prog_ptr,   # *int64: per program, (op, tile of that op), Tensor[T, 2]
                  s_n, s_c, s_h, s_w,  # strides of images, in elements
                  crop,       # side of a stored crop, in pixels
                  C: tl.constexpr,          # channels
                  OUT_UINT8: tl.constexpr,  # images are uint8 (round half up), else float (divide by 255)
                  OUT_BF16: tl.constexpr,   # images are bfloat16 (round to nearest even by hand)
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):  # the tile a program pastes
    prog = tl.program_id(0)
    p = tl.load(prog_ptr + prog * 2)
    tile = tl.load(prog_ptr + prog * 2 + 1)
    row = ops_ptr + p * 7
    n = tl.load(row + 0)
    slot = tl.load(row + 1)
    x0 = tl.load(row + 2)
    y0 = tl.load(row + 3)
    h = tl.load(row + 4)
    w = tl.load(row + 5)
    flip = tl.load(row + 6)
    h_img = tl.load(hw_ptr + n * 2)
    w_img = tl.load(hw_ptr + n * 2 + 1)

    tiles_w = (w + BLOCK_W - 1) // BLOCK_W
    ly = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # row in the resized crop
    lx = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]   # column in the resized crop
    oy = y0 + ly
    ox = x0 + lx
    mask = (ly < h) & (lx < w) & (oy >= 0) & (oy < h_img) & (ox >= 0) & (ox < w_img)
    for q in range(p + 1, tl.load(end_ptr + p)):  # later ops of the same image cover this one
        qrow = ops_ptr + q * 7
        qx0 = tl.load(qrow + 2)
        qy0 = tl.load(qrow + 3)
        qh = tl.load(qrow + 4)
        qw = tl.load(qrow + 5)
        mask = mask & ~((oy >= qy0) & (oy < qy0 + qh) & (ox >= qx0) & (ox < qx0 + qw))

    # source coordinates, as PyTorch's upsample_bilinear2d (align_corners=False) computes them
    sx_col = tl.where(flip != 0, w - 1 - lx, lx)
    src_y = tl.maximum((ly.to(tl.float32) + 0.5) * (crop.to(tl.float32) / h.to(tl.float32)) - 0.5, 0.0)
    src_x = tl.maximum((sx_col.to(tl.float32) + 0.5) * (crop.to(tl.float32) / w.to(tl.float32)) - 0.5, 0.0)
    iy0 = src_y.to(tl.int32)
    ix0 = src_x.to(tl.int32)
    iy1 = tl.minimum(iy0 + 1, crop - 1)
    ix1 = tl.minimum(ix0 + 1, crop - 1)
    wy1 = src_y - iy0.to(tl.float32)
    wx1 = src_x - ix0.to(tl.float32)
    wy0 = 1.0 - wy1
    wx0 = 1.0 - wx1

    out_off = n.to(tl.int64) * s_n + oy.to(tl.int64) * s_h + ox.to(tl.int64) * s_w
    for c in tl.static_range(C):
        base = bank_ptr + (slot.to(tl.int64) * C + c) * crop * crop
        v00 = tl.load(base + iy0 * crop + ix0, mask=mask, other=0).to(tl.float32)
        v01 = tl.load(base + iy0 * crop + ix1, mask=mask, other=0).to(tl.float32)
        v10 = tl.load(base + iy1 * crop + ix0, mask=mask, other=0).to(tl.float32)
        v11 = tl.load(base + iy1 * crop + ix1, mask=mask, other=0).to(tl.float32)
        v = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11)
        if OUT_UINT8:
            out = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0).to(tl.uint8)
        elif OUT_BF16:  # round to nearest even by hand: the interpreter truncates fp32 -> bf16
            bits = (v / 255.0).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            out = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            out = (v / 255.0).to(img_ptr.dtype.element_ty)
        tl.store(img_ptr + out_off + c * s_c, out, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(images: torch.Tensor, image_hw: torch.Tensor, ops: torch.Tensor, bank_pixels: torch.Tensor) -> None:
    if images.dim() != 4 or images.dtype not in (torch.uint8, *FLOAT_DTYPES):
        raise ValueError(f"paste_pixels_triton: images must be Tensor[N, C, H, W] uint8/float32/float16/bfloat16, "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    if not (images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"paste_pixels_triton: images must be dense (NCHW or channels-last), strides {images.stride()}")
    if bank_pixels.dim() != 4 or bank_pixels.dtype != torch.uint8 or bank_pixels.shape[2] != bank_pixels.shape[3] \
            or not bank_pixels.is_contiguous():
        raise ValueError(f"paste_pixels_triton: bank_pixels must be contiguous uint8 Tensor[S, C, s, s], got "
                         f"{bank_pixels.dtype} {tuple(bank_pixels.shape)}")
    if bank_pixels.shape[1] != images.shape[1]:
        raise ValueError(f"paste_pixels_triton: bank has {bank_pixels.shape[1]} channels, images {images.shape[1]}")
    if tuple(image_hw.shape) != (images.shape[0], 2):
        raise ValueError(f"paste_pixels_triton: image_hw must be Tensor[{images.shape[0]}, 2], got {tuple(image_hw.shape)}")
    if ops.dim() != 2 or ops.shape[1] != 7 or ops.dtype != torch.int64:
        raise ValueError(f"paste_pixels_triton: ops must be int64 Tensor[P, 7], got {ops.dtype} {tuple(ops.shape)}")
    if images.device != bank_pixels.device:
        raise ValueError(f"paste_pixels_triton: images on {images.device}, bank on {bank_pixels.device}")
    if images.device.type == "cpu" and not _interpreting():
        raise ValueError("paste_pixels_triton: CPU tensors need TRITON_INTERPRET=1 (use augment.paste_pixels, "
                         "which runs the reference on CPU)")


def _group_ends(ops: np.ndarray, n_images: int, n_slots: int, image_hw: np.ndarray, check: bool) -> np.ndarray:
    """int64[P]: for each op, the index past the last op of its image. Validates the table when `check`."""
    img = ops[:, OP_IMAGE]
    if check:
        outside = (img < 0) | (img >= n_images)
        if outside.any():
            raise ValueError(f"paste_pixels_triton: op {int(np.flatnonzero(outside)[0])} names an image "
                             f"outside 0..{n_images - 1}")
        if (img[1:] < img[:-1]).any():
            raise ValueError("paste_pixels_triton: ops must be grouped by image in increasing order")
        bad = (ops[:, OP_SLOT] < 0) | (ops[:, OP_SLOT] >= n_slots) | (ops[:, OP_H] < 1) | (ops[:, OP_W] < 1)
        if bad.any():
            raise ValueError(f"paste_pixels_triton: op {int(np.flatnonzero(bad)[0])} has a slot outside "
                             f"0..{n_slots - 1} or an empty crop")
        if (image_hw < 1).any():
            raise ValueError("paste_pixels_triton: image_hw must be positive")
    return np.cumsum(np.bincount(img, minlength=n_images))[img]


def _host(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()  # training passes host tables


def paste_pixels_triton(images: torch.Tensor, image_hw: torch.Tensor, ops: torch.Tensor,
                        bank_pixels: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Apply the op table to `images` in place (one kernel launch) and return them; see the module doc.

    `check=False` (ACRST's hot path) skips validating the table: the planner built it."""
    if check:
        _check(images, image_hw, ops, bank_pixels)
    if len(ops) == 0:
        return images
    ops_np = _host(ops).astype(np.int64).reshape(-1, 7)
    hw_np = _host(image_hw).astype(np.int64).reshape(-1, 2)
    ends = _group_ends(ops_np, images.shape[0], bank_pixels.shape[0], hw_np, check)
    tiles = -(-ops_np[:, OP_H] // BLOCK_H) * -(-ops_np[:, OP_W] // BLOCK_W)  # ceil division
    prog = np.stack([np.repeat(np.arange(len(ops_np)), tiles),
                     np.arange(int(tiles.sum())) - np.repeat(np.cumsum(tiles) - tiles, tiles)], axis=1)
    # one upload: the op table, the image ends, the sizes and the program table
    table = torch.from_numpy(np.concatenate([ops_np.ravel(), ends, hw_np.ravel(), prog.ravel()])).to(images.device)
    n_ops, n_img = len(ops_np), len(hw_np)
    at = np.cumsum([0, 7 * n_ops, n_ops, 2 * n_img])
    s_n, s_c, s_h, s_w = images.stride()
    _paste_kernel[(len(prog),)](
        images, bank_pixels, table[at[0]:at[1]], table[at[1]:at[2]], table[at[2]:at[3]], table[at[3]:],
        s_n, s_c, s_h, s_w, bank_pixels.shape[2],
        C=images.shape[1], OUT_UINT8=images.dtype == torch.uint8,
        OUT_BF16=images.dtype == torch.bfloat16, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return images
