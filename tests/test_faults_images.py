"""Images: 16-bit PNGs decode to what they show (torch and DALI), and bad images are found before step 1."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acrst_fast.data.coco import ImageRecord, decode_image
from conftest import tiny_config_dict, write_config
from faults_helpers import _assert_one_line_error, _cli, _train


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


def test_bad_images_stop_the_ssmll_stage_before_training(tmp_path, tiny_demo, cpu_env):
    """The SSMLL stage checks every image header at start-up as the detector does: one line, no step trained."""
    bad = _break_images(tiny_demo, tmp_path / "broken")
    raw = tiny_config_dict(tmp_path / "broken", tmp_path / "run")
    raw["ssmll"] = {"backbone": "resnet18", "input_size": 64, "dim": 16, "layers": 1, "heads": 2, "total_steps": 4,
                    "pretrain_steps": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_period": 0}
    proc = _cli("acrst_fast.train_ssmll", str(write_config(tmp_path / "c.yaml", raw)), env=cpu_env)
    _assert_one_line_error(proc, bad[0], "python -m acrst_fast.data.check")
    assert not list((tmp_path / "run").rglob("ckpt_*.pt"))
