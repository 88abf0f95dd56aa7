"""Crop-paste: the op table's columns, the PyTorch reference, the Triton kernel and its wrapper, in one
file (the layout of the Triton tutorials' fused attention).

    paste_pixels_ref(images, ops, bank_pixels, image_hw) -> images   (any device; the definition)
    paste_pixels_triton(images, ops, bank_pixels, image_hw) -> images (modified in place, one launch)

- images: Tensor[N, C, H, W] uint8 (0..255) or float32/float16/bfloat16 (0..1), any dense
  layout (NCHW-contiguous or channels-last); image n's valid region is its top-left
  image_hw[n] = (h, w), Tensor[N, 2] int; pastes are clipped to it, padding is never written.
- ops: Tensor[P, 7] int64 (image, slot, x0, y0, h, w, flip), grouped by image in paste order
  (the table `plan_paste` emits); bank_pixels: Tensor[S, C, s, s] uint8, contiguous; bank_hw: the
  stored (h, w) of each slot's crop, in the top-left corner of its s x s cell at the box's own aspect
  ratio (the CropBank's; default: the whole cell).
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

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch build without Triton: the reference still works, the kernel is never launched
    triton = tl = None


def _jit(**kwargs):
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


# the op table's columns: one row per paste, Tensor[P, 7] int64. (image, slot, x0, y0, h, w, flip): the
# image index in the batch, the CropBank slot, the top-left corner of the resized crop in the image (may
# be negative: clipped), its size, and 1 to mirror it. The planner (`acrst_fast.augment`) writes the
# table; the reference and the kernel below read it.
OP_IMAGE, OP_SLOT, OP_X0, OP_Y0, OP_H, OP_W, OP_FLIP = range(7)

BLOCK_H, BLOCK_W = 16, 32  # the tile of one program
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference (PyTorch): the definition the kernel is held bit-equal to
# ---------------------------------------------------------------------------------------------
def _taps(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and weight of i1 for each output index, float32 as PyTorch computes them."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale.to(device) - 0.5).clamp(min=0)
    i0 = src.to(torch.int64)
    return i0, (i0 + 1).clamp(max=in_size - 1), src - i0.to(torch.float32)


def resize_bilinear(crop: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tensor[C, s, s] (any dtype) -> Tensor[C, h, w] float32 in the crop's units: bilinear,
    align_corners=False, no antialiasing (what F.interpolate does), written out so the Triton
    kernel can follow it operation for operation: wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (...)."""
    y0, y1, wy1 = _taps(h, crop.shape[1], crop.device)
    x0, x1, wx1 = _taps(w, crop.shape[2], crop.device)
    wy0, wx0 = 1.0 - wy1, 1.0 - wx1
    c = crop.to(torch.float32)
    top, bottom = c[:, y0], c[:, y1]
    row0 = wx0 * top[:, :, x0] + wx1 * top[:, :, x1]
    row1 = wx0 * bottom[:, :, x0] + wx1 * bottom[:, :, x1]
    return wy0[:, None] * row0 + wy1[:, None] * row1


def paste_pixels_ref(images: list[torch.Tensor] | torch.Tensor, ops: torch.Tensor, bank_pixels: torch.Tensor,
                     image_hw: list[tuple[int, int]] | torch.Tensor | None = None,
                     bank_hw: torch.Tensor | np.ndarray | None = None) -> list[torch.Tensor] | torch.Tensor:
    """Apply the op table to images in place and return them.

    images: list of Tensor[C, H, W], or a batch Tensor[N, C, H, W]; uint8 (0..255) or float
    (0..1). image_hw: the valid (h, w) of each image (default: its full size); pastes are clipped
    to it. bank_pixels: Tensor[S_total, C, s, s] uint8, the CropBank pixel store. bank_hw: the
    stored (h, w) of each slot's crop, int [S_total, 2] in 1..s, kept in the top-left corner of its
    s x s cell at its own aspect ratio (default: the whole cell). The crop is resized in 0..255 units;
    uint8 images get it rounded half up, float images divided by 255.
    """
    bank_hw = None if bank_hw is None else np.asarray(bank_hw.cpu() if torch.is_tensor(bank_hw) else bank_hw)
    for img_i, slot, x0, y0, h, w, flip in ops.tolist():
        image = images[img_i]
        H, W = (int(v) for v in image_hw[img_i]) if image_hw is not None else image.shape[1:]
        sh, sw = (int(v) for v in bank_hw[slot]) if bank_hw is not None else bank_pixels.shape[2:]
        crop = resize_bilinear(bank_pixels[slot, :, :sh, :sw].to(image.device), h, w)
        if flip:
            crop = crop.flip(-1)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if xb <= xa or yb <= ya:
            continue
        crop = crop[:, ya - y0:yb - y0, xa - x0:xb - x0]
        if image.dtype == torch.uint8:
            crop = torch.floor(crop + 0.5).clamp(0, 255)
        else:
            crop = crop / 255.0
        image[:, ya:yb, xa:xb] = crop.to(image.dtype)
    return images


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
@_jit()
def _source_taps(l, size, stored):
    """Bilinear taps of resized-crop coordinates `l` (a block) along one axis of length `size`, from a
    stored crop `stored` pixels long on that axis, as PyTorch's upsample_bilinear2d
    (align_corners=False) computes them: (i0, i1, weight of i1)."""
    src = tl.maximum((l.to(tl.float32) + 0.5) * (stored.to(tl.float32) / size.to(tl.float32)) - 0.5, 0.0)
    i0 = src.to(tl.int32)
    return i0, tl.minimum(i0 + 1, stored - 1), src - i0.to(tl.float32)


@_jit()
def _to_image(v, img_ptr, OUT_UINT8: tl.constexpr, OUT_BF16: tl.constexpr):
    """A resampled value in 0..255 units -> the dtype of `img_ptr`: uint8 rounded half up, float / 255."""
    if OUT_UINT8:
        out = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 255.0).to(tl.uint8)
    elif OUT_BF16:  # round to nearest even by hand: the interpreter truncates fp32 -> bf16
        bits = (v / 255.0).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        out = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        out = (v / 255.0).to(img_ptr.dtype.element_ty)
    return out


@_jit(do_not_specialize=["s_n", "s_c", "s_h", "s_w", "crop"])
def _paste_kernel(img_ptr,    # *images: the batch written in place, Tensor[N, C, H, W] (any dense layout)
                  bank_ptr,   # *uint8: the CropBank pixel store, Tensor[S, C, crop, crop], contiguous
                  ops_ptr,    # *int64: the op table, Tensor[P, 7] (image, slot, x0, y0, h, w, flip)
                  end_ptr,    # *int64: per op, the index past the last op of its image, Tensor[P]
                  hw_ptr,     # *int64: each image's valid (h, w), Tensor[N, 2]
                  prog_ptr,   # *int64: per program, (op, tile of that op), Tensor[T, 2]
                  src_ptr,    # *int64: per op, the stored (h, w) of its crop (top-left of its cell), Tensor[P, 2]
                  s_n, s_c, s_h, s_w,  # strides of images, in elements
                  crop,       # side of a bank cell, in pixels (the row pitch of a stored crop)
                  C: tl.constexpr,          # channels
                  OUT_UINT8: tl.constexpr,  # images are uint8 (round half up), else float (divide by 255)
                  OUT_BF16: tl.constexpr,   # images are bfloat16 (round to nearest even by hand)
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):  # the tile a program pastes
    prog = tl.program_id(0)
    p = tl.load(prog_ptr + prog * 2)  # this program's op ...
    tile = tl.load(prog_ptr + prog * 2 + 1)  # ... and tile of it
    row = ops_ptr + p * 7
    n, slot, x0, y0 = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    h, w, flip = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    h_img, w_img = tl.load(hw_ptr + n * 2), tl.load(hw_ptr + n * 2 + 1)

    tiles_w = (w + BLOCK_W - 1) // BLOCK_W
    ly = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # row in the resized crop
    lx = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]   # column in the resized crop
    oy = y0 + ly
    ox = x0 + lx
    mask = (ly < h) & (lx < w) & (oy >= 0) & (oy < h_img) & (ox >= 0) & (ox < w_img)
    for q in range(p + 1, tl.load(end_ptr + p)):  # later ops of the same image cover this one
        qrow = ops_ptr + q * 7
        qx0, qy0, qh, qw = tl.load(qrow + 2), tl.load(qrow + 3), tl.load(qrow + 4), tl.load(qrow + 5)
        mask = mask & ~((oy >= qy0) & (oy < qy0 + qh) & (ox >= qx0) & (ox < qx0 + qw))

    sh, sw = tl.load(src_ptr + p * 2), tl.load(src_ptr + p * 2 + 1)
    iy0, iy1, wy1 = _source_taps(ly, h, sh)
    ix0, ix1, wx1 = _source_taps(tl.where(flip != 0, w - 1 - lx, lx), w, sw)  # flip: mirror the resized crop
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
        out = _to_image(v, img_ptr, OUT_UINT8, OUT_BF16)
        tl.store(img_ptr + out_off + c * s_c, out, mask=mask)


# ---------------------------------------------------------------------------------------------
# Wrapper: checks, the program table, one launch
# ---------------------------------------------------------------------------------------------
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


def _stored_sizes(ops: np.ndarray, bank_pixels: torch.Tensor, bank_hw, check: bool) -> np.ndarray:
    """int64[P, 2]: the stored (h, w) of each op's crop (the whole cell when `bank_hw` is None)."""
    s = bank_pixels.shape[2]
    if bank_hw is None:
        return np.full((len(ops), 2), s, dtype=np.int64)
    src = np.asarray(_host(torch.as_tensor(bank_hw)), dtype=np.int64).reshape(-1, 2)[ops[:, OP_SLOT]]
    if check and ((src < 1) | (src > s)).any():
        raise ValueError(f"paste_pixels_triton: bank_hw must lie in 1..{s} (the cell side)")
    return src


def paste_pixels_triton(images: torch.Tensor, ops: torch.Tensor, bank_pixels: torch.Tensor, image_hw: torch.Tensor,
                        bank_hw=None, check: bool = True) -> torch.Tensor:
    """Apply the op table to `images` in place (one kernel launch) and return them; see the module doc.
    bank_hw: the stored (h, w) of each slot's crop, int [S, 2] on the host (default: the whole cell).

    `check=False` (ACRST's hot path) skips validating the table: the planner built it."""
    if check:
        _check(images, image_hw, ops, bank_pixels)
    if len(ops) == 0:
        return images
    ops_np = _host(ops).astype(np.int64).reshape(-1, 7)
    hw_np = _host(image_hw).astype(np.int64).reshape(-1, 2)
    ends = _group_ends(ops_np, images.shape[0], bank_pixels.shape[0], hw_np, check)
    src = _stored_sizes(ops_np, bank_pixels, bank_hw, check)
    tiles = -(-ops_np[:, OP_H] // BLOCK_H) * -(-ops_np[:, OP_W] // BLOCK_W)  # ceil division
    prog = np.stack([np.repeat(np.arange(len(ops_np)), tiles),
                     np.arange(int(tiles.sum())) - np.repeat(np.cumsum(tiles) - tiles, tiles)], axis=1)
    # one upload: the op table, the image ends, the sizes, the program table and the stored crop sizes
    table = torch.from_numpy(np.concatenate([ops_np.ravel(), ends, hw_np.ravel(), prog.ravel(), src.ravel()]))
    if images.device.type == "cuda":  # page-locked and non-blocking: a pageable copy waits for the stream
        table = table.pin_memory().to(images.device, non_blocking=True)
    n_ops, n_img = len(ops_np), len(hw_np)
    at = np.cumsum([0, 7 * n_ops, n_ops, 2 * n_img, prog.size])
    s_n, s_c, s_h, s_w = images.stride()
    _paste_kernel[(len(prog),)](
        images, bank_pixels, table[at[0]:at[1]], table[at[1]:at[2]], table[at[2]:at[3]], table[at[3]:at[4]],
        table[at[4]:], s_n, s_c, s_h, s_w, bank_pixels.shape[2],
        C=images.shape[1], OUT_UINT8=images.dtype == torch.uint8,
        OUT_BF16=images.dtype == torch.bfloat16, BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W)
    return images
