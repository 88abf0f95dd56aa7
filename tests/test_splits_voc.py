"""COCO-standard splits and the VOC converter."""
import json

import pytest

from acrst_fast.data.coco import DataError, load_coco_records
from acrst_fast.data.splits import choose_labeled, write_folder_json, write_standard_split
from acrst_fast.data.voc import VOC_CLASSES, convert
from conftest import TINY_COCO


@pytest.mark.parametrize("percent", [0.5, 1, 2, 5, 10])
def test_choose_labeled_deterministic_sized(percent):
    ids = list(range(1000, 3000, 2))
    a = choose_labeled(ids, percent, fold=1)
    assert a == choose_labeled(list(reversed(ids)), percent, fold=1)  # order of the json does not matter
    assert len(a) == round(len(ids) * percent / 100) and a <= set(ids)
    assert a != choose_labeled(ids, percent, fold=2)


def test_standard_split_files_disjoint_and_complete(tmp_path):
    src = TINY_COCO / "annotations" / "instances_train2017.json"
    lab, unl = write_standard_split(src, 10, 1, tmp_path)
    full = json.loads(src.read_text())
    L, U = json.loads(lab.read_text()), json.loads(unl.read_text())
    lid, uid = {i["id"] for i in L["images"]}, {i["id"] for i in U["images"]}
    assert len(lid) == 2 and not lid & uid and lid | uid == {i["id"] for i in full["images"]}
    assert all(a["image_id"] in lid for a in L["annotations"]) and all(a["image_id"] in uid for a in U["annotations"])
    assert len(L["annotations"]) + len(U["annotations"]) == len(full["annotations"])
    assert L["categories"] == full["categories"]
    before = lab.read_bytes()
    lab.unlink()
    write_standard_split(src, 10, 1, tmp_path)  # identical when written again
    assert lab.read_bytes() == before
    records, _ = load_coco_records(lab, TINY_COCO / "train2017")
    assert len(records) == 2


def test_folder_json(tmp_path):
    from PIL import Image

    (tmp_path / "u").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "u" / "b.jpg")
    Image.new("RGB", (10, 40)).save(tmp_path / "u" / "a.png")
    out = write_folder_json(tmp_path / "u", tmp_path / "u.json")
    data = json.loads(out.read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in data["images"]] == [("a.png", 10, 40), ("b.jpg", 30, 20)]


XML = """<annotation><filename>{name}.jpg</filename><size><width>100</width><height>80</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = "<object><name>{cls}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"


def _voc(tmp_path, split, items):
    base = tmp_path / "VOC2007"
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for name, objs in items.items():
        (base / "Annotations" / f"{name}.xml").write_text(
            XML.format(name=name, objects="".join(OBJ.format(**o) for o in objs)))
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")


def test_voc_conversion(tmp_path):
    _voc(tmp_path, "test", {
        "000001": [dict(cls="dog", d=0, x1=1, y1=1, x2=50, y2=40), dict(cls="person", d=1, x1=10, y1=20, x2=30, y2=60)],
        "000002": [],
    })
    data = convert(tmp_path, "2007", "test", classes=VOC_CLASSES)
    assert [c["name"] for c in data["categories"]][:3] == ["aeroplane", "bicycle", "bird"] and len(data["categories"]) == 20
    assert data["images"][0] == {"id": 1, "file_name": "VOC2007/JPEGImages/000001.jpg", "width": 100, "height": 80}
    dog, person = data["annotations"]
    assert dog["bbox"] == [0, 0, 50, 40] and dog["category_id"] == 12 and dog["iscrowd"] == 0
    assert person["difficult"] == 1 and person["iscrowd"] == 1  # ignored by evaluation in a test split
    train = convert(tmp_path, "2007", "test", difficult_as_crowd=False, classes=VOC_CLASSES)
    assert train["annotations"][1]["iscrowd"] == 0


def test_voc_errors_name_file(tmp_path):
    _voc(tmp_path, "trainval", {"000003": [dict(cls="dragon", d=0, x1=1, y1=1, x2=5, y2=5)]})
    with pytest.raises(DataError, match=r"000003\.xml: object 0: unknown class 'dragon'"):
        convert(tmp_path, "2007", "trainval", classes=VOC_CLASSES)
    _voc(tmp_path, "trainval", {"000004": [dict(cls="cat", d=0, x1=9, y1=1, x2=5, y2=5)]})
    with pytest.raises(DataError, match=r"000004\.xml: object 0 \(cat\): empty or inverted box"):
        convert(tmp_path, "2007", "trainval", classes=VOC_CLASSES)
    (tmp_path / "VOC2007" / "Annotations" / "000004.xml").write_text("<annotation><size>")
    with pytest.raises(DataError, match=r"000004\.xml: not valid XML"):
        convert(tmp_path, "2007", "trainval", classes=VOC_CLASSES)
    with pytest.raises(DataError, match="image list not found"):
        convert(tmp_path, "2012", "trainval", classes=VOC_CLASSES)


def test_voc_custom_classes_without_imagesets(tmp_path, capsys):
    """A custom VOC-format dataset: classes outside VOC's 20, no ImageSets, a degenerate (point) box."""
    from acrst_fast.data.voc import main as voc_main
    _voc(tmp_path, "unused", {
        "a": [dict(cls="WBC", d=0, x1=1, y1=1, x2=50, y2=40), dict(cls="RBC", d=0, x1=5, y1=5, x2=5, y2=5)],
        "b": [dict(cls="Platelets", d=0, x1=10, y1=20, x2=30, y2=60)],
    })
    import shutil
    shutil.rmtree(tmp_path / "VOC2007" / "ImageSets")
    out = tmp_path / "cells.json"
    assert voc_main([str(tmp_path), "--year", "2007", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes inferred from the XML (sorted): Platelets, RBC, WBC" in printed
    assert "1 degenerate boxes (xmin == xmax or ymin == ymax) left out (first: a.xml object 1)" in printed
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == ["Platelets", "RBC", "WBC"]
    assert [(a["image_id"], a["category_id"]) for a in data["annotations"]] == [(1, 3), (2, 1)]
    assert [i["file_name"] for i in data["images"]] == ["VOC2007/JPEGImages/a.jpg", "VOC2007/JPEGImages/b.jpg"]
    out2 = tmp_path / "cells2.json"
    assert voc_main([str(tmp_path), "--year", "2007", "--classes", "WBC,RBC,Platelets", "--out", str(out2)]) == 0
    assert [c["name"] for c in json.loads(out2.read_text())["categories"]] == ["WBC", "RBC", "Platelets"]
    (tmp_path / "classes.txt").write_text("WBC\n")
    assert voc_main([str(tmp_path), "--year", "2007", "--classes", str(tmp_path / "classes.txt"),
                     "--out", str(tmp_path / "c3.json")]) == 2
    assert "unknown class 'RBC'" in capsys.readouterr().err
