"""Faults of output folders: the engine never deletes or overwrites what it did not create, refuses run
folders that are not its own, survives run-folder faults and says where a failed save went wrong."""
import json
import os
import re

import pytest
import torch

from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.safe_io import OutputError, atomic_write
from conftest import REPO, tiny_config_dict, write_config
from faults_helpers import _assert_one_line_error, _cli, _train, _tree, _user_folder


# ---------------------------------------------------------------- 1. never delete what it did not create

def test_demo_section_never_deletes_a_users_folder(tmp_path, cpu_env):
    """The issue's repro: a copy of demo.yaml pointed at the user's folder, data.demo left in."""
    user = _user_folder(tmp_path / "my data")
    before = _tree(user)
    proc = _cli("acrst_fast.train", str(REPO / "configs" / "demo.yaml"), f"data.train_json={user}/labeled.json",
                f"data.train_images={user}", f"run.output_dir={tmp_path / 'run'}", env=cpu_env)
    _assert_one_line_error(proc, str(user), "not written by the demo generator", "left untouched")
    assert _tree(user) == before  # byte-identical
    assert sorted(os.listdir(tmp_path)) == ["my data", "run"]  # no temporary folders left beside it


def test_demo_generator_rewrites_only_its_own_folder(tmp_path):
    from acrst_fast.config import DemoDataConfig
    from acrst_fast.data.coco import DataError
    from acrst_fast.data.demo import generate

    small = DemoDataConfig(num_labeled=2, num_unlabeled=1, num_val=1, image_size=48, num_classes=2)
    root = generate(tmp_path / "demo", small)
    generate(root, DemoDataConfig(num_labeled=3, num_unlabeled=1, num_val=1, image_size=48, num_classes=2))
    assert sorted(os.listdir(root / "labeled")) == ["000000.jpg", "000001.jpg", "000002.jpg"]  # regenerated
    (root / "labeled" / "mine.txt").write_text("added by the user")
    before = _tree(root)
    with pytest.raises(DataError, match="labeled/mine.txt"):
        generate(root, small)
    assert _tree(root) == before
    (tmp_path / "empty").mkdir()
    assert (generate(tmp_path / "empty", small) / "DONE").is_file()  # an empty folder is fine


def test_run_folder_with_foreign_files_or_naming_a_file_is_refused(tmp_path, tiny_demo, cpu_env):
    user = _user_folder(tmp_path / "papers")
    before = _tree(user)
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, user))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), env=cpu_env), str(user), "notes.txt")
    assert _tree(user) == before
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path / "c2.yaml", tiny_config_dict(tiny_demo, tmp_path / "afile"))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), env=cpu_env), "afile", "names a file")


def test_report_replaces_only_its_own_figures(tmp_path):
    from acrst_fast.report import write_report

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "my_plot.png").write_bytes(b"mine")
    (run / "report" / "losses.png").write_bytes(b"old figure")
    write_report(run)
    assert (run / "report" / "my_plot.png").read_bytes() == b"mine"
    assert not (run / "report" / "losses.png").exists()  # no training records: the stale figure is gone


def test_tools_never_overwrite_an_existing_output(tmp_path, tiny_demo):
    out = tmp_path / "mine.json"
    out.write_text("precious")
    _assert_one_line_error(_cli("acrst_fast.data.splits", "additional", str(tiny_demo / "val"), "--out", str(out)),
                           str(out), "never overwritten")
    voc = tmp_path / "voc"
    (voc / "VOC2007" / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").write_text("")
    _assert_one_line_error(_cli("acrst_fast.data.voc", str(voc), "--year", "2007", "--split", "trainval",
                                "--out", str(out)), str(out))
    assert out.read_text() == "precious"
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    from acrst_fast.data.splits import standard_split_paths
    lab, _ = standard_split_paths(tiny_demo / "labeled.json", 50, 1, split_dir, "generator")
    lab.write_text("not this split")
    _assert_one_line_error(_cli("acrst_fast.data.splits", "standard", str(tiny_demo / "labeled.json"),
                                "--percent", "50", "--folds", "generator", "--out", str(split_dir)), str(lab),
                           "other content")
    assert lab.read_text() == "not this split"


def test_checkpoint_writer_refuses_nothing_but_cleans_up(tmp_path):
    """atomic_write: a failed write (here: disk full) leaves the old file intact, no temporary file, and
    names the path and the free space."""
    target = tmp_path / "ckpt_00000002.pt"
    ckpt.atomic_save({"step": 2}, target)

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 64:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    with pytest.raises(OutputError, match=r"ckpt_00000002\.pt: cannot write \(No space left on device\); .* free"):
        atomic_write(target, lambda f: torch.save({"step": 3, "w": torch.zeros(1000)}, FullDisk(f)))
    assert ckpt.load(target)["step"] == 2
    assert os.listdir(tmp_path) == [target.name]


# ---------------------------------------------------------------- 3. run folder faults

@pytest.mark.slow
def test_run_folder_faults(tmp_path, tiny_demo, cpu_env):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=4)
    cfg = write_config(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    # a run that failed before its first checkpoint leaves a log; the rerun starts a clean one
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    proc = _train(cfg, env=cpu_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    # --resume after a model change: one line naming the differing keys
    proc = _train(cfg, "--resume", "model.fpn_channels=8", "solver.total_steps=6", env=cpu_env)
    _assert_one_line_error(proc, "model.fpn_channels (16 in the checkpoint, 8 now)")
    # an unreadable newest checkpoint: fall back to the previous one, with a warning
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    proc = _train(cfg, "--resume", "solver.total_steps=6", "solver.pretrain_steps=6", env=cpu_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"warning: .*ckpt_00000004\.pt: cannot read checkpoint.*falling back to ckpt_00000002\.pt",
                     proc.stdout + proc.stderr)
    assert "[resume]" in proc.stdout and "(step 2)" in proc.stdout
    assert ckpt.load(ckpt.latest_checkpoint(run))["step"] == 6


@pytest.mark.slow
def test_failed_save_names_path_and_free_space(tmp_path, tiny_demo, cpu_env):
    """A checkpoint that cannot be written (the run folder made read-only mid-run is not possible as
    root, so torch.save is made to fail like a full disk) stops with one line; the previous checkpoint
    stays and no temporary file is left."""
    raw = tiny_config_dict(tiny_demo, tmp_path / "run", total_steps=4, pretrain_steps=4)
    cfg = write_config(tmp_path / "c.yaml", raw)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import torch, errno\n"
        "_save = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 4:\n"
        "        raise RuntimeError('[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing '\n"
        "                           'file data/0: file write failed') from OSError(errno.ENOSPC, 'No space left')\n"
        "    return _save(obj, f, *a, **k)\n"
        "torch.save = save\n")
    env = dict(cpu_env, PYTHONPATH=f"{shim}{os.pathsep}{cpu_env.get('PYTHONPATH', '')}")
    proc = _train(cfg, env=env)
    _assert_one_line_error(proc, "ckpt_00000004.pt: cannot write (No space left on device)", "free on its filesystem")
    assert [p.name for p in sorted((tmp_path / "run").glob("*.pt"))] == ["ckpt_00000002.pt"]
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]
