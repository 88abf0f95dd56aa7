"""The run report: figures and summary from a real short run, a copied folder, partial logs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from acrst_fast.report import main as report_main
from acrst_fast.report import write_report
from conftest import REPO, tiny_config_dict, write_config

FIGURES = ["losses.png", "map.png", "class_distribution.png", "pseudo_recall.png", "pseudo_quality.png",
           "per_class_ap.png", "paste_grid.png"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_demo):
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    shutil.copytree(tiny_demo, data)
    raw = tiny_config_dict(data, root / "run", total_steps=6, pretrain_steps=2)
    raw["eval"]["period"] = 3
    raw["run"]["log_period"] = 2
    raw["mean_teacher"]["tau_cls"] = 0.0
    raw["acrst"] = {"fbr": True, "n_range": [1, 3], "capacity_per_class": 8, "crop_size": 16, "pr_window": 4}
    cfg = write_config(root / "c.yaml", raw)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {root / 'run' / 'report' / 'report.md'}" in proc.stdout  # the CLI says where it is
    return root


def _assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000, f"{path.name} is suspiciously small"
    with Image.open(path) as im:
        assert im.width > 300 and im.height > 200


def test_report_from_a_run(finished_run):
    run = finished_run / "run"
    report = write_report(run)  # refreshing works too
    for name in FIGURES:
        _assert_png(run / "report" / name)
    text = report.read_text()
    evals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert {(e["step"], e["model"]) for e in evals} >= {(2, "student"), (6, "teacher")}
    for e in evals:  # every evaluation is listed with its numbers
        assert f"| {e['step']} | {e['model']} | {e['stage']} | {e['AP']:.2f} | {e['AP50']:.2f} |" in text
    assert "## Per-class AP (teacher, step 6)" in text
    stats = json.loads((run / "dataset_stats.json").read_text())
    for name, count in zip(stats["classes"], stats["labeled_class_counts"]):
        assert f"| {name} | {count} |" in text
    assert "## Notes" not in text  # nothing missing
    assert "## Pseudo-labels per class" in text


def test_logged_sampling_is_what_the_planner_draws_from(finished_run):
    """The log holds, per class, the distribution the planner samples from (raw mu beside it): zero for a
    class with no crop in the banks, renormalised over the rest; and per-class pseudo-label counts."""
    run = finished_run / "run"
    stats = json.loads((run / "dataset_stats.json").read_text())
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"acrst/mu_sampled/' in ln]
    assert recs
    for r in recs:
        sampled = [r[f"acrst/mu_sampled/{c}"] for c in stats["classes"]]
        banked = [r[f"acrst/bank_labeled/{c}"] + r[f"acrst/bank_pseudo/{c}"] for c in stats["classes"]]
        assert all(s == 0 for s, b in zip(sampled, banked) if b == 0)
        assert abs(sum(sampled) - 1) < 1e-9 or sum(banked) == 0
        assert all(f"acrst/mu/{c}" in r for c in stats["classes"])
    mutual = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"pseudo/tp"' in ln]
    for r in mutual:  # per-class counts add up to the pooled ones
        assert abs(sum(r[f"pseudo/num_pseudo/{c}"] for c in stats["classes"]) - r["pseudo/num_pseudo"]) < 1e-6
        assert abs(sum(r[f"pseudo/tp/{c}"] for c in stats["classes"]) - r["pseudo/tp"]) < 1e-6


def test_report_of_a_copied_run_without_dataset(finished_run, tmp_path):
    copy = tmp_path / "copied_run"
    shutil.copytree(finished_run / "run", copy)
    shutil.rmtree(copy / "report")
    moved = finished_run / "data_moved"
    (finished_run / "data").rename(moved)  # the dataset is not on this "machine"
    try:
        text = write_report(copy).read_text()
    finally:
        moved.rename(finished_run / "data")
    for name in FIGURES[:-1]:
        _assert_png(copy / "report" / name)
    assert not (copy / "report" / "paste_grid.png").exists()
    assert "paste_grid.png: the dataset is not available here" in text


def test_report_of_partial_logs(finished_run, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(finished_run / "run", run)
    (run / "final_metrics.json").unlink()
    log = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(log[: len(log) - 40])  # cut in the middle of the last record
    text = write_report(run).read_text()
    assert "1 unreadable line(s) skipped" in text and "the run has not finished" in text
    _assert_png(run / "report" / "losses.png")


def test_report_of_empty_or_missing_folder(tmp_path, capsys):
    text = write_report(tmp_path).read_text()
    assert "metrics.jsonl not found" in text and "losses.png: no training records yet" in text
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
