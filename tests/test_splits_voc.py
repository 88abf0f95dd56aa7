"""COCO-standard splits and the VOC converter."""
import json

import pytest

from acrst_fast.data.coco import DataError, load_coco_records
from acrst_fast.data.splits import (PUBLISHED_FOLDS, choose_labeled, indexed_images, write_folder_json,
                                    write_standard_split)
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
    lab, unl = write_standard_split(src, 10, 1, tmp_path, folds="generator")
    full = json.loads(src.read_text())
    L, U = json.loads(lab.read_text()), json.loads(unl.read_text())
    lid, uid = {i["id"] for i in L["images"]}, {i["id"] for i in U["images"]}
    assert len(lid) == 2 and not lid & uid and lid | uid == {i["id"] for i in full["images"]}
    assert all(a["image_id"] in lid for a in L["annotations"]) and all(a["image_id"] in uid for a in U["annotations"])
    assert len(L["annotations"]) + len(U["annotations"]) == len(full["annotations"])
    assert L["categories"] == full["categories"]
    before = lab.read_bytes()
    lab.unlink()
    write_standard_split(src, 10, 1, tmp_path, folds="generator")  # identical when written again
    assert lab.read_bytes() == before
    records, _ = load_coco_records(lab, TINY_COCO / "train2017")
    assert len(records) == 2


def _instances(tmp_path):
    """12 images listed out of id order; image 20 has no annotation, image 40 only a crowd one."""
    ids = [50, 10, 40, 20, 30, 60, 70, 80, 90, 100, 110, 120]
    anns = [{"id": k + 1, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
            for k, i in enumerate(ids) if i not in (20, 40)]
    anns.append({"id": 99, "image_id": 40, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1})
    anns.append({"id": 98, "image_id": 10, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 1})
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 20, "height": 20} for i in ids],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def test_published_fold_indices_point_into_sorted_annotated_images(tmp_path):
    """The fold file's semantics: images sorted by id, those without a non-crowd annotation dropped first,
    int(p / 100 * n) indices per fold; the unlabeled part is the rest of that list."""
    path, data = _instances(tmp_path)
    assert indexed_images(data) == [10, 30, 50, 60, 70, 80, 90, 100, 110, 120]  # n = 10: 20 and 40 dropped
    folds = tmp_path / "folds.txt"
    folds.write_text(json.dumps({"25.0": {"0": [0, 3], "1": [9, 2]}, "10.0": {"0": [5, 6]}}))
    lab, unl = write_standard_split(path, 25, 1, tmp_path / "out", folds=str(folds))
    L, U = json.loads(lab.read_text()), json.loads(unl.read_text())
    assert sorted(im["id"] for im in L["images"]) == [50, 120]  # indices 9 and 2 of the sorted, filtered list
    assert sorted(im["id"] for im in U["images"]) == [10, 30, 60, 70, 80, 90, 100, 110]
    assert {a["image_id"] for a in L["annotations"]} == {50, 120}
    assert "fold1" in lab.name and "folds_" in lab.name  # the fold file's name is part of the split's name
    lab0, _ = write_standard_split(path, 25, 0, tmp_path / "out", folds=str(folds))
    assert sorted(im["id"] for im in json.loads(lab0.read_text())["images"]) == [10, 60]
    with pytest.raises(DataError, match="lists 2 indices"):  # int(10 / 100 * 10) = 1: made for another file
        write_standard_split(path, 10, 0, tmp_path / "out", folds=str(folds))
    with pytest.raises(DataError, match="no 5 % folds"):
        write_standard_split(path, 5, 0, tmp_path / "out", folds=str(folds))
    with pytest.raises(DataError, match="no fold 7"):
        write_standard_split(path, 25, 7, tmp_path / "out", folds=str(folds))


def test_shipped_published_fold_file():
    """The literature's COCO-standard folds: 7 percents x 10 folds of int(p / 100 * 117266) distinct
    indices into train2017's 117266 annotated images."""
    table = json.loads(PUBLISHED_FOLDS.read_text())
    assert sorted(table, key=float) == ["0.01", "0.1", "0.5", "1.0", "2.0", "5.0", "10.0"]
    for percent, folds in table.items():
        assert sorted(folds, key=int) == [str(f) for f in range(10)]
        for indices in folds.values():
            assert len(indices) == len(set(indices)) == int(float(percent) / 100 * 117266)
            assert 0 <= min(indices) and max(indices) < 117266
    assert (PUBLISHED_FOLDS.parent / "LICENSE").is_file()


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


BAD_RECORDS = [
    ({"images": [{"file_name": "a.jpg"}]}, "images[0]: 'id' must be an integer, got None"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}, "images[1]: duplicate image id 1"),
    ({"images": ["a.jpg"]}, "images[0]: must be an object, got str"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 7, "image_id": "1", "category_id": 1,
                                                                  "bbox": [0, 0, 2, 2]}]},
     "annotation id 7: 'image_id' must be an integer, got '1'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "category_id": 1,
                                                                  "bbox": [0, 0, 2, 2]}]},
     "annotation id #0: image_id 2 is not in 'images'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [[1, 2]]}, "annotations[0]: must be an object"),
]


@pytest.mark.parametrize("data, needle", BAD_RECORDS)
@pytest.mark.parametrize("folds", ["generator", "published"])
def test_split_tool_names_the_bad_record(tmp_path, capsys, data, needle, folds):
    """`python -m acrst_fast.data.splits standard FILE` checks every field it reads, as the trainer's reader
    does: one line naming the file and the record, exit code 2, nothing written."""
    from acrst_fast.data.splits import main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code = main(["standard", str(path), "--percent", "50", "--folds", folds, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {path}: {needle}"), err
    assert "\n" not in err and not (tmp_path / "out").exists()
