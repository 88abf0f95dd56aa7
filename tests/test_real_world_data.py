"""Datasets users actually have: a corpus of broken annotation files (one line naming file and record, never
a traceback), image-only unlabeled jsons, a Roboflow-style export, boxes outside their image, and the image
kinds real photo folders hold (grayscale, CMYK, 16-bit PNG, alpha, EXIF-rotated JPEG)."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from acrst_fast.data.coco import DataError, ImageRecord, decode_image, load_coco_records
from conftest import REPO, tiny_config_dict, write_config


def _valid() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                       {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 12], "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [4, 4, 6, 6]}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}]}


def _set(path: str, value):
    """A corpus case: the valid file with the field at `path` (dots, list indices as digits) set to `value`."""
    def edit(d):
        *parents, last = path.split(".")
        node = d
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return d
    return edit


def _add(section: str, item):
    def edit(d):
        d[section].append(item)
        return d
    return edit


# (case name, edit of the valid dict or raw bytes, expected part of the one-line message)
CORPUS = [
    ("not UTF-8", b'{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}]}', "not UTF-8 text"),
    ("not JSON", b'{"images": [', "not valid JSON"),
    ("top level a list", b"[]", "the top level is a list, not an object"),
    ("images missing", lambda d: {k: v for k, v in d.items() if k != "images"}, "no 'images' list"),
    ("images an object", _set("images", {"1": {}}), "no 'images' list"),
    ("annotations an object", _set("annotations", {"id": 1}), "'annotations' must be a list, got dict"),
    ("categories an object", _set("categories", {"id": 3}), "'categories' must be a list, got dict"),
    ("categories empty", _set("categories", []), "no 'categories' list"),
    ("image not an object", _set("images.0", [1, "a.jpg"]), "images[0]: must be an object, got list"),
    ("image id a string", _set("images.0.id", "1"), "images[0]: 'id' must be an integer, got '1'"),
    ("image id null", _set("images.0.id", None), "images[0]: 'id' must be an integer, got None"),
    ("image id a bool", _set("images.0.id", True), "images[0]: 'id' must be an integer, got True"),
    ("image id a float", _set("images.0.id", 1.5), "images[0]: 'id' must be an integer, got 1.5"),
    ("file_name a number", _set("images.0.file_name", 5), "image id 1: 'file_name' must be a non-empty string, got 5"),
    ("file_name null", _set("images.0.file_name", None), "image id 1: 'file_name' must be a non-empty string"),
    ("file_name empty", _set("images.0.file_name", ""), "image id 1: 'file_name' must be a non-empty string"),
    ("width null", _set("images.0.width", None), "image id 1: 'width' must be a positive integer, got None"),
    ("height a string", _set("images.1.height", "30"), "image id 2: 'height' must be a positive integer, got '30'"),
    ("width zero", _set("images.0.width", 0), "image id 1: 'width' must be a positive integer, got 0"),
    ("duplicate image id", _set("images.1.id", 1), "images[1]: duplicate image id 1"),
    ("annotation not an object", _set("annotations.0", "box"), "annotations[0]: must be an object, got str"),
    ("annotation id a string", _set("annotations.0.id", "a1"), "annotations[0]: 'id' must be an integer"),
    ("duplicate annotation id", _set("annotations.1.id", 1), "annotation id 1: duplicate annotation id"),
    ("image_id a string", _set("annotations.0.image_id", "1"), "annotation id 1: 'image_id' must be an integer"),
    ("image_id null", _set("annotations.0.image_id", None), "annotation id 1: 'image_id' must be an integer"),
    ("dangling image_id", _set("annotations.0.image_id", 99), "annotation id 1: image_id 99 is not in 'images'"),
    ("category_id a string", _set("annotations.0.category_id", "3"),
     "annotation id 1: 'category_id' must be an integer"),
    ("dangling category_id", _set("annotations.0.category_id", 7),
     "annotation id 1: category_id 7 is not in 'categories'"),
    ("bbox null", _set("annotations.0.bbox", None), "annotation id 1: bbox must be [x, y, width, height] numbers"),
    ("bbox of strings", _set("annotations.0.bbox", ["1", "2", "3", "4"]), "annotation id 1: bbox must be"),
    ("bbox of 3", _set("annotations.0.bbox", [1, 2, 3]), "annotation id 1: bbox must be"),
    ("bbox of bools", _set("annotations.0.bbox", [True, 2, 3, 4]), "annotation id 1: bbox must be"),
    ("bbox an object", _set("annotations.0.bbox", {"x": 1}), "annotation id 1: bbox must be"),
    ("bbox NaN", b'{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 4, "image_id": 1, '
                 b'"category_id": 3, "bbox": [1, 2, NaN, 4]}], "categories": [{"id": 3, "name": "cat"}]}',
     "annotation id 4: bbox has a non-finite value"),
    ("negative width", _set("annotations.0.bbox", [1, 2, -3, 4]), "annotation id 1: bbox has negative width"),
    ("iscrowd a string", _set("annotations.0.iscrowd", "yes"), "annotation id 1: 'iscrowd' must be 0 or 1"),
    ("category not an object", _set("categories.0", "cat"), "categories[0]: must be an object, got str"),
    ("category id a string", _set("categories.0.id", "3"), "categories[0]: 'id' must be an integer, got '3'"),
    ("category id null", _set("categories.0.id", None), "categories[0]: 'id' must be an integer, got None"),
    ("category name a number", _set("categories.1.name", 5), "categories[1] (id 5): 'name' must be a string"),
    ("duplicate category id", _add("categories", {"id": 3, "name": "again"}), "categories[2]: duplicate category id"),
]


def _write_images(folder: Path, names=("a.jpg", "b.jpg")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (40, 30)).save(folder / n)


@pytest.mark.parametrize("case, content, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_annotation_corpus(tmp_path, case, content, expected):
    _write_images(tmp_path / "img")
    path = tmp_path / "broken.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content(_valid())).encode())
    with pytest.raises(DataError) as info:
        load_coco_records(path, tmp_path / "img")
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize("tool", ["acrst_fast.train", "acrst_fast.train_ssmll", "acrst_fast.data.check"])
def test_tools_report_a_broken_json_in_one_line(tmp_path, tiny_demo, cpu_env, tool):
    data = tmp_path / "demo"
    import shutil
    shutil.copytree(tiny_demo, data)
    lab = json.loads((data / "labeled.json").read_text())
    lab["images"][0]["width"] = None
    (data / "labeled.json").write_text(json.dumps(lab))
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(data, tmp_path / "run"))
    proc = subprocess.run([sys.executable, "-m", tool, str(cfg)], cwd=REPO, env=cpu_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {data / 'labeled.json'}: image id {lab['images'][0]['id']}: 'width' must be a positive "
                     "integer, got None"]


def test_report_skips_lines_that_are_not_records(tmp_path):
    from acrst_fast.report import read_logs

    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "total": 1.0}\n[1, 2]\n"text"\n'
                                            '{"kind": "train"}\n{"kind": "train", "step": 2, "total": 0.5}\n{"cut')
    (tmp_path / "final_metrics.json").write_text("[]")
    logs = read_logs(tmp_path)
    assert [r["step"] for r in logs.train] == [1, 2] and logs.final is None
    assert any("3 line(s) skipped that are not records" in n and "line 2" in n for n in logs.notes)
    assert any("1 unreadable line(s)" in n for n in logs.notes)
    assert any("final_metrics.json: unreadable or not an object" in n for n in logs.notes)


def test_image_only_json_is_a_valid_unlabeled_set(tmp_path):
    _write_images(tmp_path / "img")
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps(_valid()))
    _, cats = load_coco_records(lab, tmp_path / "img")
    unl = tmp_path / "unl.json"  # as `splits additional` and most unlabeled exports write it
    unl.write_text(json.dumps({"images": [{"id": 7, "file_name": "b.jpg", "width": 40, "height": 30}]}))
    records, _ = load_coco_records(unl, tmp_path / "img", cats)
    assert [r.image_id for r in records] == [7] and records[0].boxes.shape == (0, 4)
    unl.write_text(json.dumps({"images": [{"id": 7, "file_name": "b.jpg"}], "annotations": [], "categories": []}))
    assert len(load_coco_records(unl, tmp_path / "img", cats)[0]) == 1  # an empty list, like none


def test_boxes_outside_their_image_are_counted_and_reported(tmp_path, caplog):
    _write_images(tmp_path / "img")
    d = _valid()
    d["annotations"] += [{"id": 8, "image_id": 1, "category_id": 3, "bbox": [50, 5, 10, 10]},   # right of it
                         {"id": 9, "image_id": 2, "category_id": 5, "bbox": [-20, -20, 10, 10]}]  # above-left
    path = tmp_path / "a.json"
    path.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        records, _ = load_coco_records(path, tmp_path / "img")
    assert [len(r.boxes) for r in records] == [1, 1]
    assert "2 boxes lie entirely outside their image" in caplog.text and "annotation id 8" in caplog.text


def _roboflow_export(root: Path) -> Path:
    """A Roboflow-style COCO export: a placeholder category 0 that no box uses, images of different sizes."""
    (root / "train").mkdir(parents=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (80, 80), (64, 96), (72, 88), (96, 96), (88, 64)]):
        name = f"img_{i}_jpg.rf.{i:08x}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / name)
        images.append({"id": i, "license": 1, "file_name": name, "height": h, "width": w,
                       "date_captured": "2024-01-01T00:00:00+00:00"})
        for j in range(2):
            anns.append({"id": len(anns), "image_id": i, "category_id": 1 + (i + j) % 2,
                         "bbox": [5 + 10 * j, 8, 20, 24], "area": 480, "segmentation": [], "iscrowd": 0})
    data = {"info": {"description": "exported from roboflow"}, "licenses": [{"id": 1, "name": "CC BY 4.0"}],
            "categories": [{"id": 0, "name": "cells", "supercategory": "none"},
                           {"id": 1, "name": "RBC", "supercategory": "cells"},
                           {"id": 2, "name": "WBC", "supercategory": "cells"}],
            "images": images, "annotations": anns}
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(data))
    return root / "train"


def test_roboflow_export_loads_as_is_and_reports_the_placeholder(tmp_path, caplog):
    folder = _roboflow_export(tmp_path / "rf")
    with caplog.at_level(logging.WARNING):
        records, cats = load_coco_records(folder / "_annotations.coco.json", folder)
    assert cats.names == ("cells", "RBC", "WBC") and len(records) == 6
    assert {(r.width, r.height) for r in records} >= {(96, 64), (64, 96)}
    assert "1 of 3 categories have no box in this file: 0 'cells'" in caplog.text


# ---------------------------------------------------------------- image kinds real folders hold

def _kinds(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Image files of each kind with the RGB pixels they should decode to (uint8[H, W, 3], as stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = {}
    gray = rgb[..., 0]
    Image.fromarray(gray).save(folder / "gray.png")
    out["grayscale"] = (folder / "gray.png", np.repeat(gray[..., None], 3, 2))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=100)
    out["cmyk"] = (folder / "cmyk.jpg", np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB")))
    g16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(g16).save(folder / "g16.png")
    g8 = ((g16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    out["16-bit png"] = (folder / "g16.png", np.repeat(g8[..., None], 3, 2))
    rgba = np.concatenate([rgb, rng.integers(0, 255, (48, 64, 1), dtype=np.uint8)], 2)
    Image.fromarray(rgba).save(folder / "alpha.png")
    out["png with alpha"] = (folder / "alpha.png", rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(rgb).save(folder / "exif.jpg", quality=100, exif=exif.tobytes())
    out["exif-rotated jpeg"] = (folder / "exif.jpg", np.asarray(Image.open(folder / "exif.jpg").convert("RGB")))
    return out


def test_real_world_image_kinds_decode_as_stored(tmp_path):
    for kind, (path, expect) in _kinds(tmp_path).items():
        img = decode_image(ImageRecord(1, str(path), 64, 48, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
        assert img.shape == (3, 48, 64), kind  # EXIF orientation is ignored: the size the json gives
        tol = 0 if kind in ("grayscale", "16-bit png", "png with alpha") else 3
        assert (img.permute(1, 2, 0).numpy().astype(int) - expect.astype(int)).__abs__().max() <= tol, kind


def test_real_world_image_kinds_same_in_dali(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    kinds = _kinds(tmp_path)
    paths = [p for p, _ in kinds.values()]

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def decode():
        encoded = fn.external_source(source=lambda: [np.fromfile(p, dtype=np.uint8) for p in paths], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    pipe = decode()
    pipe.build()
    out = pipe.run()[0]
    for i, (kind, (path, _)) in enumerate(kinds.items()):
        dali = torch.from_numpy(np.asarray(out[i])).permute(2, 0, 1).int()
        ours = decode_image(ImageRecord(1, str(path), 64, 48, np.zeros((0, 4), np.float32),
                                        np.zeros(0, np.int64))).int()
        assert dali.shape == ours.shape, kind
        assert (dali - ours).abs().float().mean() < 3, kind  # JPEG decoders differ by rounding only


@pytest.mark.slow
def test_a_dataset_of_every_image_kind_and_a_roboflow_export_train(tmp_path, cpu_env):
    folder = _roboflow_export(tmp_path / "rf")
    data = json.loads((folder / "_annotations.coco.json").read_text())
    for kind, (path, _) in _kinds(folder).items():  # the kinds join the export, one box each
        data["images"].append({"id": len(data["images"]), "file_name": path.name, "width": 64, "height": 48})
        data["annotations"].append({"id": len(data["annotations"]), "image_id": data["images"][-1]["id"],
                                    "category_id": 2, "bbox": [10, 10, 30, 20], "iscrowd": 0})
    (folder / "all.json").write_text(json.dumps(data))
    raw = tiny_config_dict(folder.parent, tmp_path / "run", total_steps=4, pretrain_steps=2)
    raw["data"].update({"train_json": str(folder / "all.json"), "train_images": str(folder),
                        "val_json": str(folder / "all.json"), "val_images": str(folder),
                        "unlabeled_json": str(folder / "all.json"), "unlabeled_images": str(folder)})
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = subprocess.run([sys.executable, "-m", "acrst_fast.train", str(cfg)], cwd=REPO, env=cpu_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 'cells'" in proc.stderr  # the placeholder is reported at load time
    summary = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert summary["classes"] == ["cells", "RBC", "WBC"]
