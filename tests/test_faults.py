"""Faults and misuse: the engine never deletes what it did not create, checks every config value
up front, survives run-folder faults, recovers from divergence, stops like a cluster job, decodes
16-bit images, finds bad images before training, and every tool says what went wrong in one line."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acrst_fast import train
from acrst_fast.config import ConfigError, load_config
from acrst_fast.data.coco import ImageRecord, decode_image
from acrst_fast.engine import checkpoint as ckpt
from acrst_fast.safe_io import OutputError, atomic_write
from conftest import REPO, tiny_config_dict, write_config


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "labeled.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "photo.jpg")
    return root


def _cli(module: str, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


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


# ---------------------------------------------------------------- 2. every config value, before anything starts

@pytest.mark.parametrize("override, key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("run.log_period=0", "run.log_period"),
    ("solver.momentum=-0.5", "solver.momentum"),
    ("model.trainable_backbone_layers=9", "model.trainable_backbone_layers"),
    ("augment.jitter=[0.4,0.4,0.4,0.8]", "augment.jitter (hue)"),
    ("augment.flip_prob=1.5", "augment.flip_prob"),
    ("acrst.pr_threshold=2", "acrst.pr_threshold"),
    ("ssmll.lr=0", "ssmll.lr"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"),
    ("eval.period=-5", "eval.period"),
])
def test_out_of_range_values_name_key_file_and_range(tmp_path, tiny_demo, override, key):
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, [override])
    msg = str(info.value)
    assert str(cfg) in msg and f"'{key}'" in msg and "must be" in msg and "\n" not in msg


def test_numbers_as_people_write_them(tmp_path, tiny_demo):
    raw = tiny_config_dict(tiny_demo, tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(write_config(tmp_path / "base.yaml", raw).read_text().replace("lr: 0.01", "lr: 1e-3"))
    assert load_config(path).solver.lr == pytest.approx(1e-3)
    assert load_config(path, ["solver.weight_decay=1E-4", "solver.total_steps=6"]).solver.weight_decay == 1e-4
    assert load_config(path, ["solver.divergence_factor=1E+6"]).solver.divergence_factor == 1e6


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path, cpu_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  lr: [0.01\n  momentum: 0.9\n")
    _assert_one_line_error(_cli("acrst_fast.train", str(bad), env=cpu_env), f"{bad}:", "not valid YAML")


def test_cuda_device_without_gpu_is_one_line(tmp_path, tiny_demo, cpu_env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run.device=cuda is valid here")
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), "run.device=cuda", env=cpu_env), "'run.device'",
                           "no CUDA device")


def test_ssmll_checkpoint_that_is_not_one(tmp_path, tiny_demo, cpu_env):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    _assert_one_line_error(_cli("acrst_fast.train", str(cfg), "ssmll.filter=two_stage", f"ssmll.checkpoint={junk}",
                                env=cpu_env), str(junk), "not an SSMLL classifier")


# ---------------------------------------------------------------- 3. run folder faults

def _train(cfg: Path, *extra: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return _cli("acrst_fast.train", str(cfg), *extra, env=env, timeout=timeout)


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


# ---------------------------------------------------------------- 6. images decode to what they show

def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    ramp = (np.arange(64 * 256, dtype=np.int64).reshape(64, 256) * 4).clip(0, 65535).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    img = decode_image(ImageRecord(1, str(path), 256, 64, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    expect = torch.from_numpy(((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert img.shape == (3, 64, 256) and torch.equal(img[0], expect) and torch.equal(img[1], img[2])
    assert 0 == int(img.min()) and int(img.max()) == 255 and len(img.unique()) > 200  # a gradient, not a blank


def test_16_bit_png_same_in_dali(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    ramp = (np.arange(64 * 256, dtype=np.int64).reshape(64, 256) * 4).clip(0, 65535).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(source=lambda: [np.fromfile(path, dtype=np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    dali = torch.from_numpy(pipe.run()[0].as_array()[0]).permute(2, 0, 1)
    ours = decode_image(ImageRecord(1, str(path), 256, 64, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    assert torch.equal(dali, ours)


# ---------------------------------------------------------------- 7. bad images before step 1

def _break_images(demo: Path, broken: Path) -> list[str]:
    """Copy of the tiny demo with a truncated labeled image and a mis-sized unlabeled one."""
    import shutil
    shutil.copytree(demo, broken)
    a = broken / "labeled" / "000001.jpg"
    a.write_bytes(a.read_bytes()[:20])
    b = broken / "unlabeled" / "000002.jpg"
    Image.new("RGB", (33, 17)).save(b)
    return [str(a), str(b)]


def test_bad_images_stop_the_run_before_training(tmp_path, tiny_demo, cpu_env):
    bad = _break_images(tiny_demo, tmp_path / "broken")
    raw = tiny_config_dict(tmp_path / "broken", tmp_path / "run")
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = _train(cfg, env=cpu_env)
    _assert_one_line_error(proc, bad[0], "python -m acrst_fast.data.check")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # not one step trained
    check = _cli("acrst_fast.data.check", str(cfg), env=cpu_env)
    assert check.returncode == 2
    assert bad[0] in check.stderr and bad[1] in check.stderr and "json says" in check.stderr
    assert "with problems" in check.stdout and "Traceback" not in check.stderr


def test_bad_images_skip_drops_them_up_front(tmp_path, tiny_demo, cpu_env):
    bad = _break_images(tiny_demo, tmp_path / "broken")
    raw = tiny_config_dict(tmp_path / "broken", tmp_path / "run", total_steps=2, pretrain_steps=1)
    raw["data"]["bad_images"] = "skip"
    proc = _train(write_config(tmp_path / "c.yaml", raw), env=cpu_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 images dropped before training" in proc.stderr and bad[0] in proc.stderr


def test_data_check_passes_clean_data(tmp_path, tiny_demo, cpu_env):
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tiny_demo, tmp_path / "run"))
    proc = _cli("acrst_fast.data.check", str(cfg), env=cpu_env)
    assert proc.returncode == 0 and "0 with problems" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------- 8. every tool: stderr, one line, exit 2

@pytest.mark.parametrize("module, args, needle", [
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "150", "--out", "{tmp}/s"],
     "--percent must be in (0, 100]"),
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "10", "--fold", "-1", "--out",
                                "{tmp}/s"], "--fold must be >= 0"),
    ("acrst_fast.data.splits", ["standard", "{demo}/labeled.json", "--percent", "1", "--out", "{tmp}/s"],
     "fold file was made for another annotation file"),
    ("acrst_fast.data.splits", ["additional", "{tmp}/empty", "--out", "{tmp}/u.json"], "no image files"),
    ("acrst_fast.data.voc", ["{tmp}/novoc", "--year", "2007", "--split", "trainval", "--out", "{tmp}/v.json"],
     "image list not found"),
    ("acrst_fast.report", ["{tmp}/no_run"], "run folder not found"),
    ("acrst_fast.train_ssmll", ["{tmp}/missing.yaml"], "config file not found"),
    ("acrst_fast.data.check", ["{tmp}/missing.yaml"], "config file not found"),
    ("acrst_fast.data.demo", ["{tmp}/userdir"], "not written by the demo generator"),
])
def test_tools_report_errors_in_one_line(tmp_path, tiny_demo, cpu_env, module, args, needle):
    (tmp_path / "empty").mkdir()
    _user_folder(tmp_path / "userdir")
    args = [a.format(demo=tiny_demo, tmp=tmp_path) for a in args]
    proc = _cli(module, *args, env=cpu_env)
    _assert_one_line_error(proc, needle)
    assert not (tmp_path / "u.json").exists()  # an empty folder writes no empty json
