"""The drop-in module in a process group the user started (as torchvision's references do), not through
`acrst_fast.dist.init_distributed`: 2 real processes whose default group refuses CPU tensors like NCCL."""
import os
import socket

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

from acrst_fast.augment import ACRST, PasteConfig

K = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int):
    g = torch.Generator().manual_seed(rank)
    images = [torch.rand(3, 40, 40, generator=g) for _ in range(2)]
    boxes = [torch.tensor([[2.0, 2.0, 20.0, 14.0], [10.0, 12.0, 30.0, 36.0]]) + rank] * 2
    labels = [torch.tensor([1 + rank, 3])] * 2
    return images, boxes, labels


def _worker(rank: int, port: int, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    td.init_process_group("cuda:gloo", rank=rank, world_size=2)  # CPU tensors refused, as under NCCL
    try:
        acrst = ACRST(K, capacity=4, crop_size=8, paste=PasteConfig(n_min=1, n_max=2), pr_window=2)
        images, boxes, labels = _shard(rank)
        acrst.add_ground_truth(images, boxes, labels)
        acrst.share_labeled_bank(torch.Generator().manual_seed(0))
        preds = [{"boxes": b, "labels": lab, "scores": torch.full((len(b),), 0.5 + rank / 4)}
                 for b, lab in zip(boxes, labels)]
        acrst.observe_teacher(images, preds, preds)
        out[rank] = {"pr": acrst.recall.value().tolist(), "seen": acrst.bank.seen[0].tolist(),
                     "labeled": acrst.bank.labeled_part()["pixels"].sum().item()}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out[rank] = repr(exc)
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_works_in_a_users_process_group():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert isinstance(results[0], dict), results[0]
    assert results[0] == results[1]  # one Labeled bank and one Pseudo Recall on every rank
    # PR: both ranks' predictions summed (rank 0 scores 0.5, rank 1 0.75; 2 images each)
    assert results[0]["pr"] == pytest.approx([2 * 0.5, 2 * 0.75, 2 * 0.5 + 2 * 0.75])
    assert results[0]["seen"] == [2, 2, 4]
