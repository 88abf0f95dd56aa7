"""Branching: a new run from another run's checkpoint (`train --branch-from`), and `model.weights` from
the engine's own checkpoints."""
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.resume import rank_state_of
from acrst_fast.models.weights import WeightsError, load_state_dict_file
from conftest import REPO, tiny_config_dict, write_config
from test_train import ACRST_ON, KILL_SHIM, _assert_same_state, _final_state, _train_cmd

pytestmark = pytest.mark.slow


def _run(cmd, env, **kw):
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def burn_in(tmp_path_factory, tiny_demo):
    """A 3-step burn-in without ACRST (its last checkpoint, step 3, is the branch point) and one with ACRST
    (a Labeled bank in its rank part)."""
    root = tmp_path_factory.mktemp("burn_in")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    out = {}
    for name, acrst in (("plain", None), ("acrst", ACRST_ON)):
        raw = tiny_config_dict(tiny_demo, root / name, total_steps=3, pretrain_steps=3)
        if acrst:
            raw["acrst"] = acrst
        _run(_train_cmd(write_config(root / f"{name}.yaml", raw)), env)
        out[name] = root / name / "ckpt_00000003.pt"
    return out


def _branch_config(tmp_path, tiny_demo, name, seed, acrst=True, total=6):
    raw = tiny_config_dict(tiny_demo, tmp_path / name, total_steps=total, pretrain_steps=3)
    raw["run"]["seed"] = seed
    raw["mean_teacher"]["tau_cls"] = 0.0  # pseudo-labels from a barely trained teacher: the Pseudo bank fills
    if acrst:
        raw["acrst"] = ACRST_ON
    return write_config(tmp_path / f"{name}.yaml", raw)


def test_branch_same_seed_is_bit_identical_other_seed_differs(tmp_path, tiny_demo, burn_in, cpu_env):
    source = burn_in["acrst"]
    states = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        proc = _run(_train_cmd(_branch_config(tmp_path, tiny_demo, name, seed), "--branch-from", str(source)), cpu_env)
        assert "[branch]" in proc.stdout and "CropBank and Pseudo Recall" in proc.stdout
        states[name] = _final_state(tmp_path / name)
    _assert_same_state(states["a"], states["b"])
    a, c = states["a"]["runner"]["student"], states["c"]["runner"]["student"]
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    # the branch point is recorded: config.yaml, the checkpoints' config and the log
    assert str(source) in (tmp_path / "a" / "config.yaml").read_text()
    assert states["a"]["config"]["run"]["branch_from"] == str(source)
    records = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # the source's, then its own
    assert [(r["step"], r["from"], r["seed"]) for r in records if r["kind"] == "branch"] == [(3, str(source), 5)]
    # the source's Labeled bank came along, and its first pass (4 steps of 2 of the 8 images; 3 done at the
    # branch point) ends as it would have in the source: one more batch offered, not a new pass
    src_bank = rank_state_of(source.parent, 3, 0)["acrst"]["bank"]
    part = rank_state_of(tmp_path / "a", 6, 0)
    bank = part["acrst"]["bank"]
    assert part["bank_fill_start"] == 0 and src_bank["seen"][0].sum() > 0
    assert 0 < (bank["seen"][0] - src_bank["seen"][0]).sum() < src_bank["seen"][0].sum()
    assert bank["seen"][1].sum() > 0  # the Pseudo bank filled during the branch's mutual steps
    # a branch that resumes from its own checkpoints no longer needs its source
    proc = _run(_train_cmd(tmp_path / "a.yaml", "--branch-from", str(tmp_path / "gone.pt"), "--resume"), cpu_env)
    assert "[resume]" in proc.stdout


def test_branch_without_bank_fills_labeled_bank(tmp_path, tiny_demo, burn_in, cpu_env):
    proc = _run(_train_cmd(_branch_config(tmp_path, tiny_demo, "fill", 0), "--branch-from", str(burn_in["plain"])),
                cpu_env)
    assert "the Labeled bank fills during steps 4-" in proc.stdout
    part = rank_state_of(tmp_path / "fill", 6, 0)
    assert part["bank_fill_start"] == 3 and part["acrst"]["bank"]["seen"][0].sum() > 0


def test_supervised_branch_starts_from_trained_student(tmp_path, tiny_demo, burn_in, cpu_env):
    """A branch of a burn-in checkpoint takes its student as the teacher too (the checkpoint's teacher is the
    untrained copy made at construction)."""
    cfg = _branch_config(tmp_path, tiny_demo, "sup", 0, acrst=False, total=4)
    _run(_train_cmd(cfg, "--branch-from", str(burn_in["plain"]), "solver.pretrain_steps=4"), cpu_env)
    source = ckpt.load(burn_in["plain"])["runner"]
    teacher = _final_state(tmp_path / "sup")["runner"]["teacher"]
    assert any(not torch.equal(source["student"][k], source["teacher"][k]) for k in source["student"]
               if source["student"][k].is_floating_point())
    assert all(torch.equal(teacher[k], source["student"][k]) for k in teacher)  # no mutual step: never updated


def test_killed_branch_resumes_with_resume_alone(tmp_path, tiny_demo, burn_in, cpu_env):
    """A branch killed after step 4's log line but before its checkpoint (the folder holds no checkpoint)
    continues with `--resume` alone, from the branch point its config.yaml recorded, to the weights of an
    uninterrupted branch."""
    source = burn_in["acrst"]
    _run(_train_cmd(_branch_config(tmp_path, tiny_demo, "whole", 1), "--branch-from", str(source)), cpu_env)
    cfg = _branch_config(tmp_path, tiny_demo, "killed", 1)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM)
    env = dict(cpu_env, ACRST_TEST_KILL="after_log:4", PYTHONPATH=f"{shim}{os.pathsep}{cpu_env.get('PYTHONPATH', '')}")
    killed = subprocess.run(_train_cmd(cfg, "--branch-from", str(source)), env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert ckpt.list_checkpoints(tmp_path / "killed") == []
    proc = _run(_train_cmd(cfg, "--resume"), cpu_env)
    assert "[branch]" in proc.stdout
    _assert_same_state(_final_state(tmp_path / "killed"), _final_state(tmp_path / "whole"))
    records = [json.loads(ln) for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_branch_refuses_bad_requests(tmp_path, tiny_demo, burn_in, cpu_env):
    cfg = _branch_config(tmp_path, tiny_demo, "bad", 0, total=3)
    proc = subprocess.run(_train_cmd(cfg, "--branch-from", str(burn_in["plain"])), env=cpu_env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "solver.total_steps" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(_train_cmd(cfg, "--branch-from", str(tmp_path / "none.pt")), env=cpu_env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "run.branch_from" in proc.stderr and "none.pt" in proc.stderr


def test_model_weights_from_engine_checkpoints(tmp_path, burn_in):
    """`model.weights` takes any checkpoint the engine writes, loaded with weights_only=True: a burn-in
    checkpoint gives its trained student, a later one its teacher."""
    burn = ckpt.load(burn_in["plain"])
    torch.load(burn_in["plain"], weights_only=True)  # nothing in a checkpoint needs unpickling of objects
    got = load_state_dict_file(burn_in["plain"])
    assert all(torch.equal(got[k], v) for k, v in burn["runner"]["student"].items())
    later = {**burn, "step": 5, "config": {**burn["config"], "solver": {**burn["config"]["solver"],
                                                                         "pretrain_steps": 3}}}
    torch.save(later, tmp_path / "later.pt")
    got = load_state_dict_file(tmp_path / "later.pt")
    assert all(torch.equal(got[k], v) for k, v in burn["runner"]["teacher"].items())


def test_model_weights_refuses_pickled_objects_in_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": subprocess.CompletedProcess(["x"], 0)}, f)
    with pytest.raises(WeightsError) as err:
        load_state_dict_file(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "\x1b" not in msg and "weights_only" in msg


def test_run_started_from_burn_in_weights_begins_from_its_student(tmp_path, tiny_demo, burn_in):
    from acrst_fast.config import load_config
    from acrst_fast.models.detector import build_detector

    raw = tiny_config_dict(tiny_demo, tmp_path / "w")
    raw["model"]["weights"] = str(burn_in["plain"])
    cfg = load_config(write_config(tmp_path / "w.yaml", raw))
    model = build_detector(cfg.model, 4)
    student = ckpt.load(burn_in["plain"])["runner"]["student"]
    assert all(torch.equal(v, student[k]) for k, v in model.state_dict().items())
