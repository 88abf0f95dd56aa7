"""The Labeled-bank merge across ranks, in bounded memory.

After the first pass over the labeled set every rank holds a reservoir of its own shard's ground-truth
crops; the merge gives every rank the same bank drawn from all of them (`CropBank.set_labeled` is the
rule, and the reference this is tested against). Gathering every rank's crops would cost each rank
world x (its Labeled bank) of memory, 8 GB a rank at 8 ranks on COCO. Here:

1. every rank's *metadata* is gathered (class, slot, box size, score per stored crop, and the ground
   truths offered per class): about 30 bytes a crop;
2. every rank chooses the same crops with the same generator (`choose`: `set_labeled`'s weighted draw);
3. the chosen pixels move class by class: each owner broadcasts its chosen crops of the class over the
   group of the bank's device (NCCL for a CUDA bank, gloo for a CPU one) straight into a buffer of one
   class (`capacity` crops, reused class after class), which then replaces that class's slots. A class's old slots are read only while that class
   is merged, so the buffer is the only memory beyond the bank: at most `capacity` crops.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as td

from acrst_fast import dist
from acrst_fast.augment.cropbank import LABELED, CropBank
from acrst_fast.host import to_host


def labeled_metadata(bank: CropBank) -> dict:
    """This rank's Labeled sub-bank without its pixels: `slot` int64[E] (bank slot indices, slot order),
    `label` int64[E] (1..K), `size_hw` float32[E, 2], `score` float32[E], `seen` int64[K]."""
    per = bank.num_classes * bank.capacity
    slots = np.flatnonzero(bank._valid_host[:per]).astype(np.int64)
    (score,) = to_host(bank.score[:per])  # the one read: once a run
    return {"slot": slots, "label": slots // bank.capacity + 1, "size_hw": bank._size_host[slots].copy(),
            "score": score[slots].astype(np.float32), "seen": bank.seen[LABELED].copy()}


def choose(metas: list[dict], num_classes: int, capacity: int,
           generator: torch.Generator) -> list[list[tuple[int, int]]]:
    """Per class (index k - 1), the chosen crops as (rank, index into that rank's metadata), in rank and
    slot order: all of them when they fit, else `capacity` drawn without replacement, each crop of rank
    r weighted by seen_r / stored_r. The same draws as `CropBank.set_labeled`, class by class."""
    out = []
    for k in range(1, num_classes + 1):
        chosen, weights = [], []
        for r, meta in enumerate(metas):
            mine = np.flatnonzero(meta["label"] == k)
            chosen += [(r, int(j)) for j in mine]
            weights += [float(meta["seen"][k - 1]) / max(1, len(mine))] * len(mine)
        if len(chosen) > capacity:
            pick = torch.multinomial(torch.tensor(weights, dtype=torch.float64), capacity, replacement=False,
                                     generator=generator)
            chosen = [chosen[i] for i in sorted(pick.tolist())]
        out.append(chosen)
    return out


def merge_labeled(bank: CropBank, generator: torch.Generator) -> int:
    """Collective: replace every rank's Labeled sub-bank by the merge of all of them (the same on every rank;
    `generator` seeded identically on every rank). Returns the bytes of crop pixels held beyond the bank (the
    class buffer: `capacity` crops)."""
    metas = dist.all_gather_object(labeled_metadata(bank))
    me, per = dist.rank(), bank.num_classes * bank.capacity
    chosen = choose(metas, bank.num_classes, bank.capacity, generator)
    # one buffer of a class's capacity, reused for every class: a fresh one per class would leave the
    # allocator holding freed buffers of other sizes (measured: 1.5 classes of extra resident memory)
    buffer = torch.empty((bank.capacity, *bank.pixels.shape[1:]), dtype=torch.uint8, device=bank.device) \
        if any(chosen) else None
    bank._valid_host[:per] = False
    for k, picks in enumerate(chosen, start=1):
        base = bank.slot_base(LABELED, k)
        if picks:
            view = buffer[:len(picks)]
            _receive_class(bank, view, picks, metas, me)
            bank.pixels[base:base + len(picks)] = view
            size_hw = np.stack([metas[r]["size_hw"][j] for r, j in picks]).astype(np.float32)
            score = np.asarray([metas[r]["score"][j] for r, j in picks], dtype=np.float32)
            bank.size_hw[base:base + len(picks)] = torch.from_numpy(size_hw).to(bank.device)
            bank.score[base:base + len(picks)] = torch.from_numpy(score).to(bank.device)
            bank._size_host[base:base + len(picks)] = size_hw
        bank.valid[base:base + bank.capacity] = False
        bank.valid[base:base + len(picks)] = True
        bank._valid_host[base:base + len(picks)] = True
    bank.seen[LABELED] = np.sum([m["seen"] for m in metas], axis=0)
    return buffer.numel() if buffer is not None else 0


def _receive_class(bank: CropBank, buffer: torch.Tensor, picks: list[tuple[int, int]], metas: list[dict],
                   me: int) -> None:
    """Fill `buffer` (uint8[len(picks), 3, S, S]) with the chosen crops of one class: each owner copies its
    own into its run of the buffer and broadcasts that run to every rank (one broadcast per owner)."""
    owners = [r for r in range(len(metas)) if any(r == p[0] for p in picks)]
    start = 0
    for r in owners:
        run = [j for owner, j in picks if owner == r]  # contiguous in `picks`: rank order
        view = buffer[start:start + len(run)]
        if r == me:
            slots = torch.from_numpy(metas[r]["slot"][run]).to(bank.device)
            torch.index_select(bank.pixels, 0, slots, out=view)  # straight into the buffer: no temporary
        if td.is_initialized():
            td.broadcast(view, src=r, group=dist.group_for(view))
        start += len(run)
