"""CropBank: instance crops of ground truths (Labeled) and of teacher pseudo-labels (Pseudo).

Storage is one device-resident pixel store plus index tensors, with a fixed memory budget:
every (sub-bank, class) pair owns `capacity` slots, and each crop is stored resampled to
`crop_size x crop_size` (its box's real size is kept in `size_hw`, so it is pasted back at its
own aspect ratio). Memory: 2 * K * capacity * (3 * crop_size**2 + 13) bytes.

- Labeled sub-bank: a reservoir per class (each ground truth offered has the same chance to be
  kept), filled while the labeled data is first seen, then fixed.
- Pseudo sub-bank: a ring per class (the newest pseudo-labels replace the oldest), so it follows
  the teacher as it improves.

Boxes are (x1, y1, x2, y2) in pixels of the image they are cropped from; labels are 1..K.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from acrst_fast.augment.pixels import stack_padded

LABELED, PSEUDO = 0, 1
SOURCES = {"labeled": LABELED, "pseudo": PSEUDO}


class CropBank:
    def __init__(self, num_classes: int, capacity: int, crop_size: int, device: torch.device | str = "cpu"):
        if num_classes < 1 or capacity < 1 or crop_size < 2:
            raise ValueError(f"CropBank: need num_classes >= 1, capacity >= 1, crop_size >= 2; got "
                             f"{num_classes}, {capacity}, {crop_size}")
        self.num_classes, self.capacity, self.crop_size = num_classes, capacity, crop_size
        n = 2 * num_classes * capacity
        self.pixels = torch.zeros((n, 3, crop_size, crop_size), dtype=torch.uint8, device=device)
        self.size_hw = torch.zeros((n, 2), dtype=torch.float32, device=device)  # box height, width in pixels
        self.score = torch.zeros(n, dtype=torch.float32, device=device)
        self.valid = torch.zeros(n, dtype=torch.bool, device=device)
        self.seen = torch.zeros((2, num_classes), dtype=torch.int64)  # offered so far, per (source, class)

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixels, self.size_hw, self.score, self.valid))

    def slot_base(self, source: int, label: int) -> int:
        return (source * self.num_classes + (label - 1)) * self.capacity

    def fill(self) -> torch.Tensor:
        """Tensor[2, K] int64: stored crops per (source, class)."""
        return self.valid.view(2, self.num_classes, self.capacity).sum(-1).cpu()

    def classes(self) -> torch.Tensor:
        """Tensor[2 * K * capacity] int64: the class (1..K) each slot belongs to."""
        return torch.arange(self.num_classes, device=self.device).repeat_interleave(self.capacity).repeat(2) + 1

    def add(self, source: int, images: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor],
            scores: list[torch.Tensor] | None = None, generator: torch.Generator | None = None) -> int:
        """Crop `boxes` out of `images` (Tensor[3, H, W] float in [0, 1]) into the `source` sub-bank.

        Returns how many crops were stored. Boxes narrower or shorter than 2 pixels are skipped.
        """
        slots, crops_from, keep_boxes, sizes, kept_scores = [], [], [], [], []
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            if len(b) == 0:
                continue
            wh = b[:, 2:] - b[:, :2]
            ok = (wh >= 2).all(dim=1)
            sc = scores[i] if scores is not None else torch.ones(len(b), device=b.device)
            for box, k, s in zip(b[ok], lab[ok].tolist(), sc[ok]):
                slot = self._take_slot(source, int(k), generator)
                if slot is None:
                    continue
                slots.append(slot)
                crops_from.append(i)
                keep_boxes.append(box)
                sizes.append(torch.stack([box[3] - box[1], box[2] - box[0]]))
                kept_scores.append(s)
        if not slots:
            return 0
        offered = len(slots)
        # a later offer to the same slot in this call wins, as if the offers were made one by one;
        # duplicates are resolved here, because index_put_ with repeated indices is undefined on CUDA
        last = sorted({slot: j for j, slot in enumerate(slots)}.values())
        slots, crops_from = [slots[j] for j in last], [crops_from[j] for j in last]
        keep_boxes, sizes, kept_scores = ([xs[j] for j in last] for xs in (keep_boxes, sizes, kept_scores))
        rois = torch.cat([torch.tensor(crops_from, dtype=torch.float32, device=self.device)[:, None],
                          torch.stack(keep_boxes).float().to(self.device)], dim=1)
        batch, _ = stack_padded([im.to(self.device, torch.float32) for im in images])
        crops = roi_align(batch, rois, output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        idx = torch.tensor(slots, device=self.device)
        self.pixels[idx] = (crops.clamp(0, 1) * 255).round().to(torch.uint8)
        self.size_hw[idx] = torch.stack(sizes).float().to(self.device)
        self.score[idx] = torch.stack(kept_scores).float().to(self.device)
        self.valid[idx] = True
        return offered

    def _take_slot(self, source: int, label: int, generator: torch.Generator | None) -> int | None:
        if not 1 <= label <= self.num_classes:
            raise ValueError(f"CropBank.add: label {label} is outside 1..{self.num_classes}")
        seen = int(self.seen[source, label - 1])
        self.seen[source, label - 1] += 1
        base = self.slot_base(source, label)
        if seen < self.capacity:
            return base + seen
        if source == PSEUDO:  # ring: replace the oldest
            return base + seen % self.capacity
        j = int(torch.randint(seen + 1, (), generator=generator))  # reservoir (Algorithm R)
        return base + j if j < self.capacity else None

    def entries(self, sources: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid crops of the given sub-banks: (slot indices Tensor[E], classes Tensor[E] 1..K, size_hw Tensor[E, 2])."""
        mask = torch.zeros_like(self.valid)
        per_source = self.num_classes * self.capacity
        for s in sources:
            mask[s * per_source:(s + 1) * per_source] = True
        idx = torch.nonzero(self.valid & mask).flatten()
        return idx, self.classes()[idx], self.size_hw[idx]

    def labeled_part(self) -> dict:
        """This rank's Labeled sub-bank, CPU tensors: per class (1..K) the stored crops in slot order
        (`pixels` uint8[E, 3, S, S], `size_hw` float32[E, 2], `score` float32[E], `label` int64[E])
        and `seen` int64[K], the ground truths offered."""
        per = self.num_classes * self.capacity
        idx = torch.nonzero(self.valid[:per]).flatten()
        return {"pixels": self.pixels[idx].cpu(), "size_hw": self.size_hw[idx].cpu(), "score": self.score[idx].cpu(),
                "label": (idx // self.capacity + 1).cpu(), "seen": self.seen[LABELED].clone()}

    def set_labeled(self, parts: list[dict], generator: torch.Generator) -> None:
        """Replace the Labeled sub-bank by the union of every rank's `labeled_part()` (rank order).

        Per class: all stored crops when they fit, else `capacity` of them drawn without
        replacement, each crop of rank r weighted by seen_r / stored_r (the ground truths it stands
        for), so the bank stays close to a uniform sample of the whole labeled set. Every rank
        passes the same parts and an identically seeded generator and so holds the same bank."""
        per = self.num_classes * self.capacity
        self.valid[:per] = False
        for k in range(1, self.num_classes + 1):
            chosen, weights = [], []
            for part in parts:
                mine = torch.nonzero(part["label"] == k).flatten()
                chosen += [(part, int(j)) for j in mine]
                weights += [float(part["seen"][k - 1]) / max(1, len(mine))] * len(mine)
            if len(chosen) > self.capacity:
                pick = torch.multinomial(torch.tensor(weights, dtype=torch.float64), self.capacity,
                                         replacement=False, generator=generator)
                chosen = [chosen[i] for i in sorted(pick.tolist())]
            if chosen:
                base = self.slot_base(LABELED, k)
                idx = torch.arange(base, base + len(chosen), device=self.device)
                for name in ("pixels", "size_hw", "score"):
                    getattr(self, name)[idx] = torch.stack([p[name][j] for p, j in chosen]).to(self.device)
                self.valid[idx] = True
        self.seen[LABELED] = torch.stack([p["seen"] for p in parts]).sum(0)

    def state_dict(self) -> dict:
        return {"pixels": self.pixels.cpu(), "size_hw": self.size_hw.cpu(), "score": self.score.cpu(),
                "valid": self.valid.cpu(), "seen": self.seen.clone(),
                "shape": (self.num_classes, self.capacity, self.crop_size)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["shape"]) != (self.num_classes, self.capacity, self.crop_size):
            raise ValueError(f"CropBank state is for (classes, capacity, crop_size) {tuple(state['shape'])}, "
                             f"this bank is {(self.num_classes, self.capacity, self.crop_size)}")
        for name in ("pixels", "size_hw", "score", "valid"):
            getattr(self, name).copy_(state[name])
        self.seen.copy_(state["seen"])

