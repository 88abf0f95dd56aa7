"""Rank and world size: the one module that reads torchrun's environment.

CUDA runs use NCCL; CPU runs (CI, this machine) use gloo, so multi-process code is exercised
without a GPU. Launch multi-process runs with `torchrun`.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); start the process group when world > 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("run.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, device)


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of a dict of floats (same keys on every rank)."""
    if not td.is_initialized():
        return dict(values)
    keys = sorted(values)
    # every rank must reduce the same keys, or values would be summed under the wrong names
    crc = torch.tensor([zlib.crc32("\n".join(keys).encode())], dtype=torch.int64)
    lo, hi = crc.clone(), crc.clone()
    td.all_reduce(lo, op=td.ReduceOp.MIN)
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"rank {td.get_rank()}: metric keys differ between ranks; this rank has {keys}")
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    return {k: float(v) / td.get_world_size() for k, v in zip(keys, t.tolist())}


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if td.is_initialized():
        td.all_reduce(t)
    return t


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list, rank order); None on other ranks."""
    if not td.is_initialized():
        return [obj]
    out = [None] * td.get_world_size() if td.get_rank() == 0 else None
    td.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()
