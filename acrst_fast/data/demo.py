"""Embedded demo dataset: deterministic small images of shapes on cluttered backgrounds, COCO format.

Classes are shapes (colour is random, so only the shape tells the class). The share of objects
of class k is proportional to (k + 1) ** -imbalance: a long tail like COCO's (paper Fig. 1).
Writes, under `root`:
    labeled/  unlabeled/  val/            JPEG images
    labeled.json  unlabeled.json  val.json  COCO instances (unlabeled.json's boxes are hidden
                                            ground truth: never trained on, used for metrics)
Generation is deterministic in (config, seed) and atomic (written beside, then renamed). It
writes only into a folder that is absent, empty or an earlier demo folder holding nothing else.
    python -m acrst_fast.data.demo OUT_DIR [--seed S]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from acrst_fast.config import DemoDataConfig
from acrst_fast.data.coco import DataError
from acrst_fast.errors import cli_main

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar")
SPLITS = (("labeled", "num_labeled"), ("unlabeled", "num_unlabeled"), ("val", "num_val"))
STAMP = "DONE"  # written last; holds the config, so the generator knows which files are its own


def class_probs(cfg: DemoDataConfig) -> np.ndarray:
    p = (np.arange(cfg.num_classes) + 1.0) ** -cfg.imbalance
    return p / p.sum()


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    img = c0 * (1 - t) + c1 * t + rng.normal(0, rng.uniform(3, 20), (size, size, 3))
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 8)):  # clutter: lines and faint blobs that are not objects
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    return im


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], color: tuple) -> None:
    x1, y1, x2, y2 = box
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=color)
    elif shape == "cross":
        draw.rectangle((x1, cy - h / 6, x2, cy + h / 6), fill=color)
        draw.rectangle((cx - w / 6, y1, cx + w / 6, y2), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(w / 6)))
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=color)
    elif shape == "star":
        ang = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        draw.polygon([(cx + r * w / 2 * np.cos(a), cy + r * h / 2 * np.sin(a)) for a, r in zip(ang, rad)], fill=color)
    elif shape == "bar":
        draw.rectangle((x1, cy - h / 5, x2, cy + h / 5), fill=color)
        draw.rectangle((x1, y1, x1 + w / 5, y2), fill=color)


def _tight_box(shape: str, box: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = box
    if shape == "star":  # the star's points do not reach the bottom corners
        h = y2 - y1
        y2 = y1 + h / 2 + h / 2 * np.sin(np.pi / 2 - 2 * np.pi / 5)
    return [x1, y1, x2, y2]


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _make_image(cfg: DemoDataConfig, rng: np.random.Generator, probs: np.ndarray):
    s = cfg.image_size
    im = _background(rng, s)
    draw = ImageDraw.Draw(im)
    objects: list[tuple[list[float], int]] = []
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        k = int(rng.choice(cfg.num_classes, p=probs))
        for _try in range(20):
            side = rng.uniform(0.12, 0.35) * s
            w, h = side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25)
            x1, y1 = rng.uniform(0, s - w), rng.uniform(0, s - h)
            box = _tight_box(SHAPES[k], (x1, y1, x1 + w, y1 + h))
            if all(_iou(box, o[0]) < 0.05 for o in objects):
                color = tuple(int(v) for v in rng.uniform(0, 255, 3))
                _draw_shape(draw, SHAPES[k], (x1, y1, x1 + w, y1 + h), color)
                objects.append((box, k))
                break
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return im, objects


def _stamp(cfg: DemoDataConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def _stamped_config(root: Path) -> DemoDataConfig | None:
    """The config recorded in `root/DONE` by an earlier `generate`, or None when there is no valid stamp."""
    try:
        return DemoDataConfig(**json.loads((root / STAMP).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _written_by(cfg: DemoDataConfig) -> dict[str, set[str] | None]:
    """What `generate(cfg)` writes: top-level name -> the names inside it (None for a file)."""
    out: dict[str, set[str] | None] = {STAMP: None}
    for split, count_key in SPLITS:
        out[f"{split}.json"] = None
        out[split] = {f"{i:06d}.jpg" for i in range(getattr(cfg, count_key))}
    return out


def _check_ours(root: Path) -> None:
    """Raise DataError unless `root` is absent, empty, or holds only what an earlier `generate` wrote there."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"{root}: the demo dataset folder names a file; the demo generator writes only into a new, "
                        "empty or earlier demo folder")
    names = sorted(os.listdir(root))
    if not names:
        return
    stamped = _stamped_config(root)
    expected = _written_by(stamped) if stamped is not None else {}
    foreign = [n for n in names if n not in expected]
    for n in names:
        if n in expected and expected[n] is not None:
            inner = root / n
            foreign += [f"{n}/{m}" for m in sorted(os.listdir(inner)) if m not in expected[n]] if inner.is_dir() \
                else [n]
    if foreign:
        why = "holds files the demo generator did not write" if stamped is not None else \
            "is not empty and was not written by the demo generator (no DONE stamp)"
        raise DataError(f"{root}: this folder {why} ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); "
                        "it is left untouched. Remove the 'data.demo' section to train on your own data, or point "
                        "data.train_json at a new folder for the demo")


def generate(root: str | Path, cfg: DemoDataConfig) -> Path:
    """Write the demo dataset under `root` unless an identical one (same config) is already there.

    `root` must be absent, empty, or a demo folder written earlier (stamped `DONE`) that holds
    nothing else: a folder with any other content is an error that names it, and is never touched.
    """
    root = Path(root)
    if (root / STAMP).is_file() and (root / STAMP).read_text() == _stamp(cfg):
        _check_ours(root)
        return root
    if not 1 <= cfg.num_classes <= len(SHAPES):
        raise DataError(f"demo: num_classes must be in [1, {len(SHAPES)}], got {cfg.num_classes}")
    _check_ours(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))  # a new folder of our own
    try:
        _write(tmp, cfg)
        if root.exists():  # empty, or an earlier demo folder (checked above): set it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old", dir=root.parent))
            root.rename(old / root.name)
            tmp.rename(root)
            shutil.rmtree(old)
        else:
            tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write(out: Path, cfg: DemoDataConfig) -> None:
    """Write every split of the demo dataset into the (new, empty) folder `out`, the DONE stamp last."""
    probs = class_probs(cfg)
    categories = [{"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(cfg.num_classes)]
    next_image_id, next_ann_id = 1, 1
    for split_idx, (split, count_key) in enumerate(SPLITS):
        (out / split).mkdir()
        images, anns = [], []
        for i in range(getattr(cfg, count_key)):
            rng = np.random.default_rng([cfg.seed, split_idx, i])
            im, objects = _make_image(cfg, rng, probs)
            name = f"{i:06d}.jpg"
            im.save(out / split / name, quality=92)
            images.append({"id": next_image_id, "file_name": name, "width": im.width, "height": im.height})
            for box, k in objects:
                x1, y1, x2, y2 = (round(float(v), 2) for v in box)
                anns.append({"id": next_ann_id, "image_id": next_image_id, "category_id": k + 1,
                             "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                             "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0})
                next_ann_id += 1
            next_image_id += 1
        (out / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": categories}))
    (out / STAMP).write_text(_stamp(cfg))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def body() -> None:
        print(f"demo dataset written to {generate(args.out_dir, DemoDataConfig(seed=args.seed))}")

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
