"""The bounded Labeled-bank merge (augment/bank_merge.py) on 2 and 4 real CPU processes: the same bank on
every rank, the same bank as the gather-everything reference (`CropBank.set_labeled`), and a peak of extra
memory of at most one class of crops, measured by the kernel (VmHWM, reset before the merge)."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

from acrst_fast import dist
from acrst_fast.augment.bank_merge import choose, merge_labeled
from acrst_fast.augment.cropbank import LABELED, CropBank
from conftest import seeds

K, CAPACITY, CROP = 8, 64, 128  # one class of crops: 3.1 MB; one rank's Labeled sub-bank: 25 MB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill(bank: CropBank, rank: int, seed: int) -> None:
    """A rank's first pass, written into the bank directly: per class a random number of stored crops
    (some classes empty, some full) of random pixels, and a seen count of at least as many."""
    g = np.random.default_rng([seed, rank])
    for k in range(1, K + 1):
        n = int(g.choice([0, 3, CAPACITY // 2, CAPACITY]))
        base = bank.slot_base(LABELED, k)
        if n:
            bank.pixels[base:base + n] = torch.from_numpy(g.integers(0, 256, (n, 3, CROP, CROP), dtype=np.uint8))
            hw = g.uniform(2, 300, (n, 2)).astype(np.float32)
            bank.size_hw[base:base + n] = torch.from_numpy(hw)
            bank._size_host[base:base + n] = hw
            bank.score[base:base + n] = torch.from_numpy(g.uniform(0.5, 1, n).astype(np.float32))
            bank.valid[base:base + n] = True
            bank._valid_host[base:base + n] = True
        bank.seen[LABELED, k - 1] = n + (int(g.integers(0, 500)) if n == CAPACITY else 0)


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _labeled(bank: CropBank) -> dict:
    n = K * CAPACITY
    return {"pixels": bank.pixels[:n].clone(), "size_hw": bank.size_hw[:n].clone(), "score": bank.score[:n].clone(),
            "valid": bank.valid[:n].clone(), "valid_host": torch.from_numpy(bank._valid_host[:n].copy()),
            "size_host": torch.from_numpy(bank._size_host[:n].copy()), "seen": torch.from_numpy(bank.seen[LABELED].copy())}


def _worker(rank: int, world: int, port: int, seed: int, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    td.init_process_group("cuda:gloo", rank=rank, world_size=world)  # CPU tensors refused, as under NCCL
    try:
        torch.set_num_threads(1)
        bank = CropBank(K, CAPACITY, CROP)
        bank.pixels.fill_(0)  # every page of the bank resident: its own slots are not extra memory
        _fill(bank, rank, seed)
        before = {k: v.clone() for k, v in bank.state_dict().items() if isinstance(v, torch.Tensor)}
        warm = CropBank(K, 2, 8)  # the same code once on a small bank: library pages are resident before measuring
        warm.valid[:2] = True
        warm._valid_host[:2] = True
        warm.seen[LABELED, 0] = 2
        merge_labeled(warm, torch.Generator().manual_seed(seed))
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current one
        rss = _status("VmRSS")
        reported = merge_labeled(bank, torch.Generator().manual_seed(seed))
        extra = _status("VmHWM") - rss
        merged = _labeled(bank)
        ref = CropBank(K, CAPACITY, CROP)
        ref.load_state_dict(before | {"shape": (K, CAPACITY, CROP)})
        ref.set_labeled(dist.all_gather_object(ref.labeled_part()), torch.Generator().manual_seed(seed))
        expected = _labeled(ref)
        same_as_ref = all(torch.equal(merged[k], expected[k]) for k in merged)
        pseudo_kept = torch.equal(bank.pixels[K * CAPACITY:], before["pixels"][K * CAPACITY:])
        digests = dist.all_gather_object({k: v.double().sum().item() for k, v in merged.items()})
        out[rank] = {"extra": extra, "reported": reported, "same_as_ref": same_as_ref, "pseudo_kept": pseudo_kept,
                     "digests": digests, "stored": int(merged["valid"].sum()), "offered": merged["seen"].tolist()}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out[rank] = repr(exc)
    finally:
        td.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("seed", seeds((0,)))
def test_merge_is_the_reference_everywhere_in_one_class_of_memory(world, seed):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), seed, out), nprocs=world, join=True)
        results = [out[r] for r in range(world)]
    assert all(isinstance(r, dict) for r in results), results
    class_bytes, rank_bank_bytes = CAPACITY * 3 * CROP * CROP, K * CAPACITY * 3 * CROP * CROP
    print(f"world {world}: extra resident bytes per rank {[r['extra'] for r in results]}; one class {class_bytes}")
    for r in results:
        assert r["same_as_ref"] and r["pseudo_kept"]
        assert r["digests"] == results[0]["digests"]  # one bank on every rank
        assert 0 < r["reported"] <= class_bytes
        # measured by the kernel: one class's buffer plus a little (gloo, the metadata), far under the
        # world x one rank's bank that gathering the crops takes (the reference)
        assert r["extra"] <= class_bytes + 4 * 2**20, (r["extra"], class_bytes)
    assert results[0]["extra"] < rank_bank_bytes / 4
    assert results[0]["stored"] > 0


def test_choose_is_set_labeleds_draw():
    """One process: `choose` on the metadata picks the crops `set_labeled` keeps (its draw, class by class)."""
    metas = []
    for r, counts in enumerate(([3, 0, 5], [4, 2, 0], [1, 1, 1])):
        label = np.repeat(np.arange(1, 4), counts)
        metas.append({"label": label, "seen": np.asarray(counts) * (r + 1)})
    picked = choose(metas, 3, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in picked] == [4, 3, 4]  # class 1: 8 offered, 4 kept; class 2: 3 fit
    assert picked[1] == [(1, 4), (1, 5), (2, 1)]  # all of them, rank then slot order
    again = choose(metas, 3, 4, torch.Generator().manual_seed(0))
    assert again == picked and all(p == sorted(p) for p in picked)
