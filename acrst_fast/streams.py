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
