"""A failing rank stops every rank quickly (acrst_fast/peer_watch.py), on real processes.

The ranks here wait in a gloo collective the failed rank never joins, and the failed rank's process stays
alive (its sockets open), so nothing but the watch can end the wait: what NCCL does on GPUs, where the
wait lasts until the 30-minute timeout."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from acrst_fast import dist
from conftest import REPO

SCRIPT = textwrap.dedent("""
    import os, sys, time
    from acrst_fast import dist, peer_watch
    info = dist.init_distributed("cpu")
    mode = sys.argv[1]
    if info.rank == 1:
        if mode == "announce":
            peer_watch.current().announce("rank 1 failed at step 3: RuntimeError: boom")
        print("ready", flush=True)
        time.sleep(120)  # alive, sockets open, never joining the barrier
    else:
        dist.barrier()  # waits for rank 1 forever, but for the watch
        print("barrier passed", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, mode: str, env: dict) -> list[subprocess.Popen]:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        e = dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), mode], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait_rank0(procs, limit: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=limit)
        return procs[0].returncode, err, time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.mark.slow
def test_announced_failure_stops_the_waiting_rank(tmp_path, cpu_env):
    procs = _start(tmp_path, "announce", cpu_env)
    code, err, waited = _wait_rank0(procs, 60)
    assert code == 4, err[-2000:]
    lines = [ln for ln in err.splitlines() if "stopping" in ln]
    assert lines == ["error: rank 0 stopping: rank 1 failed at step 3: RuntimeError: boom"], err[-2000:]
    assert waited < 30


@pytest.mark.slow
def test_silent_rank_stops_the_others_after_the_peer_timeout(tmp_path, cpu_env):
    procs = _start(tmp_path, "silent", dict(cpu_env, ACRST_PEER_TIMEOUT_S="5"))
    assert procs[1].stdout.readline().strip() == "ready"
    time.sleep(4)  # both ranks have beaten a few times
    os.kill(procs[1].pid, signal.SIGSTOP)  # as a lost node: no beat, sockets open
    code, err, waited = _wait_rank0(procs, 60)  # ends by killing both
    assert code == 4, err[-2000:]
    assert "error: rank 0 stopping: rank 1 has not been heard from for" in err, err[-2000:]
    assert waited < 30


@pytest.mark.parametrize("nccl, gloo, expected", [("eth1", "", "eth1"), ("=ib0,ib1", "", "ib0"),
                                                  ("^docker,lo", "", None), ("", "", None), ("eth1", "lo", "lo")])
def test_gloo_follows_the_nccl_interface(monkeypatch, nccl, gloo, expected):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", nccl)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", gloo)
    assert dist.gloo_interface() == expected
    assert os.environ.get("GLOO_SOCKET_IFNAME") == (expected or "")
