"""Training: a step lowers the loss, mutual learning trains on pseudo-labels, resume is exact, torchrun works."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets
from acrst_fast.data.loader import TorchDataStage
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.engine.resume import rank_state_of
from acrst_fast.engine.mean_teacher import MeanTeacher, StudentLosses
from acrst_fast.models.detector import build_detector
from conftest import REPO, run_group, tiny_config_dict, write_config


ACRST_ON = {"fbr": True, "selective_supervision": True, "n_range": [1, 4], "capacity_per_class": 8,
            "crop_size": 16, "pr_window": 5}


def _runner(tmp_path, tiny_demo, **overrides):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", **overrides.pop("solver", {}))
    raw["augment"].update({"scales": [96], "flip_prob": 0.0, "jitter_prob": 0.0, "grayscale_prob": 0.0,
                           "blur_prob": 0.0, "cutout": []})
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    data = load_datasets(cfg.data)
    torch.manual_seed(0)
    student = build_detector(cfg.model, data.categories.num_classes)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    stage = TorchDataStage(data.labeled[:2], data.unlabeled[:2], data.val, cfg.augment, 2, 2, seed=0, rank=0,
                           world=1, num_workers=0)
    return MeanTeacher(cfg, student, StudentLosses(student), opt, stage, torch.device("cpu"))


def test_training_steps_lower_loss(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, solver={"total_steps": 30, "pretrain_steps": 30})
    runner.start(0)
    losses = [runner.run_step(s).total for s in range(25)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses


def test_mutual_learning_step(tmp_path, tiny_demo):
    runner = _runner(tmp_path, tiny_demo, solver={"total_steps": 4, "pretrain_steps": 1})
    runner.cfg = runner.cfg.__class__(**{**runner.cfg.__dict__,
                                         "mean_teacher": runner.cfg.mean_teacher.__class__(tau_cls=0.0, ema_decay=0.5)})
    runner.ema.decay = 0.5  # the teacher object holds its decay
    runner.start(0)
    assert runner.run_step(0).phase == "pretrain"
    out = runner.run_step(1)  # teacher initialised from the student here
    assert out.phase == "mutual" and set(out.unsup) == {"loss_objectness", "loss_classifier"}
    assert out.pseudo_per_image > 0 and out.images == 4
    before = [p.clone() for p in runner.teacher.parameters()]
    runner.update_teacher()
    s, t = dict(runner.student.named_parameters()), dict(runner.teacher.named_parameters())
    name = "roi_heads.box_predictor.cls_score.weight"
    torch.testing.assert_close(t[name], 0.5 * before[list(t).index(name)] + 0.5 * s[name])
    assert not any(p.requires_grad for p in runner.teacher.parameters())


def _train_cmd(cfg_path, *extra):
    return [sys.executable, "-m", "acrst_fast.train", str(cfg_path), *extra]


def _final_state(run_dir: Path) -> dict:
    return ckpt.load(ckpt.latest_checkpoint(run_dir))


def _assert_same_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    a, b = a["runner"], b["runner"]
    for part in ("student", "teacher"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


KILL_SHIM = """
import os, signal
from pathlib import Path
point, _, step = os.environ.get("ACRST_TEST_KILL", "").partition(":")
if point:
    step = int(step)
    from acrst_fast.engine import checkpoint, hooks
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "after_log":  # the log line of `step` is on disk, its checkpoint is not
        write = hooks.MetricsWriter.write
        def logged(self, record, scalars):
            write(self, record, scalars)
            if record.get("kind") == "train" and record["step"] == step:
                die()
        hooks.MetricsWriter.write = logged
    else:
        atomic_write = checkpoint.atomic_write
        def saved(path, fn):
            name = Path(path).name
            if name == f"ckpt_{step:08d}.pt" and point == "mid_checkpoint":  # half a temporary file
                Path(path).with_name(f".{name}.tmp{os.getpid()}").write_bytes(b"partial")
                die()
            out = atomic_write(path, fn)
            if name == f"ckpt_{step:08d}.pt" and point == "after_checkpoint":  # renamed, nothing after
                die()
            return out
        checkpoint.atomic_write = saved
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_demo):
    """A 10-step run (pre-training 4, checkpoints every 2) never interrupted: the reference."""
    root = tmp_path_factory.mktemp("reference")
    raw = tiny_config_dict(tiny_demo, root / "run", total_steps=10, pretrain_steps=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    subprocess.run(_train_cmd(write_config(root / "c.yaml", raw)), check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=600)
    return raw, _final_state(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_log", "mid_checkpoint", "after_checkpoint"])
def test_killed_run_resumes_to_identical_weights(tmp_path, uninterrupted, cpu_env, point):
    """Log and checkpoints are one transaction: a SIGKILL at a chosen point around step 6's log line and
    checkpoint, then --resume, gives one log with every step exactly once and bit-identical weights."""
    raw, reference = uninterrupted
    assert reference["step"] == 10
    raw = {**raw, "run": {**raw["run"], "output_dir": str(tmp_path / "killed")}}
    cfg = write_config(tmp_path / "killed.yaml", raw)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM)
    env = dict(cpu_env, ACRST_TEST_KILL=f"{point}:6", PYTHONPATH=f"{shim}{os.pathsep}{cpu_env.get('PYTHONPATH', '')}")
    killed = subprocess.run(_train_cmd(cfg), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed")]
    assert steps == ([2, 4, 6] if point == "after_checkpoint" else [2, 4])
    for step, path in ckpt.list_checkpoints(tmp_path / "killed"):  # no partial file under a checkpoint's name
        assert ckpt.load(path)["step"] == step
    again = subprocess.run(_train_cmd(cfg), env=cpu_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites a run by accident
    resumed = subprocess.run(_train_cmd(cfg, "--resume"), env=cpu_env, cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_state(_final_state(tmp_path / "killed"), reference)
    records = [json.loads(ln) for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))  # each step exactly once
    assert not [p for p in (tmp_path / "killed").iterdir() if ".tmp" in p.name]  # the partial file is gone


@pytest.mark.slow
def test_sigterm_checkpoints_then_resumes(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "a", total_steps=8, pretrain_steps=3)
    raw["run"]["checkpoint_period"] = 100  # only the final checkpoint and the one the signal writes
    cfg_a = write_config(tmp_path / "a.yaml", raw)
    subprocess.run(_train_cmd(cfg_a), check=True, env=cpu_env, cwd=REPO, capture_output=True, timeout=600)
    raw["run"]["output_dir"] = str(tmp_path / "b")
    cfg_b = write_config(tmp_path / "b.yaml", raw)
    proc = subprocess.Popen(_train_cmd(cfg_b), env=cpu_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    stopped = ckpt.list_checkpoints(tmp_path / "b")
    assert len(stopped) == 1 and 2 <= stopped[0][0] < 8 and "continue with --resume" in err
    subprocess.run(_train_cmd(cfg_b, "--resume"), check=True, env=cpu_env, cwd=REPO, capture_output=True, timeout=600)
    _assert_same_state(_final_state(tmp_path / "b"), _final_state(tmp_path / "a"))


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "ddp", total_steps=4, pretrain_steps=2)
    raw["eval"]["period"] = 2
    raw["acrst"] = ACRST_ON  # with ACRST: PR is all-reduced, each rank checkpoints its own CropBank
    raw["mean_teacher"]["tau_cls"] = 0.0
    cfg = write_config(tmp_path / "ddp.yaml", raw)
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "acrst_fast.train", str(cfg)], env=cpu_env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    run = tmp_path / "ddp"
    summary = json.loads((run / "final_metrics.json").read_text())
    assert summary["supervised"]["step"] == 2 and summary["teacher"]["step"] == 4
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # written once, by rank 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert {(r["step"], r["model"]) for r in evals} == {(2, "student"), (4, "teacher"), (4, "student")}
    state = _final_state(run)
    assert len(state["rng"]) == 2  # both ranks' RNG states saved
    assert not any(k.startswith("module.") for k in state["runner"]["student"])  # saved unwrapped
    parts = [rank_state_of(run, 4, r)["acrst"] for r in (0, 1)]
    assert torch.equal(parts[0]["recall"]["history"], parts[1]["recall"]["history"])  # same mu on every rank
    assert parts[0]["recall"]["history"].sum() > 0
    assert not torch.equal(parts[0]["bank"]["pixels"], parts[1]["bank"]["pixels"])  # banks of different shards



@pytest.mark.slow
def test_acrst_run_resumes_to_identical_weights_and_bank(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "full", total_steps=8, pretrain_steps=3)
    raw["acrst"] = ACRST_ON
    raw["mean_teacher"]["tau_cls"] = 0.0  # pseudo-labels from a barely trained teacher: exercise the Pseudo bank
    full = write_config(tmp_path / "full.yaml", raw)
    subprocess.run(_train_cmd(full), check=True, env=cpu_env, cwd=REPO, capture_output=True, timeout=600)
    raw["run"]["output_dir"] = str(tmp_path / "split")
    raw["solver"]["total_steps"] = 5  # stop after step 5 (a checkpoint), then continue to 8
    first = write_config(tmp_path / "first.yaml", raw)
    subprocess.run(_train_cmd(first), check=True, env=cpu_env, cwd=REPO, capture_output=True, timeout=600)
    raw["solver"]["total_steps"] = 8
    second = write_config(tmp_path / "second.yaml", raw)
    proc = subprocess.run(_train_cmd(second, "--resume"), env=cpu_env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_state(_final_state(tmp_path / "split"), _final_state(tmp_path / "full"))
    a = rank_state_of(tmp_path / "full", 8, 0)["acrst"]
    b = rank_state_of(tmp_path / "split", 8, 0)["acrst"]
    assert torch.equal(a["bank"]["pixels"], b["bank"]["pixels"]) and torch.equal(a["bank"]["seen"], b["bank"]["seen"])
    assert torch.equal(a["recall"]["history"], b["recall"]["history"])
    assert a["bank"]["seen"][1].sum() > 0  # pseudo-labels reached the Pseudo bank
    records = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["acrst/pasted_per_image_labeled"] >= 1 and "acrst/mu/circle" in last
    assert "unsup/loss_box_reg" in last  # selective supervision adds the regression terms
    burn_in = [r for r in records if r["kind"] == "train" and r["phase"] == "pretrain"]
    assert len(burn_in) == 3 and not any("acrst/pasted_per_image_labeled" in r for r in burn_in)  # FBR waits
    assert a["bank"]["seen"][0].sum() > 0  # while the Labeled bank fills during burn-in


def test_paste_during_pretrain_switch(tmp_path, tiny_demo):
    """Burn-in is burn-in: by default nothing is pasted before mutual learning; the switch brings it back."""
    from acrst_fast.dist import DistInfo
    from acrst_fast.engine.build import build_runner

    for during, expect in ((False, 0.0), (True, None)):
        raw = tiny_config_dict(tiny_demo, tmp_path / str(during), total_steps=4, pretrain_steps=3)
        raw["acrst"] = {**ACRST_ON, "paste_during_pretrain": during}
        cfg = load_config(write_config(tmp_path / f"{during}.yaml", raw))
        runner, _ = build_runner(cfg, load_datasets(cfg.data), DistInfo(0, 1, 0, torch.device("cpu")), "test")
        runner.start(0)
        out = runner.run_step(0)
        pasted = out.extras.get("acrst/pasted_per_image_labeled", 0.0)
        assert pasted == expect if expect is not None else pasted >= 1


def test_match_counts_per_class():
    """Class-aware one-to-one matching at IoU 0.5, by decreasing score, counted per class."""
    from acrst_fast.evaluation.pseudo_quality import match_counts

    box = torch.tensor([[0.0, 0, 10, 10]])
    pseudo = [{"boxes": torch.cat([box, box, box + 50]), "labels": torch.tensor([1, 1, 3]),
               "scores": torch.tensor([0.5, 0.9, 0.8])},
              {"boxes": box, "labels": torch.tensor([2]), "scores": torch.tensor([0.7])}]
    gt_boxes = [torch.cat([box, box + 50]), box]
    gt_labels = [torch.tensor([1, 2]), torch.tensor([3])]  # image 1's class-2 guess meets a class-3 truth
    tp, n_pl, n_gt = match_counts(pseudo, gt_boxes, gt_labels, num_classes=3)
    assert tp.tolist() == [1, 0, 0]  # the second class-1 box is a duplicate; class 3 is at the class-2 truth
    assert n_pl.tolist() == [2, 1, 1] and n_gt.tolist() == [1, 1, 1]
