"""Scale-out on one machine, gloo on the CPU: resume at another world size (2 -> 1, 1 -> 2), two torchrun
"nodes" (c10d rendezvous) stopped by SIGTERM to one rank and resumed, an exception on one rank stopping
the other node, torchrun's restart of a SIGKILLed worker resuming on its own, and the world sizes a
config runs on."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acrst_fast.config import ConfigError
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.build import _per_rank, world_sizes
from acrst_fast.engine.resume import rank_state_of
from conftest import REPO, fault_env, rank_pid, run_group, tiny_config_dict, write_config

ACRST_ON = {"fbr": True, "selective_supervision": True, "n_range": [1, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: Path, nproc: int, *extra: str, launcher: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
            "-m", "acrst_fast.train", str(cfg), *extra]


def _node(port: int, nproc: int, cfg: Path, *extra: str, restarts: int = 0) -> list[str]:
    """One launcher of a two-node run on this machine (c10d rendezvous at 127.0.0.1:port)."""
    return _torchrun(cfg, nproc, *extra, launcher=("--nnodes=2", "--rdzv_backend=c10d",
                                                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=acrst_test",
                                                    f"--max-restarts={restarts}", "--monitor-interval=1"))


def _config(tmp_path, tiny_demo, name: str, **solver) -> Path:
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", **solver)
    raw["acrst"] = ACRST_ON
    raw["mean_teacher"]["tau_cls"] = 0.0  # pseudo-labels from a barely trained teacher: the Pseudo banks fill
    return write_config(tmp_path / f"{name}.yaml", raw)


def _train_steps(run: Path) -> list[int]:
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def _labeled_crops(state: dict) -> torch.Tensor:
    bank = state["acrst"]["bank"]
    k, c, _ = bank["shape"]
    return bank["pixels"][:k * c][bank["valid"][:k * c]]


def test_world_size_error_lists_the_sizes_that_work():
    assert world_sizes(32, 32) == [1, 2, 4, 8, 16, 32] and world_sizes(8, 12) == [1, 2, 4]
    with pytest.raises(ConfigError, match=r"key 'solver.batch_labeled' \(32\) must be divisible by the number of "
                                          r"processes \(64\); this config runs on 1, 2, 4, 8, 16, 32 processes"):
        _per_rank(32, 64, "solver.batch_labeled", "c.yaml", 32)
    assert _per_rank(32, 8, "solver.batch_labeled", "c.yaml", 32) == 4


def test_each_rank_prunes_its_own_parts(tmp_path):
    for step in (2, 4, 6, 8):
        for r in (0, 1):
            (tmp_path / f"ckpt_{step:08d}.rank{r}.pt").write_bytes(b"x")
    ckpt.prune_rank_parts(tmp_path, 1, keep=2, protect=(2,))
    assert sorted(p.name for p in tmp_path.glob("*.rank1.pt")) == [
        "ckpt_00000002.rank1.pt", "ckpt_00000006.rank1.pt", "ckpt_00000008.rank1.pt"]
    assert len(list(tmp_path.glob("*.rank0.pt"))) == 4  # another rank's files are its own business


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(tmp_path, tiny_demo, cpu_env, first, second):
    cfg = _config(tmp_path, tiny_demo, "c", total_steps=6, pretrain_steps=3)
    done = run_group(_torchrun(cfg, first), env=cpu_env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert ckpt.load(ckpt.checkpoint_path(run, 6))["world"] == first
    assert ckpt.list_checkpoints(run) and (run / "ckpt_00000006.bank.pt").is_file()  # the Labeled bank, once
    before = [rank_state_of(run, 6, r) for r in range(first)]
    resumed = run_group(_torchrun(cfg, second, "--resume", "solver.total_steps=8"), env=cpu_env, cwd=REPO,
                        timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"the checkpoint was written by {first} processes, this run has {second}" in resumed.stdout
    assert _train_steps(run) == list(range(1, 9))  # every step once, across the change
    assert ckpt.load(ckpt.checkpoint_path(run, 8))["world"] == second
    after = [rank_state_of(run, 8, r) for r in range(second)]
    for state in after:  # the merged Labeled bank carried to every rank, unchanged (its pass was over)
        assert torch.equal(_labeled_crops(state), _labeled_crops(before[0]))
        assert state["labeled_merged"] and state["acrst"]["bank"]["seen"][1].sum() > 0
    kept = {s for s, _ in ckpt.list_checkpoints(run)}
    assert {int(p.name[5:13]) for p in run.glob("ckpt_*.rank*.pt")} <= kept  # parts pruned with their checkpoint


class Launcher:
    """A torchrun launcher in its own process group whose output goes to files (four ranks' warnings would
    fill a pipe nobody reads while the test waits, and block the ranks)."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"timed out after {timeout}s: {self.err.read_text()[-3000:]}") from None
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())


def _wait_for_steps(run: Path, n: int, nodes: list[Launcher], timeout: float = 400) -> None:
    metrics, deadline = run / "metrics.jsonl", time.time() + timeout
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= n):
        assert all(x.proc.poll() is None for x in nodes) and time.time() < deadline, \
            [x.finish(5).stderr[-2000:] for x in nodes]
        time.sleep(0.1)


@pytest.mark.slow
def test_two_nodes_sigterm_one_rank_then_resume(tmp_path, tiny_demo, cpu_env):
    cfg = _config(tmp_path, tiny_demo, "nodes", total_steps=200, pretrain_steps=3, batch_labeled=4, batch_unlabeled=4)
    env = dict(cpu_env, GLOO_SOCKET_IFNAME="lo")  # the interface the engine's gloo groups bind
    port = _free_port()
    nodes = [Launcher(_node(port, 2, cfg), tmp_path / f"node{n}", env) for n in range(2)]
    run = tmp_path / "run"
    _wait_for_steps(run, 5, nodes)
    os.kill(rank_pid(3, str(cfg)), signal.SIGTERM)  # one rank of the second node
    done = [x.finish(300) for x in nodes]
    err = "".join(d.stderr for d in done)
    stops = re.findall(r"interrupted: stopped at step (\d+)", err)
    assert len(stops) == 4 and len(set(stops)) == 1, err[-4000:]  # all four ranks, the same step
    stop = int(stops[0])
    assert [s for s, _ in ckpt.list_checkpoints(run)][-1] == stop
    assert all(ckpt.rank_state_path(run, stop, r).is_file() for r in range(4))
    assert "world size 4" in "".join(d.stdout for d in done)
    port = _free_port()
    nodes = [Launcher(_node(port, 2, cfg, "--resume", f"solver.total_steps={stop + 2}"), tmp_path / f"again{n}", env)
             for n in range(2)]
    done = [x.finish(400) for x in nodes]
    assert all(d.returncode == 0 for d in done), "".join(d.stderr[-2000:] for d in done)
    assert _train_steps(run) == list(range(1, stop + 3))
    assert ckpt.load(ckpt.latest_checkpoint(run))["world"] == 4




@pytest.mark.slow
def test_exception_on_one_rank_stops_the_other_node(tmp_path, tiny_demo, cpu_env):
    """Two nodes of one rank each: torchrun stops the failed rank's node only; the other rank stops on the
    announcement (or on the closed connection, naming the same failure) within a minute."""
    cfg = _config(tmp_path, tiny_demo, "fail", total_steps=40, pretrain_steps=40)
    env = fault_env(cpu_env, ACRST_TEST_RAISE="4:1")
    port = _free_port()
    t0 = time.monotonic()
    nodes = [Launcher(_node(port, 1, cfg), tmp_path / f"node{n}", env) for n in range(2)]
    done = [x.finish(300) for x in nodes]
    err = "".join(d.stderr for d in done)
    assert time.monotonic() - t0 < 240
    assert "RuntimeError: injected failure" in err
    lines = [ln for ln in err.splitlines() if "stopping:" in ln]
    assert lines == ["error: rank 0 stopping: rank 1 failed at step 5: RuntimeError: injected failure"], err[-4000:]


@pytest.mark.slow
def test_torchrun_restart_resumes_on_its_own(tmp_path, tiny_demo, cpu_env):
    cfg = _config(tmp_path, tiny_demo, "restart", total_steps=12, pretrain_steps=6)
    launcher = Launcher(_torchrun(cfg, 2, launcher=("--standalone", "--max-restarts=1", "--monitor-interval=1")),
                        tmp_path / "launcher", cpu_env)
    run = tmp_path / "run"
    deadline = time.time() + 400
    while not ckpt.list_checkpoints(run) or ckpt.list_checkpoints(run)[-1][0] < 4:
        assert launcher.proc.poll() is None and time.time() < deadline, launcher.finish(5).stderr[-3000:]
        time.sleep(0.1)
    os.kill(rank_pid(1, str(cfg)), signal.SIGKILL)
    done = launcher.finish(600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[restart] torchrun restarted the workers (1): resuming from the newest checkpoint" in done.stdout
    assert "[resume]" in done.stdout
    assert _train_steps(run) == list(range(1, 13))  # the killed attempt's unsaved steps dropped, then redone
    assert ckpt.load(ckpt.latest_checkpoint(run))["step"] == 12
