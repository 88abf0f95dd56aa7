"""Crop-paste (paper Eq. 6-7): plan where CropBank instances go, paste their pixels, merge boxes.

This is the pure-PyTorch reference, device-agnostic; the C++ planner and the Triton paster of
issue 5 are held equal to it. Conventions:

- boxes: float Tensor[N, 4] (x1, y1, x2, y2) in pixels of the image; labels: int64 Tensor[N] 1..K.
- a paste op puts crop `slot` of the bank, resampled (bilinear, align_corners=False, no
  antialiasing) to `h x w` pixels and optionally flipped left-right, with its top-left corner at
  integer (x0, y0). It may hang over the image border by up to half its size; what is outside is
  dropped, and its box is clipped the same way. alpha is the crop's whole box (boxes carry no masks).
- ops of an image are applied in order; a later paste covers an earlier one where they overlap.
- merge: the image's own boxes lie below every paste, a pasted box below the pastes after it.
  A box whose visible fraction (1 - exactly covered area / area) is <= `visibility_threshold`
  is removed; threshold 0 removes only fully occluded boxes. Partly covered boxes are kept as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from acrst_fast.host import mark_host
# columns of the op table, Tensor[P, 7] int64 (defined below the kernels, which read it too)
from acrst_fast.kernels.crop_paste import (  # noqa: F401 - the op table and the reference, re-exported
    OP_FLIP, OP_H, OP_IMAGE, OP_SLOT, OP_W, OP_X0, OP_Y0, paste_pixels_ref, resize_bilinear,
)


@dataclass
class PasteConfig:
    n_min: int = 0
    n_max: int = 10
    scale_min: float = 0.5
    scale_max: float = 1.5
    flip_prob: float = 0.5
    min_size: int = 4  # pasted boxes smaller than this (after clipping) are not pasted
    visibility_threshold: float = 0.0


@dataclass
class PastePlan:
    """ops: Tensor[P, 7] int64 (image, slot, x0, y0, h, w, flip), in paste order.
    boxes / labels / pasted: per image, the merged annotations (pasted: Tensor[M] bool, True for
    boxes that come from the bank)."""

    ops: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    pasted: list[torch.Tensor]


def covered_area(box: torch.Tensor, rects: torch.Tensor) -> float:
    """Exact area of box (Tensor[4]) covered by the union of rects (Tensor[R, 4]), all (x1, y1, x2, y2)."""
    if len(rects) == 0:
        return 0.0
    r = rects.clone().double()
    b = box.double()
    r[:, 0::2] = r[:, 0::2].clamp(b[0], b[2])
    r[:, 1::2] = r[:, 1::2].clamp(b[1], b[3])
    r = r[(r[:, 2] > r[:, 0]) & (r[:, 3] > r[:, 1])]
    if len(r) == 0:
        return 0.0
    xs = torch.unique(torch.cat([r[:, 0], r[:, 2]]))
    ys = torch.unique(torch.cat([r[:, 1], r[:, 3]]))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # cell centres
    inside_x = (r[:, None, 0] <= cx[None]) & (cx[None] < r[:, None, 2])  # [R, X]
    inside_y = (r[:, None, 1] <= cy[None]) & (cy[None] < r[:, None, 3])  # [R, Y]
    covered = (inside_y[:, :, None] & inside_x[:, None, :]).any(0)  # [Y, X]
    cell = (ys[1:] - ys[:-1])[:, None] * (xs[1:] - xs[:-1])[None, :]
    return float((cell * covered).sum())


def merge_boxes(boxes: torch.Tensor, labels: torch.Tensor, paste_boxes: torch.Tensor, paste_labels: torch.Tensor,
                visibility_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 7: own boxes + pasted boxes, minus those (nearly) fully occluded by later pastes.

    paste_boxes are the clipped boxes of the pastes in paste order. Returns (boxes, labels, pasted).
    """
    all_boxes = torch.cat([boxes.float(), paste_boxes.float()])
    all_labels = torch.cat([labels, paste_labels])
    pasted = torch.cat([torch.zeros(len(boxes), dtype=torch.bool), torch.ones(len(paste_boxes), dtype=torch.bool)])
    keep = torch.ones(len(all_boxes), dtype=torch.bool)
    n_own = len(boxes)
    for i in range(len(all_boxes)):
        later = paste_boxes[max(0, i - n_own + 1):] if i >= n_own else paste_boxes
        if len(later) == 0:
            continue
        b = all_boxes[i].double()
        area = float((b[2] - b[0]) * (b[3] - b[1]))
        if area <= 0:
            continue
        visible = 1.0 - covered_area(b, later) / area
        if visible <= visibility_threshold + 1e-9:
            keep[i] = False
    return all_boxes[keep], all_labels[keep], pasted[keep]


# columns of the per-paste uniforms, Tensor[B, n_max, 6] float64 in [0, 1)
U_CLASS, U_MEMBER, U_SCALE, U_X, U_Y, U_FLIP = range(6)


def draw_uniforms(n_images: int, cfg: PasteConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """All randomness of one batch's plan, in two calls on `generator` (CPU):
    counts Tensor[B] int64 (pastes tried per image, uniform in [n_min, n_max]) and
    uniforms Tensor[B, n_max, 6] float64 in [0, 1) (class, member, scale, x, y, flip per paste).
    The reference and the C++ planner turn the same draws into the same plan."""
    counts = torch.randint(cfg.n_min, cfg.n_max + 1, (n_images,), generator=generator)
    uniforms = torch.rand((n_images, cfg.n_max, 6), generator=generator, dtype=torch.float64)
    return mark_host(counts), mark_host(uniforms)


def _pick(u: float, n: int) -> int:
    """floor(u * n) for u in [0, 1), kept below n against rounding."""
    return min(int(math.floor(u * n)), n - 1)


def _pick_class(u: float, probs: list[float]) -> int:
    """Inverse CDF over probs (float64, some zero): the first k with u * total < cumsum_k (0-based)."""
    total = 0.0
    for p in probs:
        total += p
    target, cum, last = u * total, 0.0, -1
    for k, p in enumerate(probs):
        if p > 0:
            cum += p
            last = k
            if target < cum:
                return k
    return last


def place_ref(u: list[float], bh: float, bw: float, h_img: int, w_img: int, cfg: PasteConfig) -> tuple[int, int, int, int, int]:
    """One paste's geometry from its uniforms: (x0, y0, h, w, flip). The crop is scaled by
    s ~ U[scale_min, scale_max] (capped so it fits in the image), rounded half up, and its
    top-left corner is uniform over positions that leave at least half of it inside."""
    s = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * u[U_SCALE]
    s = min(s, h_img / bh, w_img / bw)
    h, w = max(1, int(math.floor(bh * s + 0.5))), max(1, int(math.floor(bw * s + 0.5)))
    x0 = -(w // 2) + _pick(u[U_X], w_img - w + 2 * (w // 2) + 1)
    y0 = -(h // 2) + _pick(u[U_Y], h_img - h + 2 * (h // 2) + 1)
    return x0, y0, h, w, int(u[U_FLIP] < cfg.flip_prob)


def plan_paste_ref(image_hw: list[tuple[int, int]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                   bank_slots: torch.Tensor, bank_classes: torch.Tensor, bank_size_hw: torch.Tensor,
                   class_probs: torch.Tensor, cfg: PasteConfig, generator: torch.Generator | None = None,
                   draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> PastePlan:
    """Sample N_C in [n_min, n_max] bank instances per image, place them, merge annotations.

    bank_slots/classes/size_hw: the candidate crops (from `CropBank.entries`), Tensor[E], Tensor[E]
    (1..K), Tensor[E, 2]. class_probs: Tensor[K], the class sampling distribution mu (AFFR);
    classes without a candidate crop are left out and the rest renormalised. The crop of a class
    is uniform over its candidates, in `bank_slots` order. Randomness: `draws` (from
    `draw_uniforms`) if given, else drawn from `generator`.
    """
    cpu = torch.device("cpu")
    counts, uniforms = draws if draws is not None else draw_uniforms(len(image_hw), cfg, generator)
    bank_slots, bank_classes, bank_size_hw = bank_slots.to(cpu), bank_classes.to(cpu), bank_size_hw.to(cpu)
    k = len(class_probs)
    members = [torch.nonzero(bank_classes == c + 1).flatten().tolist() for c in range(k)]
    probs = [float(p) if members[c] else 0.0 for c, p in enumerate(class_probs.to(cpu, torch.float64).tolist())]
    can_paste = sum(probs) > 0
    sizes, slots = bank_size_hw.double().tolist(), bank_slots.tolist()
    ops, op_labels = [], []
    for img, (h_img, w_img) in enumerate(image_hw):
        for j in range(int(counts[img]) if can_paste else 0):
            u = uniforms[img, j].tolist()
            cls = _pick_class(u[U_CLASS], probs)
            e = members[cls][_pick(u[U_MEMBER], len(members[cls]))]
            x0, y0, h, w, flip = place_ref(u, sizes[e][0], sizes[e][1], h_img, w_img, cfg)
            ops.append([img, slots[e], x0, y0, h, w, flip])
            op_labels.append(cls + 1)
    return merge_pastes_ref(image_hw, boxes, labels, torch.tensor(ops, dtype=torch.int64).reshape(-1, 7),
                            torch.tensor(op_labels, dtype=torch.int64), cfg.min_size, cfg.visibility_threshold)


def merge_pastes_ref(image_hw: list[tuple[int, int]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                     ops: torch.Tensor, op_labels: torch.Tensor, min_size: int,
                     visibility_threshold: float) -> PastePlan:
    """Given placements (op table Tensor[P, 7], grouped by image in paste order; op_labels Tensor[P]):
    drop pastes whose clipped box is narrower or shorter than `min_size`, merge boxes (Eq. 7)."""
    cpu = torch.device("cpu")
    kept_ops, out_boxes, out_labels, out_pasted = [], [], [], []
    rows, op_labels = ops.tolist(), op_labels.tolist()
    for img, (h_img, w_img) in enumerate(image_hw):
        p_boxes, p_labels = [], []
        for row, cls in zip(rows, op_labels):
            if row[OP_IMAGE] != img:
                continue
            x0, y0, h, w = row[OP_X0], row[OP_Y0], row[OP_H], row[OP_W]
            clipped = [max(x0, 0), max(y0, 0), min(x0 + w, w_img), min(y0 + h, h_img)]
            if clipped[2] - clipped[0] < min_size or clipped[3] - clipped[1] < min_size:
                continue
            kept_ops.append(row)
            p_boxes.append(clipped)
            p_labels.append(cls)
        pb = torch.tensor(p_boxes, dtype=torch.float32).reshape(-1, 4)
        pl = torch.tensor(p_labels, dtype=torch.int64)
        b, lab, pasted = merge_boxes(boxes[img].to(cpu), labels[img].to(cpu), pb, pl, visibility_threshold)
        out_boxes.append(b)
        out_labels.append(lab)
        out_pasted.append(pasted)
    return PastePlan(torch.tensor(kept_ops, dtype=torch.int64).reshape(-1, 7), out_boxes, out_labels, out_pasted)
