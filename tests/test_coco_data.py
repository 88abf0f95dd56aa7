"""COCO reading: valid inputs load as users expect, bad inputs are rejected naming file and record."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from acrst_fast.data.coco import DataError, decode_image, load_coco_records, load_folder_records
from conftest import REPO, TINY_COCO, tiny_config_dict, write_config


def _dataset(tmp_path, anns, n_images=2, categories=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(img_dir / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30})
    cats = categories or [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, img_dir


def test_valid_records_sparse_ids_crowd_clip_and_empty(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # sticks out
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: not a target
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [4, 4, 0, 3], "iscrowd": 0},  # zero width
    ]
    path, img_dir = _dataset(tmp_path, anns)
    records, cats = load_coco_records(path, img_dir)
    assert cats.ids == (3, 7) and cats.names == ("a", "b")
    r1, r2 = records
    np.testing.assert_allclose(r1.boxes, [[1, 2, 11, 7], [30, 20, 40, 30]])
    assert r1.labels.tolist() == [2, 1]  # category 7 -> label 2, 3 -> 1
    assert r2.boxes.shape == (0, 4) and r2.labels.shape == (0,)  # image without boxes is valid


def test_empty_annotation_list_is_valid(tmp_path):
    path, img_dir = _dataset(tmp_path, [])
    records, _ = load_coco_records(path, img_dir)
    assert len(records) == 2 and all(len(r.boxes) == 0 for r in records)


@pytest.mark.parametrize("ann,pattern", [
    ({"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, -4, 5]}, r"annotation id 11: bbox has negative width"),
    ({"id": 12, "image_id": 1, "category_id": 99, "bbox": [0, 0, 4, 5]}, r"annotation id 12: category_id 99 is not in"),
    ({"id": 13, "image_id": 42, "category_id": 3, "bbox": [0, 0, 4, 5]}, r"annotation id 13: image_id 42 is not in"),
    ({"id": 14, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4]}, r"annotation id 14: bbox must be"),
    ({"id": 15, "image_id": 1, "category_id": 3, "bbox": [0, float("nan"), 4, 4]}, r"annotation id 15: bbox has a non-finite"),
])
def test_bad_annotations_name_file_and_record(tmp_path, ann, pattern):
    path, img_dir = _dataset(tmp_path, [ann])
    with pytest.raises(DataError, match=pattern) as e:
        load_coco_records(path, img_dir)
    assert str(path) in str(e.value)


def test_missing_image_file(tmp_path):
    path, img_dir = _dataset(tmp_path, [])
    (img_dir / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"image id 2: image file not found: .*2\.jpg"):
        load_coco_records(path, img_dir)


def test_invalid_json_and_missing_sections(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco_records(bad, tmp_path)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no 'categories'"):
        load_coco_records(bad, tmp_path)
    with pytest.raises(DataError, match="annotation file not found"):
        load_coco_records(tmp_path / "none.json", tmp_path)


def test_truncated_and_corrupt_jpeg(tmp_path):
    path, img_dir = _dataset(tmp_path, [])
    data = (img_dir / "1.jpg").read_bytes()
    (img_dir / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (img_dir / "2.jpg").write_bytes(b"this is not an image")
    records, _ = load_coco_records(path, img_dir)
    for rec in records:
        with pytest.raises(DataError, match=rf"{rec.path} \(image id {rec.image_id}\): cannot decode image"):
            decode_image(rec)


def test_size_mismatch_detected(tmp_path):
    path, img_dir = _dataset(tmp_path, [])
    Image.new("RGB", (50, 50)).save(img_dir / "1.jpg")
    records, _ = load_coco_records(path, img_dir)
    with pytest.raises(DataError, match="image is 50x50 but the json says 40x30"):
        decode_image(records[0])


def test_folder_records(tmp_path):
    (tmp_path / "u").mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / "u" / name).write_bytes(b"x")
    recs = load_folder_records(tmp_path / "u")
    assert [r.path.rsplit("/", 1)[1] for r in recs] == ["a.png", "b.jpg"]
    with pytest.raises(DataError, match="no image files"):
        (tmp_path / "e").mkdir()
        load_folder_records(tmp_path / "e")


def test_real_tiny_coco_photos():
    """Real COCO: sparse category ids, crowd boxes, grayscale photos, real sizes."""
    assert TINY_COCO.is_dir(), f"shipped data missing: {TINY_COCO}"
    records, cats = load_coco_records(TINY_COCO / "annotations/instances_val2017.json", TINY_COCO / "val2017")
    assert len(records) == 17 and cats.num_classes == 80 and cats.ids[-1] == 90
    n_boxes = sum(len(r.boxes) for r in records)
    assert n_boxes > 80
    for r in records:
        assert (r.labels >= 1).all() and (r.labels <= 80).all()
        assert (r.boxes[:, 2] > r.boxes[:, 0]).all() and (r.boxes[:, 2] <= r.width).all()
        img = decode_image(r)
        assert img.dtype == torch.uint8 and img.shape == (3, r.height, r.width)


def test_cli_reports_corrupt_image_cleanly(tmp_path, tiny_demo, cpu_env):
    """A corrupt JPEG met during training ends the run with a one-line error naming it, not a traceback."""
    data = tmp_path / "demo"
    shutil.copytree(tiny_demo, data)
    victim = sorted((data / "labeled").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(data, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg), "solver.total_steps=8",
                           "solver.pretrain_steps=8"], capture_output=True, text=True, env=cpu_env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: {victim}" in proc.stderr and "not a readable image" in proc.stderr  # the start-up header check


def test_cli_reports_bad_annotation_and_config_cleanly(tmp_path, tiny_demo, cpu_env):
    data = tmp_path / "demo"
    shutil.copytree(tiny_demo, data)
    lab = json.loads((data / "labeled.json").read_text())
    lab["annotations"][0]["bbox"][2] = -3
    (data / "labeled.json").write_text(json.dumps(lab))
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(data, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg)], capture_output=True, text=True,
                          env=cpu_env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"annotation id {lab['annotations'][0]['id']}: bbox has negative width" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg), "solver.lrr=1"],
                          capture_output=True, text=True, env=cpu_env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "unknown key 'solver.lrr'" in proc.stderr and str(cfg) in proc.stderr
