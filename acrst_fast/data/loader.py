"""The data stage: what the trainer consumes, and the plain-torch implementation of it.

The trainer sees only `DataStage` (three iterators of typed batches). This module's
`TorchDataStage` builds them from torch DataLoaders; `data/dali_stage.py`'s `DaliDataStage`
builds the same batches with NVIDIA DALI pipelines.

Streams are infinite and sharded by rank: the global order is a concatenation of seeded
permutations (one per epoch), and rank r of w takes global positions r, r + w, r + 2w, ...
A stream can start at any position in O(1), which is how a resumed run picks up exactly where
the checkpoint was written.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from acrst_fast.host import mark_host, upload
from acrst_fast.config import AugmentConfig
from acrst_fast.data.coco import DataError, ImageRecord, decode_image
from acrst_fast.data.photometric_batch import apply_strong_batch
from acrst_fast.streams import Stream, sample_seed  # noqa: F401 - sample_seed: also the loader's API
from acrst_fast.data.transforms import (
    Geometry, StrongParams, apply_geometry_to_boxes, apply_geometry_to_image, apply_strong, sample_geometry,
    sample_strong,
)

# Set in the main process when it exits (atexit runs this before multiprocessing terminates its
# workers); forked DataLoader workers share it.
_MAIN_EXITING = multiprocessing.get_context("fork").Event()
atexit.register(_MAIN_EXITING.set)


def _worker_stop_signal(signum, frame) -> None:
    if _MAIN_EXITING.is_set() or os.getppid() == 1:  # the main process is leaving (or gone): leave too
        os._exit(0)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: survive SIGTERM and SIGINT while the main process runs.

    A scheduler's cancel (`kill -- -PGID`) or Ctrl-C signals the whole process group. The workers
    then live on while the main process finishes its step and writes the stop checkpoint; when it
    exits, they leave with it (its own shutdown, or the SIGTERM multiprocessing sends at exit)."""
    signal.signal(signal.SIGTERM, _worker_stop_signal)
    signal.signal(signal.SIGINT, _worker_stop_signal)


log = logging.getLogger(__name__)
STREAM_LABELED, STREAM_UNLABELED, STREAM_VAL = Stream.LABELED, Stream.UNLABELED, Stream.VAL


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


def to_device_ahead(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """The batches with their views on `device` (`Batch.finish_views`). On CUDA each batch is copied
    (uint8 images, from pinned memory) and its views made on a side stream one batch ahead, so this
    work overlaps the current step, and the compute stream waits for it on the device, not the host.
    Elsewhere views made in the workers pass as they are."""
    if device.type != "cuda":
        for b in batches:
            yield b.finish_views(device) if b.raw else b
        return
    side = torch.cuda.Stream(device)

    def start(b: Batch):
        with torch.cuda.stream(side):
            moved = b.finish_views(device)
            done = torch.cuda.Event()
            done.record(side)
        return moved, done

    it = iter(batches)
    ahead = next((start(b) for b in it), None)
    while ahead is not None:
        batch, done = ahead
        ahead = next((start(b) for b in it), None)  # the next copy starts before this batch is used
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        for t in (*batch.weak, *batch.strong):
            t.record_stream(compute)  # the side stream's memory stays valid while compute uses it
        yield batch


class DataStage(Protocol):
    def labeled(self, start_step: int) -> Iterator[Batch]: ...  # strong (+ weak if asked) view + ground truth
    def unlabeled(self, start_step: int) -> Iterator[Batch]: ...  # weak + strong views; boxes: hidden GT only
    def val(self) -> Iterator[Batch]: ...  # weak view at test scale; this rank's shard only


class ShardedStreamSampler(Sampler):
    """Yields (dataset index, sample seed) for rank `rank` of `world`, from this rank's position `start`.

    Infinite (per-epoch seeded permutations) when `epochs` is None; otherwise one ordered pass
    (no shuffling) over the dataset, this rank taking every `world`-th image.
    """

    def __init__(self, size: int, seed: int, stream: int, rank: int, world: int, start: int = 0,
                 infinite: bool = True):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.stream = size, seed, stream
        self.rank, self.world, self.start, self.infinite = rank, world, start, infinite
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, -1 - epoch))
            perm = mark_host(torch.randperm(self.size, generator=gen))  # host draws
            self._perm, self._perm_epoch = perm.tolist(), epoch
        return self._perm

    def __iter__(self):
        if not self.infinite:
            for g in range(self.rank, self.size, self.world):
                yield g, sample_seed(self.seed, self.stream, g)
            return
        j = self.start
        while True:
            g = j * self.world + self.rank
            epoch, offset = divmod(g, self.size)
            yield self._perm_for(epoch)[offset], sample_seed(self.seed, self.stream, g)
            j += 1

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("infinite sampler has no length")
        return len(range(self.rank, self.size, self.world))


class DetectionViews(Dataset):
    """Decodes one record and makes its views. Indexed by (index, seed) from `ShardedStreamSampler`.

    views: subset of ("weak", "strong"); with_boxes: False for unlabeled images (no targets).
    """

    def __init__(self, records: list[ImageRecord], aug: AugmentConfig, views: tuple[str, ...], train: bool,
                 with_boxes: bool, raw: bool = False):
        """raw: hand over the decoded uint8 image and the draws instead of float views (`Batch.finish_views`
        makes them on the training device): a quarter of the bytes cross the process boundary."""
        self.records, self.aug, self.views, self.train, self.with_boxes = records, aug, views, train, with_boxes
        self.raw = raw

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        try:
            return self._views(*key)
        except DataError as exc:  # carried to the main process as a message, not a worker traceback
            return {"error": str(exc)}

    def _views(self, index: int, seed: int) -> dict:
        rec = self.records[index]
        gen = torch.Generator().manual_seed(seed)
        decoded = decode_image(rec)
        h, w = decoded.shape[1:]
        geom = sample_geometry(gen, h, w, self.aug, self.train)
        boxes = torch.from_numpy(rec.boxes) if self.with_boxes else torch.zeros((0, 4))
        labels = torch.from_numpy(rec.labels) if self.with_boxes else torch.zeros((0,), dtype=torch.int64)
        boxes, keep = apply_geometry_to_boxes(boxes, geom, self.aug.crop_min_box)
        out = {"image_id": rec.image_id, "boxes": boxes, "labels": labels[keep], "geometry": geom, "orig_hw": (h, w),
               "weak": None, "strong": None, "views": self.views, "defer": self.aug.photometric_after_paste}
        _, _, cw, ch = geom.crop
        # the same draws, in the same order, as strong_photometric on the weak view makes
        params = sample_strong(gen, self.aug, ch, cw) if "strong" in self.views else None
        if self.raw:
            return out | {"raw": decoded, "strong_params": params}
        weak = apply_geometry_to_image(decoded.float().div_(255.0), geom)
        out["weak"] = weak if "weak" in self.views else None
        if params is not None and self.aug.photometric_after_paste:  # photometric ops after the paste, in the step
            return out | {"strong": weak.clone(), "pending": params}
        return out | {"strong": apply_strong(weak, params) if params is not None else None}


def collate(items: list[dict]) -> tuple[Batch, list[str]]:
    """(the batch of the items that decoded, the error messages of those that did not)."""
    errors = [it["error"] for it in items if "error" in it]
    items = [it for it in items if "error" not in it]
    return Batch(
        image_ids=[it["image_id"] for it in items],
        weak=[it["weak"] for it in items if it["weak"] is not None],
        strong=[it["strong"] for it in items if it["strong"] is not None],
        boxes=[it["boxes"] for it in items],
        labels=[it["labels"] for it in items],
        geometry=[it["geometry"] for it in items],
        orig_hw=[it["orig_hw"] for it in items],
        raw=[it["raw"] for it in items if "raw" in it],
        strong_params=[it["strong_params"] for it in items if "raw" in it],
        views=items[0]["views"] if items else (),
        pending=[it["pending"] for it in items if "pending" in it],
        defer_photometric=bool(items) and items[0].get("defer", False),
    ), errors


class BadImagePolicy:
    """`data.bad_images`: "fail" raises the first DataError (path and problem); "skip" drops the
    image from its batch and logs it with a running count (a batch left empty is not yielded)."""

    def __init__(self, mode: str = "fail"):
        if mode not in ("fail", "skip"):
            raise ValueError(f"data.bad_images must be fail or skip, got '{mode}'")
        self.mode, self.skipped = mode, 0

    def report(self, message: str) -> None:
        if self.mode == "fail":
            raise DataError(message)
        self.skipped += 1
        log.warning("[data] skipped %s (%d skipped so far)", message, self.skipped)


def _checked(batches, policy: BadImagePolicy) -> Iterator[Batch]:
    for batch, errors in batches:
        for message in errors:
            policy.report(message)
        if len(batch):
            yield batch


class TorchDataStage:
    """`DataStage` over torch DataLoaders. Batch sizes here are per rank."""

    def __init__(self, labeled: list[ImageRecord], unlabeled: list[ImageRecord], val: list[ImageRecord],
                 aug: AugmentConfig, batch_labeled: int, batch_unlabeled: int, seed: int, rank: int, world: int,
                 num_workers: int, val_batch: int = 4, labeled_views: tuple[str, ...] = ("strong",),
                 bad_images: str = "fail", view_device: torch.device | None = None):
        """labeled_views: ("weak", "strong") when something (the CropBank) needs the labeled weak view.
        bad_images: what a missing or undecodable image does (`BadImagePolicy`). view_device: None makes
        the float views in the workers (CPU training); a device (CUDA training) makes the workers hand
        over uint8 images in pinned memory, and the views are made on that device one batch ahead
        (`to_device_ahead`)."""
        self.policy = BadImagePolicy(bad_images)
        raw = view_device is not None
        self.sets = {
            STREAM_LABELED: DetectionViews(labeled, aug, labeled_views, train=True, with_boxes=True, raw=raw),
            STREAM_UNLABELED: DetectionViews(unlabeled, aug, ("weak", "strong"), train=True, with_boxes=True, raw=raw),
            STREAM_VAL: DetectionViews(val, aug, ("weak",), train=False, with_boxes=True, raw=raw),
        }
        self.batch = {STREAM_LABELED: batch_labeled, STREAM_UNLABELED: batch_unlabeled, STREAM_VAL: val_batch}
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.view_device = view_device
        self.pin_memory = view_device is not None and view_device.type == "cuda"

    def _loader(self, stream: int, start_step: int, infinite: bool) -> Iterator[Batch]:
        ds = self.sets[stream]
        if len(ds) == 0:
            return iter(())
        sampler = ShardedStreamSampler(len(ds), self.seed, stream, self.rank, self.world,
                                       start=start_step * self.batch[stream], infinite=infinite)
        # Its own generator: creating a loader iterator must not draw from the global RNG, or a resumed run
        # (which opens its streams at a different moment) would see different RPN/RoI sampling.
        base = torch.Generator().manual_seed(sample_seed(self.seed, stream, -(10**6) - start_step))
        loader = DataLoader(ds, batch_size=self.batch[stream], sampler=sampler, collate_fn=collate,
                            num_workers=self.num_workers, prefetch_factor=2 if self.num_workers > 0 else None,
                            pin_memory=self.pin_memory,
                            generator=base, worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None)
        batches = _checked(loader, self.policy)
        return to_device_ahead(batches, self.view_device) if self.view_device is not None else batches

    def labeled(self, start_step: int) -> Iterator[Batch]:
        return self._loader(STREAM_LABELED, start_step, infinite=True)

    def unlabeled(self, start_step: int) -> Iterator[Batch]:
        return self._loader(STREAM_UNLABELED, start_step, infinite=True)

    def val(self) -> Iterator[Batch]:
        return self._loader(STREAM_VAL, 0, infinite=False)
