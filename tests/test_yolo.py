"""YOLO (Ultralytics / Roboflow) layouts to COCO json, on the fixture in tests/data/yolo."""
import json
import shutil

import pytest
from PIL import Image

from acrst_fast.data.coco import DataError, decode_image, load_coco_records
from acrst_fast.data.yolo import convert, main
from conftest import REPO

FIXTURE = REPO / "tests" / "data" / "yolo"


def test_train_split_converted():
    notes = []
    data = convert(FIXTURE / "data.yaml", "train", notes)
    assert [c["name"] for c in data["categories"]] == ["car", "bus", "truck"]
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    by_name = {im["file_name"]: im for im in data["images"]}
    # the byte-identical Roboflow copy is kept once; the image without a label file is an empty image
    assert sorted(by_name) == ["train/images/a.jpg", "train/images/b.png", "train/images/c_jpg.rf.111.jpg",
                               "train/images/d.jpg"]
    assert notes == ["1 duplicate copies (Roboflow: same image and labels under another name) kept once"]
    a, b, c, d = (by_name[n] for n in sorted(by_name))
    assert (a["width"], a["height"], b["width"], b["height"]) == (40, 30, 64, 48)
    boxes = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        boxes[ann["image_id"]].append((ann["category_id"], [round(v, 6) for v in ann["bbox"]]))
    assert boxes[a["id"]] == [(1, [10.0, 9.0, 20.0, 12.0]), (3, [6.0, 4.5, 8.0, 6.0])]  # denormalised by 40 x 30
    assert boxes[b["id"]] == [(2, [6.4, 9.6, 12.8, 9.6])]  # the polygon's bounding box, by 64 x 48
    assert boxes[c["id"]] == [(2, [0.0, 0.0, 32.0, 32.0])] and boxes[d["id"]] == []


def test_txt_list_split_and_cli(tmp_path):
    out = tmp_path / "val.json"
    assert main([str(FIXTURE / "data.yaml"), "--split", "val", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [im["file_name"] for im in data["images"]] == ["valid/images/e.jpg"] and data["annotations"] == []
    assert main([str(FIXTURE / "data.yaml"), "--split", "val", "--out", str(out)]) != 0  # never overwritten


def test_engine_reads_the_json(tmp_path):
    out = tmp_path / "train.json"
    assert main([str(FIXTURE / "data.yaml"), "--split", "train", "--out", str(out)]) == 0
    records, _ = load_coco_records(out, FIXTURE)
    assert len(records) == 4 and sum(len(r.labels) for r in records) == 4
    assert all(tuple(decode_image(r).shape[1:]) == (r.height, r.width) for r in records)


@pytest.mark.parametrize("line, problem", [
    ("0 0.5 0.5 0.5", "4 fields"),
    ("0 0.5 0.5 0.5 x", "not numbers"),
    ("3 0.5 0.5 0.2 0.2", "class id 3 outside 0..2"),
    ("0 50 40 10 10", "must be normalised to"),
    ("0 0.5 0.5 0.0 0.2", "empty box"),
])
def test_malformed_lines_named(tmp_path, line, problem):
    root = tmp_path / "ds"
    shutil.copytree(FIXTURE, root)
    (root / "train/labels/a.txt").write_text("0 0.5 0.5 0.5 0.4\n" + line + "\n")
    with pytest.raises(DataError, match=rf"train/labels/a\.txt: line 2: .*{problem}"):
        convert(root / "data.yaml", "train")


def test_yaml_problems_named(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(FIXTURE, root)
    yaml_path = root / "data.yaml"
    with pytest.raises(DataError, match=r"no 'test' split \(it has \['train', 'val'\]\)"):
        convert(yaml_path, "test")
    yaml_path.write_text(yaml_path.read_text().replace("nc: 3", "nc: 4"))
    with pytest.raises(DataError, match="nc is 4 but 'names' has 3 classes"):
        convert(yaml_path, "train")


def test_exif_rotation_refused(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(FIXTURE, root)
    im = Image.open(root / "train/images/a.jpg")
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    im.save(root / "train/images/a.jpg", exif=exif)
    with pytest.raises(DataError, match=r"a\.jpg: EXIF orientation 6"):
        convert(root / "data.yaml", "train")
