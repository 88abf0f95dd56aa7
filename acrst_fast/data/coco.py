"""COCO-format datasets: read, validate, decode.

Boxes leave this module as float32 (x1, y1, x2, y2) in absolute pixels of the original image.
Labels are contiguous 1..K (0 is torchvision's background), in the order of the category ids
of the reference json (the labeled training json); `category_ids[label - 1]` maps back.

What is accepted and what is rejected:
- an image with no annotations: valid (all of its pixels are background);
- `iscrowd=1` boxes: kept out of training targets (pycocotools still uses them in evaluation);
- zero-width/height boxes: kept out of training targets, counted, reported once per file;
- boxes sticking out of the image: clipped to it;
- rejected with `DataError` naming the file and the record: invalid JSON, missing sections,
  negative or non-finite width/height, a category id not in `categories`, an annotation of an
  unknown image id, a missing image file, an image that cannot be decoded (truncated, corrupt).
"""
from __future__ import annotations

from acrst_fast.errors import UserError

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(UserError):
    """Bad input data. The message names the file, the record and the problem."""


@dataclass(frozen=True)
class ImageRecord:
    """One image. boxes (float32[N, 4]): (x1, y1, x2, y2), absolute pixels; labels (int64[N]): 1..K."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Categories:
    """Category ids and names of a dataset, in label order (label k <-> ids[k - 1])."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def label_of(self) -> dict[int, int]:
        return {cid: i + 1 for i, cid in enumerate(self.ids)}


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no 'images' list)")
    return data


def read_categories(path: str | Path, data: dict | None = None) -> Categories:
    data = read_json(path) if data is None else data
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{path}: no 'categories' list")
    seen: dict[int, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DataError(f"{path}: categories[{i}]: needs an integer 'id'")
        if c["id"] in seen:
            raise DataError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        seen[c["id"]] = str(c.get("name", c["id"]))
    ids = tuple(sorted(seen))
    return Categories(ids=ids, names=tuple(seen[i] for i in ids))


def load_coco_records(
    json_path: str | Path,
    image_dir: str | Path,
    categories: Categories | None = None,
    with_boxes: bool = True,
    check_files: bool = True,
) -> tuple[list[ImageRecord], Categories]:
    """Read a COCO instances json into validated records.

    categories: the label mapping to use (from the labeled training json). When given, the
        file's own categories must hold the same ids. When None, the file's own are used.
    with_boxes: False for unlabeled data: annotations are ignored (hidden ground truth).
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    own = read_categories(json_path, data) if (with_boxes or "categories" in data) else None
    if categories is None:
        if own is None:
            raise DataError(f"{json_path}: no 'categories' list")
        categories = own
    elif own is not None and set(own.ids) != set(categories.ids):
        missing = sorted(set(categories.ids) ^ set(own.ids))[:5]
        raise DataError(f"{json_path}: categories differ from the training set's (ids {missing} ...)")

    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or "file_name" not in img:
            raise DataError(f"{json_path}: images[{i}]: needs an integer 'id' and a 'file_name'")
        if img["id"] in images:
            raise DataError(f"{json_path}: images[{i}]: duplicate image id {img['id']}")
        images[img["id"]] = img

    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    degenerate = []
    if with_boxes:
        label_of = categories.label_of()
        for i, ann in enumerate(data.get("annotations", [])):
            where = f"{json_path}: annotation id {ann.get('id', f'#{i}')}"
            if ann.get("image_id") not in images:
                raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
            if ann.get("category_id") not in label_of:
                raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise DataError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
                raise DataError(f"{where}: bbox has a non-finite value: {bbox!r}")
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                raise DataError(f"{where}: bbox has negative width or height: {bbox!r}")
            if ann.get("iscrowd", 0):
                continue
            if w == 0 or h == 0:
                degenerate.append(ann.get("id", i))
                continue
            per_image[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))
    if degenerate:
        log.warning("%s: %d zero-area boxes kept out of training targets (first: annotation id %s)",
                    json_path, len(degenerate), degenerate[0])

    image_dir = Path(image_dir)
    records = []
    for image_id in sorted(images):
        img = images[image_id]
        path = image_dir / img["file_name"]
        if check_files and not path.is_file():
            raise DataError(f"{json_path}: image id {image_id}: image file not found: {path}")
        w, h = int(img.get("width", 0)), int(img.get("height", 0))
        anns = per_image[image_id]
        boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
        if len(boxes) and w > 0 and h > 0:
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, anns = boxes[keep], [a for a, k in zip(anns, keep) if k]
        labels = np.array([a[1] for a in anns], dtype=np.int64)
        records.append(ImageRecord(image_id, str(path), w, h, boxes, labels))
    return records, categories


def load_folder_records(image_dir: str | Path, first_id: int = 1) -> list[ImageRecord]:
    """Image-only records for every image file in a folder (COCO-additional's unlabeled2017)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: unlabeled image folder not found")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DataError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the unlabeled folder")
    empty_b, empty_l = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    return [ImageRecord(first_id + i, str(image_dir / n), 0, 0, empty_b, empty_l) for i, n in enumerate(names)]


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image. 16-bit grayscale (PNG `I;16`, or `I`) is scaled to 8 bit
    as round(v * 255 / 65535), as DALI's decoder does, instead of PIL's saturating conversion."""
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im).astype(np.int64)
        gray = ((arr.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return im.convert("RGB")


def decode_image(record: ImageRecord) -> torch.Tensor:
    """Decode to uint8 Tensor[3, H, W] (RGB). Grayscale/CMYK/alpha images are converted to RGB;
    16-bit grayscale is scaled to 8 bit (`to_rgb8`).

    Raises DataError naming the file and image id if the file is missing, truncated or corrupt,
    or if its size disagrees with the json's width/height.
    """
    where = f"{record.path} (image id {record.image_id})"
    try:
        with Image.open(record.path) as im:
            im.load()
            rgb = to_rgb8(im)
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode image: {exc}") from None
    if record.width and record.height and (rgb.width, rgb.height) != (record.width, record.height):
        raise DataError(f"{where}: image is {rgb.width}x{rgb.height} but the json says "
                        f"{record.width}x{record.height}")
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
