"""What the trainer consumes from a data stage: `Batch` (typed lists of views and targets), the `DataStage`
protocol (three iterators of batches: `loader.TorchDataStage`, `dali_stage.DaliDataStage`), and
`apply_pending` (the strong views' photometric ops after the crop-paste)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from acrst_fast.data.photometric_batch import apply_strong_batch
from acrst_fast.data.transforms import Geometry, StrongParams, apply_geometry_to_image, apply_strong
from acrst_fast.host import upload


@dataclass
class Batch:
    """A batch of images as the detector consumes them (lists: sizes differ per image).

    weak / strong: list of Tensor[3, H, W] float in [0, 1] (a view is [] when not produced);
    boxes: list of Tensor[N_i, 4] (x1, y1, x2, y2), view pixels; labels: list of Tensor[N_i] int64 1..K.
    In unlabeled batches boxes/labels are the hidden ground truth (empty where the data has none):
    for pseudo-label quality metrics only, never training targets.
    geometry: how each view was made from its original image (to map boxes back for evaluation).
    """

    image_ids: list[int]
    weak: list[torch.Tensor]
    strong: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    geometry: list[Geometry]
    orig_hw: list[tuple[int, int]] = field(default_factory=list)
    # device views (TorchDataStage(view_device=...)): each image decoded, uint8 Tensor[3, H, W], and its
    # strong-view draws; `finish_views` makes weak/strong from them on the device
    raw: list[torch.Tensor] = field(default_factory=list)
    strong_params: list[StrongParams | None] = field(default_factory=list)
    views: tuple[str, ...] = ()
    # augment.photometric_after_paste: `strong` holds geometry-only views (copies of the weak pixels) and
    # these are their photometric draws, applied by the trainer after the crop-paste (`apply_pending`)
    pending: list[StrongParams] = field(default_factory=list)
    defer_photometric: bool = False  # with `raw`: finish_views leaves the photometric ops pending

    def __len__(self) -> int:
        return len(self.image_ids)

    def targets(self, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
        return [{"boxes": upload(b, device), "labels": upload(lab, device)} for b, lab in zip(self.boxes, self.labels)]

    def pin_memory(self) -> "Batch":
        """The views in page-locked memory (DataLoader(pin_memory=True)), so copies to the GPU are async."""
        return dataclasses.replace(self, weak=[t.pin_memory() for t in self.weak],
                                   strong=[t.pin_memory() for t in self.strong], raw=[t.pin_memory() for t in self.raw])

    def finish_views(self, device: torch.device) -> "Batch":
        """Weak and strong views made on `device` from the uint8 images (the same ops and draws as the
        workers' path: `apply_geometry_to_image`, then `apply_strong`); views already made are moved."""
        if not self.raw:
            return dataclasses.replace(self, weak=[t.to(device, non_blocking=True) for t in self.weak],
                                       strong=[t.to(device, non_blocking=True) for t in self.strong])
        weak, strong, pending = [], [], []
        for image, geom, params in zip(self.raw, self.geometry, self.strong_params):
            w = apply_geometry_to_image(image.to(device, non_blocking=True).float().div_(255.0), geom)
            if "strong" in self.views and self.defer_photometric:
                strong.append(w.clone())
                pending.append(params)
            elif "strong" in self.views:
                strong.append(apply_strong(w, params))
            if "weak" in self.views:
                weak.append(w)
        return dataclasses.replace(self, weak=weak, strong=strong, raw=[], strong_params=[], pending=pending)


def apply_pending(images: list[torch.Tensor], pending: list[StrongParams], batched: bool = False) -> list[torch.Tensor]:
    """The strong views' photometric ops (`apply_strong`: colour jitter, grayscale, blur, CutOut), on the
    images' device, after the crop-paste: `images` (list of Tensor[3, H, W] in [0, 1]) are the pasted
    geometry-only strong views of a batch whose `pending` draws they are. New tensors; `images` as they
    are when nothing is pending (augment.photometric_after_paste false: applied in the data stage).
    batched: over one padded batch (`photometric_batch`; augment.batched_photometric), else image by image
    (the reference)."""
    if not pending:
        return images
    if len(pending) != len(images):
        raise ValueError(f"{len(images)} images but {len(pending)} pending photometric draws")
    if batched:
        return apply_strong_batch(images, pending)
    return [apply_strong(im, p) for im, p in zip(images, pending)]


class DataStage(Protocol):
    def labeled(self, start_step: int) -> Iterator[Batch]: ...  # strong (+ weak if asked) view + ground truth
    def unlabeled(self, start_step: int) -> Iterator[Batch]: ...  # weak + strong views; boxes: hidden GT only
    def val(self) -> Iterator[Batch]: ...  # weak view at test scale; this rank's shard only
