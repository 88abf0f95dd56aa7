"""CropBank: instance crops of ground truths (Labeled) and of teacher pseudo-labels (Pseudo).

Storage is one device-resident pixel store plus index tensors, with a fixed memory budget:
every (sub-bank, class) pair owns `capacity` slots of `crop_size x crop_size` pixels. A crop keeps
its box's aspect ratio: it is stored at its own size, or scaled down so its longest side is
`crop_size` (`stored_size`), in the top-left corner of its slot; so it is never squashed, and is
upsampled only when pasted larger than it was stored. Its box's real size is kept in `size_hw`
(what the planner scales). Memory: 2 * K * capacity * (3 * crop_size**2 + 13) bytes, e.g. at
crop_size 128 and capacity 256: 2.0 GB for COCO's 80 classes, 0.50 GB for VOC's 20 (per process).

- Labeled sub-bank: a reservoir per class (each ground truth offered has the same chance to be
  kept), filled while the labeled data is first seen, then fixed.
- Pseudo sub-bank: a ring per class (the newest pseudo-labels replace the oldest), so it follows
  the teacher as it improves.

Boxes are (x1, y1, x2, y2) in pixels of the image they are cropped from; labels are 1..K.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import roi_align

from acrst_fast.host import to_host, upload
from acrst_fast.modes import BANK_SOURCES
from acrst_fast.augment.pixels import stack_padded

LABELED, PSEUDO = 0, 1
SOURCES = {name: i for i, name in enumerate(BANK_SOURCES)}  # {"labeled": LABELED, "pseudo": PSEUDO}


def stored_size(size_hw: np.ndarray, crop_size: int) -> np.ndarray:
    """Stored (h, w) of crops of boxes `size_hw` (float [N, 2], pixels): the box's own size, scaled down
    (never up) so the longest side fits `crop_size`; rounded half up, in 1..crop_size. int64 [N, 2]."""
    size_hw = np.asarray(size_hw, dtype=np.float64).reshape(-1, 2)
    scale = np.minimum(1.0, crop_size / np.maximum(size_hw.max(axis=1, keepdims=True), 1e-9))
    return np.clip(np.floor(size_hw * scale + 0.5), 1, crop_size).astype(np.int64)


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
        # host mirrors of what slot assignment and planning read, so neither waits for the device
        self.seen = np.zeros((2, num_classes), dtype=np.int64)  # offered so far, per (source, class)
        self._valid_host = np.zeros(n, dtype=bool)
        self._size_host = np.zeros((n, 2), dtype=np.float32)
        self._class_of_slot = np.tile(np.repeat(np.arange(1, num_classes + 1), capacity), 2)

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
        return torch.from_numpy(self._valid_host.reshape(2, self.num_classes, self.capacity).sum(-1))

    def add(self, source: int, images: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor],
            scores: list[torch.Tensor] | None = None, generator: torch.Generator | None = None,
            check_labels=None) -> int:
        """Crop `boxes` out of `images` (Tensor[3, H, W] float in [0, 1]) into the `source` sub-bank.

        Returns how many offers were taken. Boxes narrower or shorter than 2 pixels are skipped.
        check_labels(list of int64 arrays, one per image): called on the labels once they are on the host.
        One host read for the whole batch (labels and boxes, for slot assignment), one roi_align
        and one scatter: no per-box work on the device.
        """
        sizes = [len(b) for b in boxes]
        if sum(sizes) == 0:
            return 0
        dev = self.device
        all_boxes = torch.cat([b.reshape(-1, 4) for b in boxes]).to(dev, torch.float32)
        all_labels = torch.cat([lab.reshape(-1) for lab in labels])
        hb, hl = to_host(all_boxes, all_labels)  # the one read
        if check_labels is not None:
            check_labels(np.split(hl.astype(np.int64), np.cumsum(sizes)[:-1]))
        image_of = np.repeat(np.arange(len(sizes)), sizes)
        ok = ((hb[:, 2:] - hb[:, :2]) >= 2).all(axis=1)
        offers, slots = self._take_slots(source, np.flatnonzero(ok), hl.astype(np.int64), generator)
        if not slots:
            return 0
        taken = len(slots)
        # a later offer to the same slot in this call wins, as if the offers were made one by one;
        # duplicates are resolved here, because index_put_ with repeated indices is undefined on CUDA
        last = sorted({slot: j for j, slot in enumerate(slots)}.values())
        offers, slots = np.asarray([offers[j] for j in last]), np.asarray([slots[j] for j in last])
        box_hw = np.stack([hb[offers, 3] - hb[offers, 1], hb[offers, 2] - hb[offers, 0]], axis=1).astype(np.float32)
        # the region sampled onto the crop_size grid is the box stretched so that its stored size
        # (sh, sw) of grid cells covers exactly the box: the crop lands in the cell's top-left corner
        reach = box_hw[:, ::-1] * self.crop_size / stored_size(box_hw, self.crop_size)[:, ::-1]  # (w, h)
        regions = np.concatenate([hb[offers, :2], hb[offers, :2] + reach], axis=1)
        rois = torch.from_numpy(np.concatenate([image_of[offers, None], regions], axis=1).astype(np.float32))
        batch, _ = stack_padded([im.to(dev, torch.float32) for im in images])
        crops = roi_align(batch, upload(rois, dev), output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=0,
                          aligned=True)
        idx = upload(torch.from_numpy(slots), dev)
        self.pixels[idx] = (crops.clamp(0, 1) * 255).round().to(torch.uint8)
        self.size_hw[idx] = upload(torch.from_numpy(box_hw), dev)
        if scores is not None:
            self.score[idx] = torch.cat([sc.reshape(-1) for sc in scores]).to(dev, torch.float32)[
                upload(torch.from_numpy(offers), dev)]
        else:
            self.score.index_fill_(0, idx, 1.0)  # a scalar fill: no value tensor to copy to the device
        self.valid.index_fill_(0, idx, True)
        self._valid_host[slots] = True
        self._size_host[slots] = box_hw
        return taken

    def _take_slots(self, source: int, offered: np.ndarray, labels: np.ndarray,
                    generator: torch.Generator | None) -> tuple[list[int], list[int]]:
        """Slots for the offers `offered` (indices into `labels`), as if offered one by one: (offers
        kept, their slots). Vectorised unless the Labeled reservoir must draw (past capacity)."""
        lab = labels[offered]
        bad = (lab < 1) | (lab > self.num_classes)
        if bad.any():
            raise ValueError(f"CropBank.add: label {int(lab[bad][0])} is outside 1..{self.num_classes}")
        order = np.argsort(lab, kind="stable")
        sorted_lab = lab[order]
        rank = np.empty(len(lab), dtype=np.int64)
        rank[order] = np.arange(len(lab)) - np.searchsorted(sorted_lab, sorted_lab, side="left")
        seen_before = self.seen[source, lab - 1] + rank  # this offer's count of earlier offers of its class
        if source == LABELED and (seen_before >= self.capacity).any():  # reservoir draws: one by one
            kept = [(int(i), slot) for i in offered
                    if (slot := self._take_slot(source, int(labels[i]), generator)) is not None]
            return [i for i, _ in kept], [slot for _, slot in kept]
        np.add.at(self.seen[source], lab - 1, 1)
        base = (source * self.num_classes + (lab - 1)) * self.capacity
        return offered.tolist(), (base + seen_before % self.capacity).tolist()

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
        j = int(torch.randint(seen + 1, (), generator=generator))  # reservoir (Algorithm R), a host draw
        return base + j if j < self.capacity else None

    def stored_hw_host(self) -> np.ndarray:
        """int64[S, 2]: the stored (h, w) of every slot's crop (`stored_size` of its box; 1 x 1 when empty)."""
        return stored_size(self._size_host, self.crop_size)

    def entries_host(self, sources: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Valid crops of the given sub-banks, from the host mirrors: (slot indices int64[E], classes
        int64[E] 1..K, size_hw float32[E, 2]), in slot order."""
        per_source = self.num_classes * self.capacity
        mask = np.zeros_like(self._valid_host)
        for s in sources:
            mask[s * per_source:(s + 1) * per_source] = True
        idx = np.flatnonzero(self._valid_host & mask)
        return idx.astype(np.int64), self._class_of_slot[idx].astype(np.int64), self._size_host[idx]

    def entries(self, sources: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid crops of the given sub-banks: (slot indices Tensor[E], classes Tensor[E] 1..K, size_hw Tensor[E, 2])."""
        return tuple(torch.from_numpy(a) for a in self.entries_host(sources))

    def labeled_part(self) -> dict:
        """This rank's Labeled sub-bank, CPU tensors: per class (1..K) the stored crops in slot order
        (`pixels` uint8[E, 3, S, S], `size_hw` float32[E, 2], `score` float32[E], `label` int64[E])
        and `seen` int64[K], the ground truths offered."""
        per = self.num_classes * self.capacity
        idx = torch.from_numpy(np.flatnonzero(self._valid_host[:per]))
        return {"pixels": self.pixels[idx.to(self.device)].cpu(), "size_hw": self.size_hw[idx.to(self.device)].cpu(),
                "score": self.score[idx.to(self.device)].cpu(), "label": idx // self.capacity + 1,
                "seen": torch.from_numpy(self.seen[LABELED].copy())}

    def set_labeled(self, parts: list[dict], generator: torch.Generator) -> None:
        """Replace the Labeled sub-bank by the union of every rank's `labeled_part()` (rank order).

        Per class: all stored crops when they fit, else `capacity` of them drawn without
        replacement, each crop of rank r weighted by seen_r / stored_r (the ground truths it stands
        for), so the bank stays close to a uniform sample of the whole labeled set. Every rank
        passes the same parts and an identically seeded generator and so holds the same bank."""
        per = self.num_classes * self.capacity
        self.valid[:per] = False
        self._valid_host[:per] = False
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
                self._valid_host[base:base + len(chosen)] = True
                self._size_host[base:base + len(chosen)] = torch.stack([p["size_hw"][j] for p, j in chosen]).numpy()
        self.seen[LABELED] = torch.stack([p["seen"] for p in parts]).sum(0).numpy()

    def state_dict(self) -> dict:
        return {"pixels": self.pixels.cpu(), "size_hw": self.size_hw.cpu(), "score": self.score.cpu(),
                "valid": self.valid.cpu(), "seen": torch.from_numpy(self.seen.copy()),
                "shape": (self.num_classes, self.capacity, self.crop_size)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["shape"]) != (self.num_classes, self.capacity, self.crop_size):
            raise ValueError(f"CropBank state is for (classes, capacity, crop_size) {tuple(state['shape'])}, "
                             f"this bank is {(self.num_classes, self.capacity, self.crop_size)}")
        for name in ("pixels", "size_hw", "score", "valid"):
            getattr(self, name).copy_(state[name])
        self.seen[:] = np.asarray(state["seen"])
        self._valid_host[:] = np.asarray(state["valid"].cpu())
        self._size_host[:] = np.asarray(state["size_hw"].cpu())
