"""Ultralytics / Roboflow YOLO layout -> COCO json.

    python -m acrst_fast.data.yolo DATA_YAML --split train --out train.json

DATA_YAML is the dataset file those tools write: `path` (the root, relative to the file; default its
folder), `train` / `val` / `test` (a folder of images, a .txt list of image paths, or a list of
either, relative to the root) and `names` (a list, or a dict from class id to name; `nc`, if given,
must agree). Each image's labels are in the parallel `labels/` folder (the last `images` in its path
replaced by `labels`, the suffix by `.txt`), one box a line: `class cx cy w h`, normalised to [0, 1],
class ids 0-based into `names`; a polygon line (`class x1 y1 x2 y2 ...`, segmentation exports) becomes
its bounding box.

- Classes become categories 1..K in `names` order.
- Boxes are denormalised with each image's real size (read from its header; pixels as stored, like
  the engine's loader, so an image with an EXIF rotation is refused rather than mislabelled).
- An image without a label file, or with an empty one, is a valid image with no boxes.
- A malformed line (field count, a number, a class id, coordinates outside [0, 1]) is an error naming
  the file and the line.
- Roboflow exports can hold the same image twice under two names (`NAME_jpg.rf.HASH.jpg`): byte-identical
  copies with identical labels are kept once, and their number is printed. Copies that differ are kept.

`file_name`s are relative to the dataset root, which the command prints: the config's `*_images` folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import yaml
from PIL import Image

from acrst_fast.data.coco import DataError
from acrst_fast.errors import cli_main
from acrst_fast.safe_io import atomic_write_text, new_output_file

# what Ultralytics reads as images (wider than data/coco.py's folder scan: the loader decodes TIFF too, check.FORMATS)
IMAGE_SUFFIXES = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
_TOL = 1e-3  # normalised coordinates may overshoot [0, 1] by rounding in exports


def read_data_yaml(path: str | Path) -> tuple[Path, dict, list[str]]:
    """(dataset root, the yaml's mapping, class names in id order)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset yaml not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DataError(f"{path}: needs a mapping with 'names' (and train/val/test)")
    names = data["names"]
    if isinstance(names, dict):
        ids = sorted(names)
        if ids != list(range(len(ids))):
            raise DataError(f"{path}: 'names' ids must be 0..{len(ids) - 1}, got {ids}")
        names = [names[i] for i in ids]
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise DataError(f"{path}: 'names' must list distinct class names")
    if "nc" in data and int(data["nc"]) != len(names):
        raise DataError(f"{path}: nc is {data['nc']} but 'names' has {len(names)} classes")
    root = (path.parent / str(data.get("path") or ".")).resolve()
    return root, data, [str(n) for n in names]


def split_images(yaml_path: Path, root: Path, data: dict, split: str) -> list[Path]:
    """The images of `split`, sorted: from folders (recursively) and/or .txt lists of image paths."""
    if split not in data or data[split] in (None, ""):
        present = [s for s in ("train", "val", "test") if data.get(s)]
        raise DataError(f"{yaml_path}: no {split!r} split (it has {present})")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    images: list[Path] = []
    for entry in entries:
        where = root / str(entry)
        if where.is_dir():
            images += [p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif where.is_file() and where.suffix == ".txt":
            for n, line in enumerate(where.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    p = Path(line.strip())
                    p = p if p.is_absolute() else (root / p if not line.startswith("./") else where.parent / p)
                    if not p.is_file():
                        raise DataError(f"{where}: line {n}: image {line.strip()!r} not found")
                    images.append(p)
        else:
            raise DataError(f"{yaml_path}: {split} entry {entry!r}: {where} is neither a folder nor a .txt list")
    return sorted(set(images))


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_labels(path: Path, num_classes: int, width: int, height: int) -> list[list[float]]:
    """[[class_id (0-based), x1, y1, w, h] ...] in pixels from one label file (none: no boxes)."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}: line {n}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DataError(f"{where}: {len(fields)} fields; a box line is 'class cx cy w h' (5), a polygon "
                            "'class x1 y1 x2 y2 ...' (an odd number, 7 or more)")
        try:
            cls, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{where}: not numbers: {line.strip()!r}") from None
        if not 0 <= cls < num_classes:
            raise DataError(f"{where}: class id {cls} outside 0..{num_classes - 1} (the yaml's names)")
        if any(not (-_TOL <= v <= 1 + _TOL) for v in values):
            raise DataError(f"{where}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if len(values) == 4:
            cx, cy, w, h = values
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = values[0::2], values[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        x1, y1 = max(0.0, x1) * width, max(0.0, y1) * height
        x2, y2 = min(1.0, x2) * width, min(1.0, y2) * height
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"{where}: empty box (zero width or height): {line.strip()!r}")
        out.append([cls, x1, y1, x2 - x1, y2 - y1])
    return out


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as stored; an EXIF rotation or mirror is refused (the loader ignores EXIF)."""
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            size = im.size
    except OSError as exc:
        raise DataError(f"{path}: cannot read the image ({exc})") from None
    if orientation not in (1, None):
        raise DataError(f"{path}: EXIF orientation {orientation}: YOLO labels follow the rotated image, the "
                        "loader uses pixels as stored; save the image upright (e.g. PIL ImageOps.exif_transpose)")
    return size


def roboflow_key(path: Path) -> str:
    """The original name a Roboflow export derives its file names from (`NAME_jpg.rf.HASH.jpg` -> NAME_jpg)."""
    return path.name.split(".rf.")[0] if ".rf." in path.name else path.name


def convert(data_yaml: str | Path, split: str, notes: list[str] | None = None) -> dict:
    """COCO json dict of one split (see the module doc); `notes` receives what was left out and why."""
    notes = notes if notes is not None else []
    root, data, names = read_data_yaml(data_yaml)
    images, anns, kept = [], [], {}
    duplicates = 0
    for path in split_images(Path(data_yaml), root, data, split):
        width, height = image_size(path)
        boxes = parse_labels(label_path(path), len(names), width, height)
        digest = (hashlib.sha1(path.read_bytes()).hexdigest(), json.dumps(boxes))
        if kept.get(roboflow_key(path)) == digest:
            duplicates += 1
            continue
        kept.setdefault(roboflow_key(path), digest)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": path.relative_to(root).as_posix() if path.is_relative_to(root)
                       else str(path), "width": width, "height": height})
        for cls, x, y, w, h in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
    if not images:
        raise DataError(f"{data_yaml}: split {split!r} has no images")
    if duplicates:
        notes.append(f"{duplicates} duplicate copies (Roboflow: same image and labels under another name) kept once")
    categories = [{"id": i + 1, "name": n, "supercategory": "yolo"} for i, n in enumerate(names)]
    return {"images": images, "annotations": anns, "categories": categories}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_yaml")
    ap.add_argument("--split", required=True, help="train | val | test (a key of the yaml)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> None:
        out = new_output_file(args.out, "--out")
        notes: list[str] = []
        data = convert(args.data_yaml, args.split, notes)
        atomic_write_text(out, json.dumps(data))
        for note in notes:
            print(note)
        root, _, _ = read_data_yaml(args.data_yaml)
        print(f"{out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
              f"{len(data['categories'])} classes; image root (the config's *_images): {root}")

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
