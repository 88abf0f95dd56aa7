"""Pascal VOC XML -> COCO json, for the VOC07+12 protocol.

Labeled: VOC2007 trainval; unlabeled: VOC2012 trainval; test: VOC2007 test.
    python -m acrst_fast.data.voc VOC_ROOT --year 2007 --split trainval --out voc07_trainval.json
`file_name`s are relative to VOC_ROOT (e.g. `VOC2007/JPEGImages/000005.jpg`), so all three jsons
share one image root. VOC pixel coordinates are 1-based inclusive: x1 - 1, y1 - 1, x2, y2 become
the COCO box. `difficult` objects are kept as training boxes; in a test json they become
`iscrowd=1` so COCO evaluation ignores them, as VOC evaluation does.
"""
from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from acrst_fast.data.coco import DataError
from acrst_fast.errors import cli_main
from acrst_fast.safe_io import atomic_write_text, new_output_file

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def _text(node: ET.Element, tag: str, xml_path: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(f"{xml_path}: missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml_path: Path) -> float:
    text = _text(node, tag, xml_path)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{xml_path}: <{tag}> is not a number: {text!r}") from None


def convert(voc_root: str | Path, year: str, split: str, difficult_as_crowd: bool | None = None) -> dict:
    """COCO dict for VOC{year}/ImageSets/Main/{split}.txt. difficult_as_crowd defaults to (split == 'test')."""
    voc_root = Path(voc_root)
    base = voc_root / f"VOC{year}"
    list_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: image list not found")
    if difficult_as_crowd is None:
        difficult_as_crowd = split == "test"
    cat_id = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    images, anns = [], []
    names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
    for image_id, name in enumerate(names, start=1):
        xml_path = base / "Annotations" / f"{name}.xml"
        if not xml_path.is_file():
            raise DataError(f"{list_file}: image {name}: annotation file not found: {xml_path}")
        try:
            root = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            raise DataError(f"{xml_path}: not valid XML ({exc})") from None
        size = root.find("size")
        if size is None:
            raise DataError(f"{xml_path}: missing <size>")
        w, h = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))
        images.append({"id": image_id, "file_name": os.path.join(f"VOC{year}", "JPEGImages", f"{name}.jpg"),
                       "width": w, "height": h})
        for k, obj in enumerate(root.findall("object")):
            cls = _text(obj, "name", xml_path)
            if cls not in cat_id:
                raise DataError(f"{xml_path}: object {k}: unknown class {cls!r} (not one of the 20 VOC classes)")
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(f"{xml_path}: object {k} ({cls}): missing <bndbox>")
            x1, y1 = _number(bb, "xmin", xml_path) - 1, _number(bb, "ymin", xml_path) - 1
            x2, y2 = _number(bb, "xmax", xml_path), _number(bb, "ymax", xml_path)
            if x2 <= x1 or y2 <= y1:
                raise DataError(f"{xml_path}: object {k} ({cls}): empty or inverted box {[x1 + 1, y1 + 1, x2, y2]}")
            diff_node = obj.find("difficult")
            difficult = diff_node is not None and diff_node.text is not None and diff_node.text.strip() == "1"
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[cls],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": int(difficult and difficult_as_crowd), "difficult": int(difficult)})
    categories = [{"id": i, "name": n, "supercategory": "voc"} for n, i in cat_id.items()]
    return {"images": images, "annotations": anns, "categories": categories}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("voc_root")
    ap.add_argument("--year", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> None:
        out = new_output_file(args.out, "--out")
        data = convert(args.voc_root, args.year, args.split)
        atomic_write_text(out, json.dumps(data))
        print(f"{out}: {len(data['images'])} images, {len(data['annotations'])} boxes")

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
