"""COCO and VOC metrics on hand-made detections."""
import contextlib
import io
import json

import pytest
from pycocotools.coco import COCO

from acrst_fast.data.coco import Categories
from acrst_fast.evaluation.coco_eval import coco_metrics, voc_ap50

CATS = Categories(ids=(1, 5), names=("a", "b"))


def _gt(tmp_path, anns):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2)]
    for k, a in enumerate(anns):
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
        a["area"] = a["bbox"][2] * a["bbox"][3]
    p = tmp_path / "gt.json"
    p.write_text(json.dumps({"images": images, "annotations": anns,
                             "categories": [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}]}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(p))


GT = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]},
      {"image_id": 2, "category_id": 5, "bbox": [50, 20, 30, 60]},
      {"image_id": 2, "category_id": 1, "bbox": [0, 0, 30, 30]}]


def test_perfect_detections(tmp_path):
    gt = _gt(tmp_path, [dict(a) for a in GT])
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in GT]
    m = coco_metrics(gt, res, CATS)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0)
    assert m["AP_per_class"] == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}
    assert voc_ap50(gt, res, CATS) == pytest.approx(100.0)


def test_empty_and_wrong_detections(tmp_path):
    gt = _gt(tmp_path, [dict(a) for a in GT])
    assert coco_metrics(gt, [], CATS)["AP"] == 0.0 and voc_ap50(gt, [], CATS) == 0.0
    wrong = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.9}]
    assert coco_metrics(gt, wrong, CATS)["AP"] == 0.0 and voc_ap50(gt, wrong, CATS) == 0.0


def test_voc_ap_hand_computed(tmp_path):
    # class a: 2 GTs. Detections by score: TP (img1), FP, TP (img2) -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # all-point AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333; class b: one GT, one TP -> 1.0; mean = 0.9167
    gt = _gt(tmp_path, [dict(a) for a in GT])
    res = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
           {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.8},
           {"image_id": 2, "category_id": 1, "bbox": [1, 1, 29, 29], "score": 0.7},
           {"image_id": 2, "category_id": 5, "bbox": [50, 20, 30, 60], "score": 0.6}]
    assert voc_ap50(gt, res, CATS) == pytest.approx(100 * (0.8333333 + 1.0) / 2, abs=1e-3)
    # a duplicate detection of an already-matched GT is a false positive
    dup = res[:1] + [dict(res[0], score=0.85)]
    assert voc_ap50(gt, dup, CATS) == pytest.approx(100 * (0.5 + 0.0) / 2)


def test_crowd_boxes_are_ignored_by_voc_ap(tmp_path):
    gt = _gt(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]},
                        {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "iscrowd": 1}])
    res = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.95},
           {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}]
    assert voc_ap50(gt, res, Categories(ids=(1,), names=("a",))) == pytest.approx(100.0)
