"""Training faults: a divergence that the advice it prints recovers from, and stopping like a cluster job
(SIGTERM to the process group with DataLoader workers)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from acrst_fast.engine import checkpoint as ckpt
from conftest import REPO, tiny_config_dict, write_config
from faults_helpers import _train


# ---------------------------------------------------------------- 4. divergence that can be recovered

@pytest.mark.slow
def test_divergence_advice_works(tmp_path, tiny_demo, cpu_env):
    # a learning rate warming up to 0.5 blows this small detector up after about 15 steps
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=40, pretrain_steps=40, lr=0.5,
                           warmup_steps=30, divergence_check_steps=3)
    raw["run"].update({"checkpoint_period": 2, "keep_checkpoints": 1})
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = _train(cfg, env=cpu_env)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: training diverged")][0]
    assert "loss is not finite on rank 0" in line and "sup {loss_objectness" in line
    m = re.search(r"--resume-from (\S+) solver\.lr=(\S+)", line)
    assert m and float(m.group(2)) == pytest.approx(0.05), line
    diverged_at = int(re.search(r"step (\d+): loss is not finite", line).group(1))
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["total"] for r in records if r["kind"] == "train"}
    good = ckpt.load(m.group(1))
    assert good["step"] < diverged_at
    # the losses after the good checkpoint stayed near the level before it; newer checkpoints were rejected
    assert max(logged[s] for s in range(good["step"] + 1, good["step"] + 4)) < 10 * max(
        logged[s] for s in range(good["step"] - 2, good["step"] + 1))
    newer = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run") if s > good["step"]]
    assert newer, "the test wants a rejected newer checkpoint on disk"
    assert max(float(v.abs().max()) for v in good["runner"]["student"].values() if v.is_floating_point()) < 1e3
    # follow the advice: the run trains to its end
    again = _train(cfg, "--resume-from", m.group(1), f"solver.lr={m.group(2)}", env=cpu_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path / "run"))["step"] == 40
    assert sorted(int(p.name[5:13]) for p in (tmp_path / "run" / "diverged").glob("ckpt_*.pt")) == newer
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 41))  # the abandoned steps are gone from the log


# ---------------------------------------------------------------- 5. stop like a cluster job

@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=200, pretrain_steps=200)
    raw["data"]["num_workers"] = 2
    raw["run"]["checkpoint_period"] = 1000
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "acrst_fast.train", str(cfg)], cwd=REPO, env=cpu_env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and its DataLoader workers, as a scheduler's cancel does
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert len(found) == 1 and 3 <= found[0][0] < 200 and "continue with --resume" in err
    logged = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines() if json.loads(ln)["kind"] == "train"]
    assert logged == list(range(1, found[0][0] + 1))  # every step up to the stop checkpoint, nothing lost
