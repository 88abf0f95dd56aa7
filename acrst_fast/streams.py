"""The randomness streams of a run, in one registry.

Every random draw of training comes from a generator seeded by (run seed, stream, position)
(`sample_seed`): the data order and augmentation of each image, ACRST's sampling at each step. So
a resumed run draws what an uninterrupted one would, and ranks never share a stream by accident.
A stream's number is part of what a run draws: changing one changes the run, so they are fixed here.
"""
from __future__ import annotations

import hashlib
from enum import IntEnum

import torch


class Stream(IntEnum):
    # the detector's data stage: order and augmentation, per image position
    LABELED = 0
    UNLABELED = 1
    VAL = 2
    # the SSMLL classifier's data: its own order and views of the same images
    SSMLL_LABELED = 11
    SSMLL_UNLABELED = 12
    SSMLL_LABEL_MASK = 13  # which labels label-mask training reveals, per (step, rank)
    # ACRST, per (step, rank): teacher predictions into the Pseudo bank; labeled boxes into the
    # Labeled bank; paste plans of the labeled and of the unlabeled images; the merge of every
    # rank's Labeled bank (one draw, the same on every rank)
    ACRST_OBSERVE = 100
    ACRST_LABELED_BANK = 101
    ACRST_PASTE_LABELED = 102
    ACRST_PASTE_UNLABELED = 103
    ACRST_SHARE_BANK = 104
    # a branch (`run.branch_from`): the global RNGs (the RPN/RoI samplers' draws) after the branch
    # point, per (branch step, rank), from the branch's own seed
    BRANCH_GLOBAL = 200
    # a resume at another world size than the checkpoint's: the global RNGs, per (step, new rank)
    RESUME_GLOBAL = 201


def sample_seed(seed: int, stream: int, position: int) -> int:
    """A 63-bit seed for one draw, from (run seed, stream id, global position)."""
    digest = hashlib.blake2b(f"{seed}:{int(stream)}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, stream: Stream, position: int) -> torch.Generator:
    """A CPU generator seeded for (seed, stream, position)."""
    return torch.Generator().manual_seed(sample_seed(seed, stream, position))


# Seeds that are not one draw of a stream at a position. Each is named here, with the value it always had
# (a changed formula changes every run drawn since), so no module computes a seed by hand.

def epoch_position(epoch: int) -> int:
    """The position of an epoch's permutation in its stream (the data order): -1 - epoch, apart from the
    images' positions 0, 1, ..."""
    return -1 - epoch


def loader_position(start_step: int) -> int:
    """The position of the DataLoader's own base generator for a stream opened at `start_step`: far below
    the epochs' positions."""
    return -(10**6) - start_step


def rank_global_seed(seed: int, rank: int) -> int:
    """The global torch RNG of a rank for a run's own draws outside the streams (the RPN/RoI samplers,
    dropout): seed + 1000 rank."""
    return seed + 1000 * rank


def dali_seed(seed: int, stream: int, rank: int = 0) -> int:
    """The seed of a DALI pipeline of `stream` on `rank` (its operators' own draws; the views are seeded
    per sample from `sample_seed`)."""
    return seed * 1000 + stream * 10 + rank


def ssmll_dali_seed(seed: int, stream: int) -> int:
    """The seed of the SSMLL stage's DALI pipeline of `stream` (the same on every rank: each rank's positions
    differ, and every view is seeded per sample): seed * 1000 + stream."""
    return seed * 1000 + stream


def report_sample_seed(index: int) -> int:
    """The view seed of the `index`-th labeled image drawn in the run report's CropBank figure."""
    return 1000 + index
