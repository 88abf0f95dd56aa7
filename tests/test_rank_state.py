"""The CropBank's checkpoint parts (engine/rank_state.py): the same world size reads back what was written;
another world size re-splits or merges the Pseudo rings, every crop going to exactly one rank, the newest
kept, oldest first in the new rings."""
from pathlib import Path

import numpy as np
import pytest
import torch

from acrst_fast.augment.cropbank import LABELED, PSEUDO, CropBank
from acrst_fast.engine import rank_state
from conftest import seeds

K, C, S = 3, 4, 4


def _bank(rank: int, seed: int, offers: int = 9) -> CropBank:
    """A bank whose Pseudo rings wrapped (more offers than slots) and whose Labeled bank holds a few crops;
    each crop's pixels are (rank, class, offer index), so where it went is visible."""
    bank = CropBank(K, C, S)
    g = torch.Generator().manual_seed(seed * 10 + rank)
    for k in range(1, K + 1):
        n = offers + k - 2 + rank  # classes and ranks with different counts, some below capacity
        for i in range(n):
            slot = bank._take_slot(PSEUDO, k, g)
            bank.pixels[slot] = torch.tensor([rank, k, i % 256], dtype=torch.uint8).view(3, 1, 1)
            bank.size_hw[slot] = torch.tensor([i + 2.0, 3.0])
            bank.score[slot] = 0.5
            bank.valid[slot] = True
            bank._valid_host[slot] = True
        lab = bank.slot_base(LABELED, k)
        bank.valid[lab] = True
        bank._valid_host[lab] = True
        bank.pixels[lab] = 100 + k
        bank.seen[LABELED, k - 1] = 1
    return bank


def _state(bank: CropBank, merged: bool = True) -> dict:
    return {"acrst": {"bank": {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in bank.state_dict().items()},
                      "recall": {"history": torch.arange(6.0)}, "pl_counts": torch.ones(2, K),
                      "pasted_counts": torch.ones(2, K, dtype=torch.int64)},
            "bank_fill_start": 0, "labeled_merged": merged}


def _crops(bank: dict, source: int) -> dict[int, list[tuple[int, int]]]:
    """Per class, the (rank, offer index) of each valid crop of sub-bank `source`, in slot order."""
    out = {}
    for k in range(1, K + 1):
        lo = (source * K + k - 1) * C
        out[k] = [(int(bank["pixels"][i, 0, 0, 0]), int(bank["pixels"][i, 2, 0, 0]))
                  for i in range(lo, lo + C) if bank["valid"][i]]
    return out


@pytest.mark.parametrize("merged", [True, False])
def test_same_world_reads_back_what_was_written(merged):
    bank = _bank(0, 0)
    state = _state(bank, merged)
    shared, own = rank_state.split(state, 7, 0, 1)
    back = rank_state.read(shared, lambda r: own, 1, 1, 0, 7)
    for name in ("pixels", "size_hw", "score", "valid", "seen"):
        valid = state["acrst"]["bank"]["valid"]
        a, b = state["acrst"]["bank"][name], back["acrst"]["bank"][name]
        assert torch.equal(a[valid] if name != "seen" else a, b[valid] if name != "seen" else b), name
    assert torch.equal(back["acrst"]["bank"]["valid"], state["acrst"]["bank"]["valid"])
    assert back["labeled_merged"] is merged and back["bank_fill_start"] == 0
    assert (shared["labeled"] is None) is (not merged) and (own["labeled_local"] is None) is merged


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (4, 2), (2, 4), (3, 2), (2, 3), (1, 4)])
@pytest.mark.parametrize("seed", seeds((0, 1)))
def test_another_world_deals_every_crop_once(old, new, seed):
    banks = [_bank(r, seed) for r in range(old)]
    parts = [rank_state.split(_state(b), 5, r, old) for r, b in enumerate(banks)]
    shared = parts[0][0]
    states = [rank_state.read(shared, lambda r: parts[r][1], old, new, nr, 5) for nr in range(new)]
    ring_before = {k: sum((_crops(_state(b)["acrst"]["bank"], PSEUDO)[k] for b in banks), []) for k in range(1, K + 1)}
    for k in range(1, K + 1):
        after = sum((_crops(s["acrst"]["bank"], PSEUDO)[k] for s in states), [])
        assert len(after) == len(set(after))  # no crop on two ranks
        assert set(after) <= set(ring_before[k])
        if new >= old:  # a split keeps every crop
            assert sorted(after) == sorted(ring_before[k])
        for s in states:
            crops = _crops(s["acrst"]["bank"], PSEUDO)[k]
            n = int(s["acrst"]["bank"]["seen"][PSEUDO, k - 1])
            assert n == len(crops) <= C  # the ring goes on from its oldest
            # oldest first in each ring of origin
            for r in range(old):
                mine = [i for rr, i in crops if rr == r]
                assert mine == sorted(mine)
    for s in states:  # the merged Labeled bank and Pseudo Recall on every rank
        assert _crops(s["acrst"]["bank"], LABELED) == _crops(_state(banks[0])["acrst"]["bank"], LABELED)
        assert torch.equal(s["acrst"]["recall"]["history"], torch.arange(6.0))
    total = sum(s["acrst"]["pasted_counts"] for s in states if "pasted_counts" in s["acrst"])
    assert torch.equal(total, torch.full((2, K), old, dtype=torch.int64))  # counted once, not per share


def test_merge_keeps_the_newest():
    """Two full rings merged into one: the newest C of each class, by age from each ring's newest."""
    banks = [_bank(r, 0, offers=12) for r in range(2)]
    parts = [rank_state.split(_state(b), 5, r, 2)[1] for r, b in enumerate(banks)]
    merged = rank_state.merge_rings([(p["pseudo"], 0, 1) for p in parts], K, C)
    bank = rank_state._empty_bank((K, C, S))
    rank_state._place(bank, PSEUDO, merged)
    crops = _crops(bank, PSEUDO)
    for k in range(1, K + 1):
        n = [12 + k - 2 + r for r in range(2)]  # offers per ring
        newest = sorted([(n[r] - 1 - i, r, i) for r in range(2) for i in range(n[r]) if n[r] - 1 - i < C])[:C]
        assert sorted(crops[k]) == sorted((r, i) for _, r, i in newest)
        assert [a for a, _ in sorted([(n[r] - 1 - i, (r, i)) for r, i in crops[k]], reverse=True)] \
            == [n[r] - 1 - i for r, i in crops[k]]  # oldest first


def test_unmerged_first_pass_starts_again_at_another_world_size():
    banks = [_bank(r, 0) for r in range(2)]
    parts = [rank_state.split(_state(b, merged=False), 5, r, 2) for r, b in enumerate(banks)]
    back = rank_state.read(parts[0][0], lambda r: parts[r][1], 2, 1, 0, 5)
    assert not back["labeled_merged"] and back["bank_fill_start"] == 5
    assert not back["acrst"]["bank"]["valid"][:K * C].any() and back["acrst"]["bank"]["seen"][LABELED].sum() == 0


def test_sources_cover_every_old_rank_once():
    for old in range(1, 6):
        for new in range(1, 6):
            got = [(r, q, m) for nr in range(new) for r, q, m in rank_state.pseudo_sources(old, new, nr)]
            for r in range(old):
                shares = [(q, m) for rr, q, m in got if rr == r]
                assert sorted(q for q, _ in shares) == list(range(len(shares)))
                assert all(m == len(shares) for _, m in shares)
    assert np.all([len(rank_state.pseudo_sources(4, 2, r)) == 2 for r in range(2)])


def _local_folder_worker(rank: int, port: int, root: str, out):
    """Rank `rank` in its own working directory: "run/" is node-local, as on two machines' own disks."""
    import os

    import torch.distributed as td

    from acrst_fast.engine import checkpoint as ckpt
    from acrst_fast.engine.resume import read_rank_state

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.chdir(os.path.join(root, f"node{rank}"))
    td.init_process_group("gloo", rank=rank, world_size=2)
    try:
        main = ckpt.read_everywhere("run/ckpt_00000005.pt")  # only node 0 has it
        state = read_rank_state(Path("run"), 5, rank, 2, 2)
        out[rank] = {"step": main["step"], "crops": _crops(state["acrst"]["bank"], PSEUDO),
                     "labeled": _crops(state["acrst"]["bank"], LABELED)}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out[rank] = repr(exc)
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_resume_from_node_local_folders(tmp_path):
    """Rank 0's folder holds the main file and the shared part, each node its own rank's part: every rank
    reads the checkpoint (the main file and the shared part sent by rank 0) and its own Pseudo bank."""
    import socket

    import torch.multiprocessing as mp

    from acrst_fast.engine import checkpoint as ckpt

    banks = [_bank(r, 0) for r in range(2)]
    for r, b in enumerate(banks):
        shared, own = rank_state.split(_state(b), 5, r, 2)
        run = tmp_path / f"node{r}" / "run"
        run.mkdir(parents=True)
        ckpt.atomic_save(own, ckpt.rank_state_path(run, 5, r))
        if r == 0:
            ckpt.atomic_save(shared, rank_state.shared_path(run, 5))
            ckpt.atomic_save({"step": 5, "world": 2}, ckpt.checkpoint_path(run, 5))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_local_folder_worker, args=(port, str(tmp_path), out), nprocs=2, join=True)
        results = [out[r] for r in range(2)]
    assert all(isinstance(r, dict) for r in results), results
    for r, res in enumerate(results):
        assert res["step"] == 5
        assert res["crops"] == _crops(_state(banks[r])["acrst"]["bank"], PSEUDO)  # its own ring, exactly
        assert res["labeled"] == _crops(_state(banks[0])["acrst"]["bank"], LABELED)  # rank 0's shared part
