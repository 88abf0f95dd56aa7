"""Collective helpers under gloo with 2 real processes."""
import os
import socket

import pytest
import torch.distributed as td
import torch.multiprocessing as mp

from acrst_fast import dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, same_keys: bool, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    td.init_process_group("gloo", rank=rank, world_size=2)
    try:
        values = {"loss": float(rank + 1), "x": 2.0 * rank}
        if not same_keys and rank == 1:
            values["only_on_rank1"] = 1.0
        out[rank] = dist.all_reduce_mean(values)
    except RuntimeError as exc:
        out[rank] = str(exc)
    finally:
        td.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("same_keys", [True, False])
def test_all_reduce_mean_checks_keys(same_keys):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), same_keys, out), nprocs=2, join=True)
        results = dict(out)
    if same_keys:
        assert results[0] == results[1] == {"loss": 1.5, "x": 1.0}
    else:
        assert all("metric keys differ between ranks" in results[r] for r in (0, 1))
