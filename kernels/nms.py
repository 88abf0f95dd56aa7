"""Greedy NMS over fixed-size segments with no host read: the PyTorch reference and the Triton kernels.

    keep = nms_segments_ref(boxes, scores, valid, iou_threshold)      (any device; the definition)
    keep = nms_segments_triton(boxes, scores, valid, iou_threshold)   (CUDA, or CPU under TRITON_INTERPRET=1)

- boxes: Tensor[S, K, 4] float32 (x1, y1, x2, y2), scores: Tensor[S, K] float, valid: Tensor[S, K] bool. A
  segment is one image's candidates of one level (the RPN) or one class (detections); padded entries are
  invalid. Returns keep: Tensor[S, K] bool, the entries torchvision's `nms` keeps when given the valid
  entries of the segment (greedy in decreasing score; an entry is dropped when its IoU with a kept entry of
  higher score is > iou_threshold). IoU as torchvision's kernels compute it, in float32:
  inter / (area_a + area_b - inter), rounded to nearest.
- Ties in score are broken by position (a stable sort), where torchvision's sort leaves them unspecified.

The kernel path, as torchvision's CUDA NMS but with its host-side scan moved to the device:
1. sort each segment by score (invalid entries last), on the device;
2. `_mask_kernel`: for every pair i < j of a segment, bit j of row i set when j is suppressed by i
   (Tensor[S, K, ceil(K / 32)] int32), fully parallel: one program per (segment, block of rows);
3. `_scan_kernel`: one program per segment walks its sorted entries in order with the removed bits in
   registers: entry i is kept if valid and not removed, and then ORs its row in. K steps of ceil(K / 32)
   words each, with no read by the host; the keep flags go back to the original order by a scatter.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch build without Triton: the reference still works
    triton = tl = None


def _jit(**kwargs):
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


def nms_segments_ref(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                     iou_threshold: float) -> torch.Tensor:
    """torchvision's `nms` on the valid entries of each segment (the definition; reads the device)."""
    from torchvision.ops import nms

    keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
    for s in range(boxes.shape[0]):
        idx = valid[s].nonzero().flatten()
        if idx.numel():
            keep[s, idx[nms(boxes[s, idx].float(), scores[s, idx].float(), iou_threshold)]] = True
    return keep


ROWS = 32  # rows of the suppression mask per program of _mask_kernel
WORD = 32  # bits per mask word


@_jit()
def _mask_kernel(box_ptr, valid_ptr, mask_ptr, K, W, thr, ROWS_: tl.constexpr, WORD_: tl.constexpr):
    """Program (segment s, rows block r): words mask[s, i, w] for i in the block, every w < W."""
    s = tl.program_id(0)
    rows = tl.program_id(1) * ROWS_ + tl.arange(0, ROWS_)
    rmask = rows < K
    base = box_ptr + s * K * 4
    ax1 = tl.load(base + rows * 4 + 0, mask=rmask, other=0.0)[:, None]
    ay1 = tl.load(base + rows * 4 + 1, mask=rmask, other=0.0)[:, None]
    ax2 = tl.load(base + rows * 4 + 2, mask=rmask, other=0.0)[:, None]
    ay2 = tl.load(base + rows * 4 + 3, mask=rmask, other=0.0)[:, None]
    area_a = (ax2 - ax1) * (ay2 - ay1)
    bit = tl.arange(0, WORD_)
    for w in range(0, W):
        cols = w * WORD_ + bit
        cmask = cols < K
        bx1 = tl.load(base + cols * 4 + 0, mask=cmask, other=0.0)[None, :]
        by1 = tl.load(base + cols * 4 + 1, mask=cmask, other=0.0)[None, :]
        bx2 = tl.load(base + cols * 4 + 2, mask=cmask, other=0.0)[None, :]
        by2 = tl.load(base + cols * 4 + 3, mask=cmask, other=0.0)[None, :]
        cvalid = tl.load(valid_ptr + s * K + cols, mask=cmask, other=0)[None, :] != 0
        width = tl.maximum(tl.minimum(ax2, bx2) - tl.maximum(ax1, bx1), 0.0)
        height = tl.maximum(tl.minimum(ay2, by2) - tl.maximum(ay1, by1), 0.0)
        inter = width * height
        area_b = (bx2 - bx1) * (by2 - by1)
        union = area_a + area_b - inter
        iou = tl.math.div_rn(inter, tl.where(union == 0.0, 1.0, union))  # 0 / 0 (never > thr) as 0 / 1
        hit = (iou > thr) & cvalid & (cols[None, :] > rows[:, None]) & cmask[None, :]
        word = tl.sum(hit.to(tl.int32) << bit[None, :], axis=1)  # distinct bits: the sum is the OR
        tl.store(mask_ptr + (s * K + rows) * W + w, word, mask=rmask)


@_jit()
def _scan_kernel(mask_ptr, valid_ptr, keep_ptr, K, W, WB: tl.constexpr, WORD_: tl.constexpr):
    """Program s: the greedy walk over segment s's sorted entries (module doc, step 3)."""
    s = tl.program_id(0)
    words = tl.arange(0, WB)
    wmask = words < W
    removed = tl.zeros([WB], dtype=tl.int32)
    for i in range(0, K):
        word = tl.sum(tl.where(words == i // WORD_, removed, 0), axis=0)
        ok = tl.load(valid_ptr + s * K + i) != 0
        kept = (((word >> (i % WORD_)) & 1) == 0) & ok
        tl.store(keep_ptr + s * K + i, kept.to(tl.int8))
        row = tl.load(mask_ptr + (s * K + i) * W + words, mask=wmask & kept, other=0)
        removed = removed | row


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def nms_segments_triton(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor,
                        iou_threshold: float) -> torch.Tensor:
    """`nms_segments_ref` with no host read: sort, the mask kernel, the scan kernel (module doc)."""
    if triton is None:
        raise RuntimeError("nms_segments_triton needs Triton")
    if boxes.device.type == "cpu" and not _interpreted():
        raise ValueError("nms_segments_triton: CPU tensors need TRITON_INTERPRET=1 (use nms_segments, which runs "
                         "the reference on CPU)")
    n_seg, k = valid.shape
    if n_seg == 0 or k == 0:
        return torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
    masked = torch.where(valid, scores.float(), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    sorted_boxes = boxes.float().gather(1, order[..., None].expand(n_seg, k, 4)).contiguous()
    sorted_valid = valid.gather(1, order).to(torch.int8).contiguous()
    w = triton.cdiv(k, WORD)
    mask = torch.empty((n_seg, k, w), dtype=torch.int32, device=boxes.device)
    _mask_kernel[(n_seg, triton.cdiv(k, ROWS))](sorted_boxes, sorted_valid, mask, k, w, float(iou_threshold),
                                                ROWS_=ROWS, WORD_=WORD)
    keep_sorted = torch.empty((n_seg, k), dtype=torch.int8, device=boxes.device)
    _scan_kernel[(n_seg,)](mask, sorted_valid, keep_sorted, k, w, WB=triton.next_power_of_2(w), WORD_=WORD)
    return torch.zeros_like(valid).scatter_(1, order, keep_sorted.bool())


def nms_segments(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """The kernel on CUDA, the reference elsewhere (where a host read costs nothing)."""
    if boxes.is_cuda and triton is not None:
        return nms_segments_triton(boxes, scores, valid, iou_threshold)
    from acrst_fast.syncs import off_cuda_path

    with off_cuda_path():  # a CUDA run takes the kernel, which reads nothing
        return nms_segments_ref(boxes, scores, valid, iou_threshold)
