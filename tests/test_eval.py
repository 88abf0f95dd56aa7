"""COCO and VOC metrics on hand-made detections."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from acrst_fast.data.coco import Categories
from conftest import REPO, seeds
from acrst_fast.evaluation.coco_eval import METRIC_NAMES, coco_metrics, ground_truth, voc_ap50

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


SHIPPED = Path(__file__).parent / "data" / "coco" / "annotations"


def _noisy_detections(gt: dict, seed: int) -> list[dict]:
    """Detections of a COCO json's objects: each found (or missed) with jittered boxes, some with the wrong
    class, plus false positives; scores random (ties included)."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jit = rng.normal(0, 0.1, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
        out.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.choice([0.5, rng.random()])),
                    "bbox": [float(x + jit[0]), float(y + jit[1]), float(max(w + jit[2], 1)), float(max(h + jit[3], 1))]})
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.random() * width * 0.8, rng.random() * height * 0.8
            out.append({"image_id": image_id, "category_id": int(rng.choice(cats)), "score": float(rng.random()),
                        "bbox": [float(x), float(y), float(rng.random() * width * 0.2 + 2), float(rng.random() * height * 0.2 + 2)]})
    return out


@pytest.mark.parametrize("split", ["val2017", "train2017"])
@pytest.mark.parametrize("seed", seeds())
def test_faster_coco_eval_gives_pycocotools_ap(split, seed):
    """eval.backend faster_coco_eval scores the shipped COCO photos' labels as pycocotools does (1e-4)."""
    path = SHIPPED / f"instances_{split}.json"
    data = json.loads(path.read_text())
    categories = Categories(ids=tuple(c["id"] for c in data["categories"]),
                            names=tuple(c["name"] for c in data["categories"]))
    results = _noisy_detections(data, seed)
    ref = coco_metrics(ground_truth(str(path), "pycocotools"), results, categories)
    fast_gt = ground_truth(str(path), "faster_coco_eval")
    assert type(fast_gt).__module__.startswith("faster_coco_eval")  # the other backend really ran
    fast = coco_metrics(fast_gt, results, categories)
    assert 5.0 < ref["AP"] < 95.0  # neither trivial nor perfect
    for name in METRIC_NAMES:
        assert fast[name] == pytest.approx(ref[name], abs=1e-4), name
    present = [n for n, v in ref["AP_per_class"].items() if v == v]
    assert len(present) > 5
    for name in ref["AP_per_class"]:
        assert fast["AP_per_class"][name] == pytest.approx(ref["AP_per_class"][name], abs=1e-4, nan_ok=True), name


def test_eval_backend_is_checked(tmp_path):
    from acrst_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.backend"):
        load_config(str(REPO / "configs/demo.yaml"), ["eval.backend=detectron2"])
    with pytest.raises(ValueError, match="eval.backend"):
        ground_truth(str(SHIPPED / "instances_val2017.json"), "fast")
