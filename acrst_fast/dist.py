"""Rank and world size, and every collective the engine makes outside DDP.

CUDA runs use NCCL; CPU runs (CI, this machine) use gloo, so multi-process code is exercised
without a GPU. Launch multi-process runs with `torchrun`.

NCCL reduces device tensors only. So every collective on a CPU tensor (the stop flags, the log
flush, Pseudo Recall, object gathers, barriers) goes through one explicit gloo group created
beside the default group (as detectron2's `comm._get_global_gloo_group`), and device tensors go
through the default group (`group_for`). `ACRST_DIST_BACKEND` overrides the default group's
backend; the tests start it as `cuda:gloo`, which like NCCL refuses CPU tensors, so a CPU tensor
that reaches the default group fails in CI as it would on GPUs. `ACRST_DIST_FORCE=1` starts the
groups even for one process (`torchrun --nproc_per_node=1`), so one GPU runs the NCCL code paths.

The gloo group is made on first use when the process group was started by someone else (a user's
own trainer calling `torch.distributed.init_process_group`, as torchvision's references do): making
it is collective, and every rank reaches its first CPU collective at the same call.
"""
from __future__ import annotations

import datetime
import os
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td

from acrst_fast import peer_watch

_CPU_GROUP: Any = None  # the gloo group for CPU tensors (None when not distributed)
_CPU_GROUP_OF: Any = None  # the default group it was made beside
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("ACRST_DIST_TIMEOUT_MIN", "30")))


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
    force = os.environ.get("ACRST_DIST_FORCE") == "1"  # a group even alone: NCCL code paths on one GPU
    if (world > 1 or force) and not td.is_initialized():
        gloo_interface()
        backend = os.environ.get("ACRST_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
        td.init_process_group(backend=backend, timeout=TIMEOUT, device_id=device if use_cuda else None,
                              **_attempt_store(rank, world))
    cpu_group()
    if world > 1:
        peer_watch.start(td.distributed_c10d._get_default_store(), rank, world)
    return DistInfo(rank, world, local_rank, device)


def _attempt_store(rank: int, world: int) -> dict:
    """Under torchrun, the store of this attempt of the worker group: torchrun's store under a prefix naming
    the restart (`TORCHELASTIC_RESTART_COUNT`). Workers restarted by `--max-restarts` meet again in the store
    of the attempt before, whose keys are still there: without the prefix gloo reads the dead workers'
    addresses and the new group never connects. Outside torchrun: {} (env:// as usual)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                        is_master=not agent and rank == 0, timeout=TIMEOUT)
    return {"store": td.PrefixStore(f"acrst_attempt_{attempt}", store), "rank": rank, "world_size": world}


def gloo_interface() -> str | None:
    """The network interface gloo binds (the side group of CPU collectives, and a CPU run's default group):
    GLOO_SOCKET_IFNAME, else the first interface NCCL_SOCKET_IFNAME names (not its `^` exclusions), which is
    then set as GLOO_SOCKET_IFNAME, so one setting serves both across nodes. None: gloo's own choice (the
    interface the hostname resolves to)."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return os.environ["GLOO_SOCKET_IFNAME"]
    nccl = os.environ.get("NCCL_SOCKET_IFNAME", "").strip()
    if not nccl or nccl.startswith("^"):
        return None
    first = nccl.lstrip("=").split(",")[0].strip()
    if first:
        os.environ["GLOO_SOCKET_IFNAME"] = first
    return first or None


def cpu_group() -> Any:
    """The gloo group every CPU-tensor collective uses (None when not distributed), made on first use.
    A process group destroyed and started again gets a new one."""
    global _CPU_GROUP, _CPU_GROUP_OF
    if not td.is_initialized():
        return None
    default = td.group.WORLD
    if _CPU_GROUP is None or _CPU_GROUP_OF is not default:
        _CPU_GROUP, _CPU_GROUP_OF = td.new_group(backend="gloo", timeout=TIMEOUT), default
    return _CPU_GROUP


def group_for(t: torch.Tensor) -> Any:
    """The group that reduces `t`: the default group (NCCL on GPUs) for device tensors, gloo for CPU ones."""
    return cpu_group() if t.device.type == "cpu" else None


def device_group(device: torch.device) -> Any:
    """The group DDP reduces gradients of a model on `device` over."""
    return cpu_group() if device.type == "cpu" else None


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """In-place all-reduce (sum by default) of `t` over the group for its device; `t` unchanged alone."""
    if td.is_initialized():
        td.all_reduce(t, op=op if op is not None else td.ReduceOp.SUM, group=group_for(t))
    return t


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def barrier() -> None:
    if td.is_initialized():
        td.barrier(group=cpu_group())


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of a dict of floats (same keys on every rank)."""
    if not td.is_initialized():
        return dict(values)
    keys = sorted(values)
    # every rank must reduce the same keys, or values would be summed under the wrong names
    crc = zlib.crc32("\n".join(keys).encode()) % (1 << 20)  # small enough that the sums below are exact
    # first a fixed-size check (equal on all ranks <=> n * sum of squares == sum^2), then the values
    check = all_reduce(torch.tensor([crc, crc * crc], dtype=torch.float64))
    n = td.get_world_size()
    if n * int(check[1]) != int(check[0]) ** 2:
        raise RuntimeError(f"rank {td.get_rank()}: metric keys differ between ranks; this rank has {keys}")
    if not keys:
        return {}
    t = all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / n for k, v in zip(keys, t.tolist())}


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list, rank order); None on other ranks."""
    if not td.is_initialized():
        return [obj]
    out = [None] * td.get_world_size() if td.get_rank() == 0 else None
    td.gather_object(obj, out, dst=0, group=cpu_group())
    return out


def broadcast_from_main(obj: Any) -> Any:
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (over the gloo group)."""
    if not td.is_initialized():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj, group=cpu_group())
    return out


def shutdown() -> None:
    global _CPU_GROUP, _CPU_GROUP_OF
    peer_watch.stop()
    if td.is_initialized():
        td.destroy_process_group()
    _CPU_GROUP = _CPU_GROUP_OF = None
