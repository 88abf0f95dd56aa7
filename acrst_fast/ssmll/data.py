"""SSMLL views: square images (input_size x input_size) with weak and strong augmentation.

A stream of positions p = step * batch + j visits the records in a fresh permutation per epoch
(seeded by (seed, stream, epoch)); each item's augmentation is seeded by (seed, stream, p). So
the batch of any step is a function of the step alone, and a resumed run sees the same data.
With `world` processes, rank r takes the r-th slice of each step's global batch (`step_positions`).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from acrst_fast.config import AugmentConfig
from acrst_fast.data.coco import DataError, ImageRecord, decode_image
from acrst_fast.data.workers import ignore_stop_signals
from acrst_fast.streams import epoch_position, sample_seed, ssmll_dali_seed
from acrst_fast.data.transforms import strong_photometric
from acrst_fast.ssmll.metrics import image_labels


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 Tensor[3, H, W] -> float Tensor[3, size, size] in [0, 1] (bilinear, antialiased)."""
    return F.interpolate(image[None].float() / 255.0, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


class SquareViews(Dataset):
    """Item p of stream `stream`: {"weak", "strong": Tensor[3, S, S], "labels": Tensor[K] multi-hot}."""

    def __init__(self, records: list[ImageRecord], num_classes: int, size: int, augment: AugmentConfig, seed: int,
                 stream: int, train: bool = True):
        self.records, self.num_classes, self.size, self.augment = records, num_classes, size, augment
        self.seed, self.stream, self.train = seed, stream, train

    def __len__(self) -> int:
        return len(self.records)

    def record_index(self, position: int) -> int:
        n = len(self.records)
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.stream, epoch_position(epoch))))
        return int(perm[offset])

    def __getitem__(self, position: int) -> dict:
        idx = self.record_index(position) if self.train else position
        rec = self.records[idx]
        weak = square(decode_image(rec), self.size)
        labels = image_labels([torch.from_numpy(rec.labels)], self.num_classes)[0]
        if not self.train:
            return {"weak": weak, "strong": weak, "labels": labels}
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, position))
        if self.augment.flip_prob > 0 and float(torch.rand((), generator=gen)) < self.augment.flip_prob:
            weak = weak.flip(-1)
        return {"weak": weak, "strong": strong_photometric(weak, gen, self.augment), "labels": labels}


def step_positions(step: int, batch: int, rank: int = 0, world: int = 1) -> range:
    """Rank `rank`'s stream positions of `step`, whose global batch is `batch` (divisible by `world`).

    Each step takes the global positions [step * batch, (step + 1) * batch), as the detector's
    `ShardedStreamSampler` does; only the dealing differs (here a contiguous slice a rank, there every
    world-th position). The classifier's steps are a fixed range [first, end) read by a Sampler of whole
    batches, the detector's an infinite stream opened at any step: both deal one step's positions, and
    at one process they are the same order. Dealing them alike would move images between ranks and change
    the runs already made with more than one process, for no difference in what a step trains on."""
    per_rank = batch // world
    first = step * batch + rank * per_rank
    return range(first, first + per_rank)


class StepBatches(Sampler):
    """Batches of positions for steps start, start + 1, ...: this rank's slice of
    [step * batch, (step + 1) * batch) (all of it with one process)."""

    def __init__(self, batch: int, start_step: int, end_step: int, rank: int = 0, world: int = 1):
        self.batch, self.start, self.end, self.rank, self.world = batch, start_step, end_step, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield list(step_positions(step, self.batch, self.rank, self.world))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def step_loader(views: SquareViews, batch: int, start_step: int, end_step: int, workers: int, rank: int = 0,
                world: int = 1) -> DataLoader:
    """Batches {"weak", "strong": Tensor[B, 3, S, S], "labels": Tensor[B, K]} for the given steps
    (B = batch / world: this rank's slice)."""
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    gen = torch.Generator().manual_seed(sample_seed(views.seed, views.stream, start_step))
    return DataLoader(views, batch_sampler=StepBatches(batch, start_step, end_step, rank, world), num_workers=workers,
                      collate_fn=_collate, generator=gen,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


def dali_step_batches(views: SquareViews, batch: int, start_step: int, end_step: int, device_id: int | None,
                      threads: int, bad_images: str, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """`step_loader`'s batches made by the DALI pipeline of the detector's data stage: the same
    records, flips and strong-view draws (from the same per-position generators), decoded and
    augmented by DALI (on the GPU when device_id is set). A bad image fails the run or, with
    `skip`, is left out of its batch (the batch is then smaller)."""
    from acrst_fast.data.dali_stage import DaliRunner, view_args
    from acrst_fast.data.loader import BadImagePolicy
    from acrst_fast.data.transforms import sample_strong

    policy = BadImagePolicy(bad_images)
    runner = DaliRunner(batch // world, device_id, ssmll_dali_seed(views.seed, views.stream), threads, ("weak", "strong"), policy)
    s = views.size
    for step in range(start_step, end_step):
        items = []
        for position in step_positions(step, batch, rank, world):
            rec = views.records[views.record_index(position)]
            gen = torch.Generator().manual_seed(sample_seed(views.seed, views.stream, position))
            flip = views.augment.flip_prob > 0 and float(torch.rand((), generator=gen)) < views.augment.flip_prob
            try:
                args = view_args(rec, (s, s), (0, 0, s, s), flip, sample_strong(gen, views.augment, s, s))
            except DataError as err:
                policy.report(str(err))
                continue
            labels = image_labels([torch.from_numpy(rec.labels)], views.num_classes)[0]
            items.append({"record": rec, "args": args, "labels": labels})
        items, out = runner.run(items)
        if items:
            yield {"weak": torch.stack(out["weak"]), "strong": torch.stack(out["strong"]),
                   "labels": torch.stack([it["labels"] for it in items])}


def eval_loader(records: list[ImageRecord], num_classes: int, size: int, augment: AugmentConfig,
                batch: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    """The weak (plain) views of every `world`-th record from `rank`, in order."""
    views = SquareViews(records[rank::world], num_classes, size, augment, seed=0, stream=0, train=False)
    return DataLoader(views, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=_collate,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals if workers > 0 else None)
