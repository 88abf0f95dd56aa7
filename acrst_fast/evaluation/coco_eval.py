"""COCO AP (pycocotools, or faster-coco-eval) and VOC-style AP50 of a detector on a held-out COCO-format split.

`eval.backend`: `pycocotools` (the reference) or `faster_coco_eval` (its C++ drop-in, on the package index;
the same AP within 1e-4, tests/test_eval.py; `bench/coco_eval.py` times both at COCO scale).

Predictions are made per rank on its shard, gathered on rank 0, scored there, and the metrics
are broadcast so every rank returns the same dict.

Metric keys: AP, AP50, AP75, APs, APm, APl (COCO, in %), voc_AP50 (all-point interpolated
VOC2010+ AP at IoU 0.5, in %, crowd/difficult boxes ignored), and AP_per_class {name: AP %}.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
import torch
from pycocotools.coco import COCO

from acrst_fast import dist
from acrst_fast.modes import EVAL_BACKENDS
from acrst_fast.data.coco import Categories, read_json
from acrst_fast.data.batch import Batch
from acrst_fast.data.transforms import boxes_to_original

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def backend_classes(backend: str):
    """(COCO, COCOeval) of `backend`; faster-coco-eval is imported only when asked for."""
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FastCOCO, COCOeval_faster
        except ImportError:
            raise ImportError("eval.backend 'faster_coco_eval' needs the package: pip install faster-coco-eval") from None
        return FastCOCO, COCOeval_faster
    raise ValueError(f"eval.backend must be one of {EVAL_BACKENDS}, got {backend!r}")


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Batch], categories: Categories, device: torch.device) -> list[dict]:
    """COCO result dicts: image_id, category_id, bbox [x, y, w, h] in original pixels, score."""
    was_training = model.training
    model.eval()
    results = []
    for batch in batches:
        outputs = model([im.to(device, non_blocking=True) for im in batch.weak])
        for image_id, geom, (h, w), out in zip(batch.image_ids, batch.geometry, batch.orig_hw, outputs):
            boxes = boxes_to_original(out["boxes"].float().cpu(), geom)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            for b, s, lab in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": categories.ids[lab - 1],
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    model.train(was_training)
    return results


def coco_metrics(gt: COCO, results: list[dict], categories: Categories) -> dict:
    """COCO bbox evaluation by the backend `gt` comes from (`ground_truth`); an empty result list scores 0
    everywhere (pycocotools cannot load it)."""
    zero = {k: 0.0 for k in METRIC_NAMES} | {"AP_per_class": {n: 0.0 for n in categories.names}}
    if not results:
        return zero
    backend = "faster_coco_eval" if type(gt).__module__.startswith("faster_coco_eval") else "pycocotools"
    _, cocoeval = backend_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = cocoeval(gt, dt, iouType="bbox")
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(max(v, 0.0)) * 100 for k, v in zip(METRIC_NAMES, ev.stats[:6])}
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_class = {}
    for k, (cid, name) in enumerate(zip(categories.ids, categories.names)):
        kk = ev.params.catIds.index(cid)
        p = precision[:, :, kk, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) * 100 if p.size else float("nan")
    out["AP_per_class"] = per_class
    return out


def _voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC2010+ all-point interpolation)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def voc_ap50(gt: COCO, results: list[dict], categories: Categories) -> float:
    """Mean over classes with ground truth of VOC AP at IoU >= 0.5; crowd (difficult) boxes are ignored."""
    aps = []
    for cid in categories.ids:
        gts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        npos = 0
        for ann in gt.loadAnns(gt.getAnnIds(catIds=[cid])):
            boxes, ignore = gts.get(ann["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
            x, y, w, h = ann["bbox"]
            gts[ann["image_id"]] = (np.vstack([boxes, [x, y, x + w, y + h]]),
                                    np.append(ignore, bool(ann.get("iscrowd", 0))))
            npos += 0 if ann.get("iscrowd", 0) else 1
        if npos == 0:
            continue
        dets = sorted((r for r in results if r["category_id"] == cid), key=lambda r: -r["score"])
        used = {i: np.zeros(len(g[0]), bool) for i, g in gts.items()}
        tp, fp = [], []
        for d in dets:
            boxes, ignore = gts.get(d["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
            x, y, w, h = d["bbox"]
            if len(boxes):
                iw = np.clip(np.minimum(boxes[:, 2], x + w) - np.maximum(boxes[:, 0], x), 0, None)
                ih = np.clip(np.minimum(boxes[:, 3], y + h) - np.maximum(boxes[:, 1], y), 0, None)
                inter = iw * ih
                iou = inter / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + w * h - inter)
                j = int(np.argmax(iou))
                best = iou[j]
            else:
                best, j = 0.0, -1
            if best >= 0.5 and ignore[j]:
                continue
            if best >= 0.5 and not used[d["image_id"]][j]:
                used[d["image_id"]][j] = True
                tp.append(1.0), fp.append(0.0)
            else:
                tp.append(0.0), fp.append(1.0)
        tpc, fpc = np.cumsum(tp), np.cumsum(fp)
        recall = tpc / npos
        precision = tpc / np.maximum(tpc + fpc, np.finfo(np.float64).eps)
        aps.append(_voc_ap(recall, precision) if dets else 0.0)
    return float(np.mean(aps)) * 100 if aps else 0.0


def ground_truth(val_json: str, backend: str = "pycocotools") -> COCO:
    """The backend's COCO of a validated json, with the fields exports often leave out filled in:
    `area` (box width x height) and `iscrowd` (0). pycocotools needs both."""
    coco_class, _ = backend_classes(backend)
    data = read_json(val_json)
    anns = [dict(a, area=a.get("area", a["bbox"][2] * a["bbox"][3]), iscrowd=int(a.get("iscrowd", 0)))
            for a in data.get("annotations", [])]
    gt = coco_class()
    gt.dataset = dict(data, annotations=anns, categories=data.get("categories", []))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


class Evaluator:
    """Scores a model on the validation split. Call on every rank; all get the same metrics."""

    def __init__(self, val_json: str, categories: Categories, backend: str = "pycocotools"):
        self.gt = ground_truth(val_json, backend)
        self.categories = categories

    def __call__(self, model: torch.nn.Module, batches: Iterable[Batch], device: torch.device) -> dict:
        local = predict(model, batches, self.categories, device)
        gathered = dist.gather_to_main(local)
        metrics = None
        if gathered is not None:
            results = [r for part in gathered for r in part]
            metrics = coco_metrics(self.gt, results, self.categories)
            metrics["voc_AP50"] = voc_ap50(self.gt, results, self.categories)
            metrics["num_detections"] = len(results)
        return dist.broadcast_from_main(metrics)
