"""Benchmark: COCO bbox evaluation at COCO scale, pycocotools (the reference) against faster-coco-eval.

    python bench/coco_eval.py [--images 5000] [--objects 7.3] [--dets 100] [--classes 80] [--seed 0]

A synthetic COCO val2017-sized split: IMAGES images of COCO-like sizes with on average OBJECTS boxes
(val2017: 36,781 boxes on 5,000 images, 80 classes, ~1 % crowd), and DETS detections per image (the
detector's test-time top-n): each object found with a jittered box and a mostly right class, the rest false
positives. Both backends score the same detections through `acrst_fast.evaluation.coco_eval` (the
engine's `eval.backend`); the table shows each phase (loadRes, evaluate, accumulate + summarize) in
seconds, the AP both report (checked equal within 1e-4), and the ratio. The floor line is the work every
evaluator must do at least once: the IoU matrix of each (image, class) pair, by pycocotools' C routine.
One run, one process (the evaluation runs on rank 0 in the engine).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections import defaultdict

import numpy as np

from acrst_fast.evaluation.coco_eval import METRIC_NAMES, backend_classes


def synthetic_split(images: int, objects: float, dets: int, classes: int, seed: int) -> tuple[dict, list[dict]]:
    """(COCO ground-truth dict, detection list [{"image_id", "category_id", "bbox": xywh, "score"}])."""
    rng = np.random.default_rng(seed)
    cats = [{"id": k + 1, "name": f"c{k + 1}"} for k in range(classes)]
    freq = 1.0 / np.arange(1, classes + 1) ** 0.8  # a long tail, as COCO's
    freq /= freq.sum()
    imgs, anns, results = [], [], []
    for i in range(1, images + 1):
        w, h = int(rng.choice([640, 480, 500, 427])), int(rng.choice([480, 640, 375, 333]))
        imgs.append({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
        n = int(rng.poisson(objects))
        wh = np.exp(rng.uniform(np.log(8), np.log(min(w, h) * 0.8), (n, 2)))
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([w, h]) - wh)
        labels = rng.choice(classes, n, p=freq) + 1
        for b, c in zip(np.hstack([xy, wh]), labels):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [float(v) for v in b],
                         "area": float(b[2] * b[3]), "iscrowd": int(rng.random() < 0.01)})
        hit = rng.random(n) < 0.8
        found = np.hstack([xy, wh])[hit][:dets]
        jit = found + rng.normal(0, 0.08, found.shape) * np.repeat(found[:, 2:], 2, axis=1)
        fp = dets - len(jit)
        fwh = np.exp(rng.uniform(np.log(4), np.log(min(w, h) * 0.5), (fp, 2)))
        boxes = np.vstack([jit, np.hstack([rng.uniform(0, 1, (fp, 2)) * (np.array([w, h]) - fwh), fwh])])
        right = np.where(rng.random(len(jit)) < 0.9, labels[hit][:dets], rng.choice(classes, len(jit), p=freq) + 1)
        det_labels = np.concatenate([right, rng.choice(classes, len(boxes) - len(right), p=freq) + 1])
        scores = np.concatenate([rng.beta(5, 2, len(right)), rng.beta(2, 5, len(boxes) - len(right))])
        for b, c, s in zip(boxes, det_labels, scores):
            results.append({"image_id": i, "category_id": int(c), "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), max(float(b[2]), 1.0), max(float(b[3]), 1.0)]})
    return {"images": imgs, "annotations": anns, "categories": cats}, results


def time_backend(backend: str, data: dict, results: list[dict]) -> dict:
    """Seconds of each phase and the six COCO metrics (percent) of one backend."""
    coco_class, cocoeval = backend_classes(backend)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        gt = coco_class()
        gt.dataset = data
        gt.createIndex()
        dt = gt.loadRes(results)
        t1 = time.perf_counter()
        ev = cocoeval(gt, dt, iouType="bbox")
        ev.evaluate()
        t2 = time.perf_counter()
        ev.accumulate()
        ev.summarize()
        t3 = time.perf_counter()
    out["load"], out["evaluate"], out["accumulate"] = t1 - t0, t2 - t1, t3 - t2
    out["total"] = t3 - t0
    out["metrics"] = {k: float(v) * 100 for k, v in zip(METRIC_NAMES, ev.stats[:6])}
    return out


def floor_seconds(data: dict, results: list[dict]) -> float:
    """The IoU matrices of every (image, class) pair once (pycocotools.mask.iou, C), detections by score."""
    from pycocotools import mask as mask_utils

    gts, dts = defaultdict(list), defaultdict(list)
    for a in data["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a)
    for d in results:
        dts[d["image_id"], d["category_id"]].append(d)
    t0 = time.perf_counter()
    for key, d in dts.items():
        g = gts.get(key)
        if not g:
            continue
        d = sorted(d, key=lambda r: -r["score"])
        mask_utils.iou([r["bbox"] for r in d], [r["bbox"] for r in g], [r["iscrowd"] for r in g])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--objects", type=float, default=7.3, help="mean ground-truth boxes per image")
    ap.add_argument("--dets", type=int, default=100, help="detections per image")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data, results = synthetic_split(args.images, args.objects, args.dets, args.classes, args.seed)
    print(f"{args.images} images, {len(data['annotations'])} boxes, {args.classes} classes, "
          f"{len(results)} detections")
    rows = {b: time_backend(b, data, results) for b in ("pycocotools", "faster_coco_eval")}
    ref, fast = rows["pycocotools"]["metrics"], rows["faster_coco_eval"]["metrics"]
    worst = max(abs(ref[k] - fast[k]) for k in METRIC_NAMES)
    assert worst <= 1e-4, f"the backends disagree by {worst:.2e} AP"
    floor = floor_seconds(data, results)
    print(f"{'backend':>17} {'load s':>8} {'evaluate s':>11} {'accum+summ s':>13} {'total s':>8} {'AP':>7} "
          f"{'ref/this':>9} {'this/floor':>11}")
    for name, r in rows.items():
        print(f"{name:>17} {r['load']:8.2f} {r['evaluate']:11.2f} {r['accumulate']:13.2f} {r['total']:8.2f} "
              f"{r['metrics']['AP']:7.3f} {rows['pycocotools']['total'] / r['total']:9.2f} {r['total'] / floor:11.2f}")
    print(f"{'floor (IoU once)':>17} {'':>8} {floor:11.2f} {'':>13} {floor:8.2f}")
    print(f"AP, AP50, AP75, APs, APm, APl agree within {worst:.1e}")


if __name__ == "__main__":
    main()
