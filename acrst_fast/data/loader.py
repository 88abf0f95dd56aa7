"""The plain-torch data stage.

The trainer sees only `DataStage` (three iterators of typed batches: `data/batch.py`). This module's
`TorchDataStage` builds them from torch DataLoaders; `data/dali_stage.py`'s `DaliDataStage`
builds the same batches with NVIDIA DALI pipelines.

Streams are infinite and sharded by rank: the global order is a concatenation of seeded
permutations (one per epoch), and rank r of w takes global positions r, r + w, r + 2w, ...
A stream can start at any position in O(1), which is how a resumed run picks up exactly where
the checkpoint was written.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from acrst_fast.host import mark_host
from acrst_fast.config import AugmentConfig
from acrst_fast.data.batch import Batch
from acrst_fast.data.coco import DataError, ImageRecord, decode_image
from acrst_fast.data.workers import ignore_stop_signals
from acrst_fast.streams import Stream, epoch_position, loader_position, sample_seed  # noqa: F401 - sample_seed: also the loader's API
from acrst_fast.data.transforms import (
    apply_geometry_to_boxes, apply_geometry_to_image, apply_strong, sample_geometry, sample_strong,
)

log = logging.getLogger(__name__)
STREAM_LABELED, STREAM_UNLABELED, STREAM_VAL = Stream.LABELED, Stream.UNLABELED, Stream.VAL


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
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, epoch_position(epoch)))
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
        base = torch.Generator().manual_seed(sample_seed(self.seed, stream, loader_position(start_step)))
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
