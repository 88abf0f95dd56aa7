"""COCO-format datasets: read, validate, decode.

Boxes leave this module as float32 (x1, y1, x2, y2) in absolute pixels of the original image.
Labels are contiguous 1..K (0 is torchvision's background), in the order of the category ids
of the reference json (the labeled training json); `category_ids[label - 1]` maps back.

What is accepted and what is rejected:
- an image with no annotations: valid (all of its pixels are background);
- an image-only json (no `categories`, no `annotations`): a valid unlabeled set;
- `iscrowd=1` boxes: kept out of training targets (pycocotools still uses them in evaluation);
- zero-width/height boxes, and boxes entirely outside their image: kept out of training
  targets, counted, reported once per file;
- boxes sticking out of the image: clipped to it;
- categories without any box in the labeled json (a Roboflow export's placeholder category 0,
  say): reported at load time;
- rejected with `DataError` naming the file and the record: a file that is not UTF-8 or not
  JSON, a section of the wrong container type, a field of the wrong type or null (every field
  of `images`, `annotations` and `categories` that is read), negative or non-finite box sizes,
  duplicate image, annotation or category ids, a category id not in `categories`, an annotation
  of an unknown image id, a missing image file, an image that cannot be decoded.
- EXIF orientation is ignored: pixels are used as stored, and the json's width/height (and its
  boxes) describe them, as in COCO itself. DALI decodes the same way (`adjust_orientation=False`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from acrst_fast.errors import UserError

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); JSON files must be UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (the top level is a {type(data).__name__}, not an object)")
    if not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO instances file (no 'images' list)")
    for section in ("annotations", "categories"):
        if section in data and not isinstance(data[section], list):
            raise DataError(f"{path}: '{section}' must be a list, got {type(data[section]).__name__}")
    return data


def read_categories(path: str | Path, data: dict | None = None) -> Categories:
    data = read_json(path) if data is None else data
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{path}: no 'categories' list")
    seen: dict[int, str] = {}
    for i, c in enumerate(cats):
        if not isinstance(c, dict):
            raise DataError(f"{path}: categories[{i}]: must be an object, got {type(c).__name__}")
        if not _is_int(c.get("id")):
            raise DataError(f"{path}: categories[{i}]: 'id' must be an integer, got {c.get('id')!r}")
        if "name" in c and not isinstance(c["name"], str):
            raise DataError(f"{path}: categories[{i}] (id {c['id']}): 'name' must be a string, got {c['name']!r}")
        if c["id"] in seen:
            raise DataError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        seen[c["id"]] = c.get("name", str(c["id"]))
    ids = tuple(sorted(seen))
    return Categories(ids=ids, names=tuple(seen[i] for i in ids))


def _check_image(json_path: Path, i: int, img) -> None:
    if not isinstance(img, dict):
        raise DataError(f"{json_path}: images[{i}]: must be an object, got {type(img).__name__}")
    if not _is_int(img.get("id")):
        raise DataError(f"{json_path}: images[{i}]: 'id' must be an integer, got {img.get('id')!r}")
    where = f"{json_path}: image id {img['id']}"
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'file_name' must be a non-empty string, got {name!r}")
    for key in ("width", "height"):
        if key in img and not (_is_int(img[key]) and img[key] > 0):
            raise DataError(f"{where}: '{key}' must be a positive integer, got {img[key]!r}")


def _check_annotation(where: str, ann) -> tuple[float, float, float, float]:
    """The annotation's bbox (x, y, w, h) after its fields are type-checked."""
    for key in ("image_id", "category_id"):
        if not _is_int(ann.get(key)):
            raise DataError(f"{where}: '{key}' must be an integer, got {ann.get(key)!r}")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
    if not all(math.isfinite(v) for v in bbox):
        raise DataError(f"{where}: bbox has a non-finite value: {bbox!r}")
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DataError(f"{where}: bbox has negative width or height: {bbox!r}")
    return x, y, w, h


def load_coco_records(
    json_path: str | Path,
    image_dir: str | Path,
    categories: Categories | None = None,
    with_boxes: bool = True,
    check_files: bool = True,
) -> tuple[list[ImageRecord], Categories]:
    """Read a COCO instances json into validated records.

    categories: the label mapping to use (from the labeled training json). When given, the
        file's own categories must hold the same ids; a file without `categories` (an image-only
        unlabeled json) is fine. When None, the file's own are used, and categories without any
        box are reported.
    with_boxes: False for unlabeled data: annotations are ignored (hidden ground truth).
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    has_cats = bool(data.get("categories"))  # an empty list, like none, means: the reference categories
    own = read_categories(json_path, data) if has_cats or categories is None else None
    if categories is None:
        categories = own
    elif own is not None and set(own.ids) != set(categories.ids):
        missing = sorted(set(categories.ids) ^ set(own.ids))[:5]
        raise DataError(f"{json_path}: categories differ from the training set's (ids {missing} ...)")
    images = _read_images(json_path, data)
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    if with_boxes:
        boxes_per_category = _read_annotations(json_path, data, images, categories, per_image)
        if own is not None and categories is own:
            _warn_empty_categories(json_path, categories, boxes_per_category)
    image_dir = Path(image_dir)
    return [_record(json_path, image_dir, image_id, images[image_id], per_image[image_id], check_files)
            for image_id in sorted(images)], categories


def check_fields(json_path: str | Path, data: dict) -> None:
    """The fields the split tools read, checked as `load_coco_records` checks them: every image (an object
    with an integer `id`, no duplicate, a `file_name`) and every annotation (an object with integer
    `image_id` and `category_id`, a bbox, `iscrowd` 0 or 1, an `image_id` among the images). A DataError
    naming the file, the record and the problem."""
    json_path = Path(json_path)
    images = _read_images(json_path, data)
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            raise DataError(f"{json_path}: annotations[{i}]: must be an object, got {type(ann).__name__}")
        where = f"{json_path}: annotation id {ann.get('id', f'#{i}')}"
        _check_annotation(where, ann)
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")


def _read_images(json_path: Path, data: dict) -> dict[int, dict]:
    """The json's images by id, each checked (`_check_image`); a duplicate id is a DataError."""
    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        _check_image(json_path, i, img)
        if img["id"] in images:
            raise DataError(f"{json_path}: images[{i}]: duplicate image id {img['id']}")
        images[img["id"]] = img
    return images


def _read_annotations(json_path: Path, data: dict, images: dict[int, dict], categories: Categories,
                      per_image: dict[int, list]) -> dict[int, int]:
    """Check every annotation and append the trainable ones to `per_image[image_id]` as ([x1, y1, x2, y2],
    label). Crowd boxes, zero-area boxes and boxes entirely outside their image are left out (the last
    two with a warning). Returns the boxes per category id."""
    degenerate, outside, ann_ids = [], [], set()
    boxes_per_category = {cid: 0 for cid in categories.ids}
    label_of = categories.label_of()
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            raise DataError(f"{json_path}: annotations[{i}]: must be an object, got {type(ann).__name__}")
        where = f"{json_path}: annotation id {ann.get('id', f'#{i}')}"
        if "id" in ann:
            if not _is_int(ann["id"]):
                raise DataError(f"{json_path}: annotations[{i}]: 'id' must be an integer, got {ann['id']!r}")
            if ann["id"] in ann_ids:
                raise DataError(f"{where}: duplicate annotation id")
            ann_ids.add(ann["id"])
        x, y, w, h = _check_annotation(where, ann)
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in label_of:
            raise DataError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
        boxes_per_category[ann["category_id"]] += 1
        if ann.get("iscrowd", 0):
            continue
        if w == 0 or h == 0:
            degenerate.append(ann.get("id", i))
            continue
        img = images[ann["image_id"]]
        iw, ih = img.get("width", 0), img.get("height", 0)
        if iw and ih and (x >= iw or y >= ih or x + w <= 0 or y + h <= 0):
            outside.append(ann.get("id", i))
            continue
        per_image[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))
    if degenerate:
        log.warning("%s: %d zero-area boxes kept out of training targets (first: annotation id %s)",
                    json_path, len(degenerate), degenerate[0])
    if outside:
        log.warning("%s: %d boxes lie entirely outside their image, kept out of training targets "
                    "(first: annotation id %s)", json_path, len(outside), outside[0])
    return boxes_per_category


def _warn_empty_categories(json_path: Path, categories: Categories, boxes_per_category: dict[int, int]) -> None:
    empty = [f"{cid} {name!r}" for cid, name in zip(categories.ids, categories.names) if not boxes_per_category[cid]]
    if empty:
        log.warning("%s: %d of %d categories have no box in this file: %s%s (a placeholder category? it is "
                    "trained as a class without examples)", json_path, len(empty), len(categories.ids),
                    ", ".join(empty[:5]), " ..." if len(empty) > 5 else "")


def _record(json_path: Path, image_dir: Path, image_id: int, img: dict, anns: list, check_files: bool) -> ImageRecord:
    """One image's record; boxes clipped to the image (those clipped to nothing dropped)."""
    path = image_dir / img["file_name"]
    if check_files and not path.is_file():
        raise DataError(f"{json_path}: image id {image_id}: image file not found: {path}")
    w, h = img.get("width", 0), img.get("height", 0)
    boxes = np.array([a[0] for a in anns], dtype=np.float32).reshape(-1, 4)
    if len(boxes) and w > 0 and h > 0:
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, anns = boxes[keep], [a for a, k in zip(anns, keep) if k]
    labels = np.array([a[1] for a in anns], dtype=np.int64)
    return ImageRecord(image_id, str(path), w, h, boxes, labels)


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
