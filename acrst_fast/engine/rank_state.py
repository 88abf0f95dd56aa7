"""The CropBank's part of a checkpoint, on disk independent of the world size.

In memory a rank's state is `MeanTeacher.rank_state_dict()`: {"acrst": ACRST.state_dict() (the whole
CropBank: Labeled then Pseudo sub-bank, `pixels` uint8[2 K C, 3, S, S], `size_hw`, `score`, `valid`,
`seen` int64[2, K]; Pseudo Recall; pseudo-label and pasted counts), "bank_fill_start", "labeled_merged"}.
On disk it is split by who owns what:

- `ckpt_{step}.bank.pt`, written once by rank 0: what every rank holds alike: the Labeled sub-bank once
  the ranks' banks were merged, Pseudo Recall and the pseudo-label counts (both all-reduced every step),
  and where the Labeled bank's first pass began;
- `ckpt_{step}.rank{r}.pt`, one a rank: its Pseudo sub-bank (a ring per class over its own teacher's
  pseudo-labels), its pasted counts, and its Labeled sub-bank while the first pass is not yet merged.

Sub-banks are stored compact (only the stored crops, `slot` giving each one's place), so a checkpoint is
as large as what the banks hold. A run resumed at its own world size reads back exactly what it wrote
(bit-identical). At another world size (`read`) the Pseudo rings are re-split or merged deterministically
(`pseudo_sources`, `merge_rings`), the Labeled bank is the merged one, and a first pass that was not yet
merged starts again at the resume step (its shards changed with the world size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

LABELED, PSEUDO = 0, 1
_BANK_KEYS = ("pixels", "size_hw", "score")


def shared_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:08d}.bank.pt"


def compact(bank: dict, source: int) -> dict:
    """One sub-bank of a CropBank state, only its stored crops: `slot` int64[E] (0..K C - 1, in the
    sub-bank), `pixels`, `size_hw`, `score` of those, `seen` int64[K] (offered so far, per class)."""
    k, c, _ = bank["shape"]
    lo = source * k * c
    slot = torch.nonzero(bank["valid"][lo:lo + k * c]).flatten()
    return {"slot": slot, **{name: bank[name][lo + slot].clone() for name in _BANK_KEYS},
            "seen": bank["seen"][source].clone()}


def _empty_bank(shape: tuple[int, int, int]) -> dict:
    k, c, s = shape
    n = 2 * k * c
    return {"pixels": torch.zeros((n, 3, s, s), dtype=torch.uint8), "size_hw": torch.zeros((n, 2)),
            "score": torch.zeros(n), "valid": torch.zeros(n, dtype=torch.bool),
            "seen": torch.zeros((2, k), dtype=torch.int64), "shape": tuple(shape)}


def _place(bank: dict, source: int, part: dict) -> None:
    k, c, _ = bank["shape"]
    idx = source * k * c + part["slot"]
    for name in _BANK_KEYS:
        bank[name][idx] = part[name]
    bank["valid"][idx] = True
    bank["seen"][source] = part["seen"]


def split(state: dict, step: int, rank: int, world: int) -> tuple[dict, dict]:
    """(the shared part, this rank's own part) of a rank state `state` (MeanTeacher.rank_state_dict)."""
    acrst, merged = state["acrst"], bool(state.get("labeled_merged", False))
    bank = acrst["bank"]
    shared = {"step": step, "shape": tuple(bank["shape"]), "labeled_merged": merged,
              "labeled": compact(bank, LABELED) if merged else None, "recall": acrst["recall"],
              "pl_counts": acrst["pl_counts"], "bank_fill_start": int(state.get("bank_fill_start", 0))}
    own = {"step": step, "rank": rank, "world": world, "shape": tuple(bank["shape"]),
           "pseudo": compact(bank, PSEUDO), "labeled_local": None if merged else compact(bank, LABELED),
           "pasted_counts": acrst.get("pasted_counts")}
    return shared, own


def pseudo_sources(old_world: int, new_world: int, new_rank: int) -> list[tuple[int, int, int]]:
    """Where rank `new_rank` of `new_world` takes its Pseudo rings from, as (old rank, share, shares): with
    fewer ranks every old rank r goes whole to r mod new_world; with more, old rank r is split among the
    new ranks r, r + old_world, ... (each takes every `shares`-th crop of a ring in age order)."""
    if new_world <= old_world:
        return [(r, 0, 1) for r in range(new_rank, old_world, new_world)]
    r = new_rank % old_world
    return [(r, new_rank // old_world, len(range(r, new_world, old_world)))]


def _offer_index(pos: np.ndarray, seen: int, capacity: int) -> np.ndarray:
    """The offer count (0-based, per class) at which each ring position `pos` was written, from the class's
    `seen` count: the ring overwrites its oldest slot, which is seen mod capacity once it is full."""
    if seen <= capacity:
        return pos.astype(np.int64)
    return seen - capacity + (pos - seen % capacity) % capacity


def merge_rings(parts: list[tuple[dict, int, int]], num_classes: int, capacity: int) -> dict:
    """One compact Pseudo sub-bank from `parts` ((compact Pseudo part, share, shares), in old-rank order): per
    class, of each part's crops in age order those at index = share (mod shares); of all those the newest
    `capacity` (by age from each ring's newest; ties in part order), laid out oldest first in slots
    0..m-1 with `seen` = m, so the ring goes on overwriting the oldest."""
    slots, picks, seen = [], [], np.zeros(num_classes, dtype=np.int64)
    for k in range(num_classes):
        cand = []  # (age from the newest, part index, entry index)
        for p, (part, share, shares) in enumerate(parts):
            slot = part["slot"].numpy()
            mine = np.flatnonzero(slot // capacity == k)
            n = int(part["seen"][k])
            order = mine[np.argsort(_offer_index(slot[mine] % capacity, n, capacity), kind="stable")]
            offers = _offer_index(slot[order] % capacity, n, capacity)
            cand += [(n - 1 - int(o), p, int(e)) for i, (e, o) in enumerate(zip(order, offers)) if i % shares == share]
        kept = sorted(cand)[:capacity]
        kept.sort(key=lambda t: (-t[0], t[1]))  # oldest first
        slots += [k * capacity + i for i in range(len(kept))]
        picks += [(p, e) for _, p, e in kept]
        seen[k] = len(kept)
    out = {"slot": torch.tensor(slots, dtype=torch.int64), "seen": torch.from_numpy(seen)}
    for name in _BANK_KEYS:
        rows = [parts[p][0][name][e] for p, e in picks]
        like = parts[0][0][name] if parts else torch.zeros(0)
        out[name] = torch.stack(rows) if rows else like[:0].clone()
    return out


def assemble(shared: dict, own: list[tuple[dict, int, int]], num_same: bool, step: int) -> dict:
    """The in-memory rank state (MeanTeacher.rank_state_dict) from the shared part and this rank's sources
    (own parts with (share, shares); one part (0, 1) at the same world size, `num_same`)."""
    shape = tuple(shared["shape"])
    k, c, _ = shape
    bank = _empty_bank(shape)
    merged = bool(shared["labeled_merged"])
    if merged:
        _place(bank, LABELED, shared["labeled"])
    elif num_same:
        _place(bank, LABELED, own[0][0]["labeled_local"])
    pseudo = own[0][0]["pseudo"] if num_same else merge_rings([(o["pseudo"], q, m) for o, q, m in own], k, c)
    _place(bank, PSEUDO, pseudo)
    counts = [o["pasted_counts"] for o, q, _ in own if q == 0 and o.get("pasted_counts") is not None]
    acrst = {"bank": bank, "recall": shared["recall"], "pl_counts": shared["pl_counts"]}
    if counts:
        acrst["pasted_counts"] = torch.stack(counts).sum(0)
    fill_start = int(shared["bank_fill_start"]) if merged or num_same else step  # a first pass starts again
    return {"acrst": acrst, "bank_fill_start": fill_start, "labeled_merged": merged}


def read(shared: dict, load_own: Callable[[int], dict], old_world: int, world: int, rank: int, step: int) -> dict:
    """This rank's in-memory state from checkpoint `step` written by `old_world` ranks; `load_own(r)` reads
    old rank r's own part. The same world size: its own part, exactly; else re-split or merged."""
    same = old_world == world
    own = [(load_own(r), q, m) for r, q, m in ([(rank, 0, 1)] if same else pseudo_sources(old_world, world, rank))]
    return assemble(shared, own, same, step)
