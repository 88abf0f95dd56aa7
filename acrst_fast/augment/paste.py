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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# columns of the op table, Tensor[P, 7] int64
OP_IMAGE, OP_SLOT, OP_X0, OP_Y0, OP_H, OP_W, OP_FLIP = range(7)


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
        b = all_boxes[i]
        area = float((b[2] - b[0]) * (b[3] - b[1]))
        if area <= 0:
            continue
        visible = 1.0 - covered_area(b, later) / area
        if visible <= visibility_threshold + 1e-9:
            keep[i] = False
    return all_boxes[keep], all_labels[keep], pasted[keep]


def _choice(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def plan_paste_ref(image_hw: list[tuple[int, int]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                   bank_slots: torch.Tensor, bank_classes: torch.Tensor, bank_size_hw: torch.Tensor,
                   class_probs: torch.Tensor, cfg: PasteConfig, generator: torch.Generator) -> PastePlan:
    """Sample N_C in [n_min, n_max] bank instances per image, place them, merge annotations.

    bank_slots/classes/size_hw: the candidate crops (from `CropBank.entries`), Tensor[E], Tensor[E]
    (1..K), Tensor[E, 2]. class_probs: Tensor[K], the class sampling distribution mu (AFFR);
    classes without a candidate crop are left out and the rest renormalised.
    All randomness comes from `generator` (CPU).
    """
    cpu = torch.device("cpu")
    bank_slots, bank_classes, bank_size_hw = bank_slots.to(cpu), bank_classes.to(cpu), bank_size_hw.to(cpu)
    k = len(class_probs)
    available = torch.zeros(k, dtype=torch.bool)
    if len(bank_classes):
        available[bank_classes - 1] = True
    probs = class_probs.to(cpu, torch.float64) * available
    can_paste = bool(probs.sum() > 0)
    ops, out_boxes, out_labels, out_pasted = [], [], [], []
    for img, (h_img, w_img) in enumerate(image_hw):
        n = int(torch.randint(cfg.n_min, cfg.n_max + 1, (), generator=generator)) if can_paste else 0
        p_boxes, p_labels = [], []
        for _ in range(n):
            cls = _choice(probs, generator) + 1
            members = torch.nonzero(bank_classes == cls).flatten()
            e = int(members[int(torch.randint(len(members), (), generator=generator))])
            bh, bw = bank_size_hw[e].tolist()
            s = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * float(torch.rand((), generator=generator))
            s = min(s, h_img / bh, w_img / bw)  # the whole crop fits in the image
            h, w = max(1, round(bh * s)), max(1, round(bw * s))
            x0 = int(torch.randint(-(w // 2), w_img - w + w // 2 + 1, (), generator=generator))
            y0 = int(torch.randint(-(h // 2), h_img - h + h // 2 + 1, (), generator=generator))
            flip = bool(torch.rand((), generator=generator) < cfg.flip_prob)
            clipped = torch.tensor([max(x0, 0), max(y0, 0), min(x0 + w, w_img), min(y0 + h, h_img)], dtype=torch.float32)
            if clipped[2] - clipped[0] < cfg.min_size or clipped[3] - clipped[1] < cfg.min_size:
                continue
            ops.append([img, int(bank_slots[e]), x0, y0, h, w, int(flip)])
            p_boxes.append(clipped)
            p_labels.append(cls)
        pb = torch.stack(p_boxes) if p_boxes else torch.zeros((0, 4))
        pl = torch.tensor(p_labels, dtype=torch.int64)
        b, lab, pasted = merge_boxes(boxes[img].to(cpu), labels[img].to(cpu), pb, pl, cfg.visibility_threshold)
        out_boxes.append(b)
        out_labels.append(lab)
        out_pasted.append(pasted)
    op_table = torch.tensor(ops, dtype=torch.int64).reshape(-1, 7)
    return PastePlan(op_table, out_boxes, out_labels, out_pasted)


def paste_pixels_ref(images: list[torch.Tensor], ops: torch.Tensor, bank_pixels: torch.Tensor) -> list[torch.Tensor]:
    """Apply the op table to images (list of Tensor[3, H, W] float in [0, 1]; modified in place and returned).

    bank_pixels: Tensor[S_total, 3, S, S] uint8, the CropBank pixel store.
    """
    for img_i, slot, x0, y0, h, w, flip in ops.tolist():
        image = images[img_i]
        _, H, W = image.shape
        crop = bank_pixels[slot].to(image.device, torch.float32)[None] / 255.0
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        if flip:
            crop = crop.flip(-1)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if xb <= xa or yb <= ya:
            continue
        image[:, ya:yb, xa:xb] = crop[:, ya - y0:yb - y0, xa - x0:xb - x0].to(image.dtype)
    return images
