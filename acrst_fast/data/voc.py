"""Pascal VOC XML -> COCO json, for the VOC07+12 protocol.

Labeled: VOC2007 trainval; unlabeled: VOC2012 trainval; test: VOC2007 test.
    python -m acrst_fast.data.voc VOC_ROOT --year 2007 --split trainval --classes voc --out voc07_trainval.json
Custom VOC-format datasets: `--classes a,b,c` (or a file, one name a line), or no --classes to take
the classes named in the XML files (sorted, printed); no --split to convert every XML file.
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


def _names(base: Path, split: str | None) -> tuple[list[str], str]:
    """Image names of `split` (ImageSets/Main/{split}.txt), or of every XML in Annotations/ when None."""
    if split is None:
        ann_dir = base / "Annotations"
        if not ann_dir.is_dir():
            raise DataError(f"{ann_dir}: annotation folder not found")
        names = sorted(p.stem for p in ann_dir.iterdir() if p.suffix.lower() == ".xml")
        if not names:
            raise DataError(f"{ann_dir}: no .xml files")
        return names, str(ann_dir)
    list_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: image list not found")
    return [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()], str(list_file)


def _parse(base: Path, names: list[str], source: str) -> list[tuple[str, ET.Element, Path]]:
    out = []
    for name in names:
        xml_path = base / "Annotations" / f"{name}.xml"
        if not xml_path.is_file():
            raise DataError(f"{source}: image {name}: annotation file not found: {xml_path}")
        try:
            out.append((name, ET.parse(xml_path).getroot(), xml_path))
        except ET.ParseError as exc:
            raise DataError(f"{xml_path}: not valid XML ({exc})") from None
    return out


def infer_classes(parsed: list[tuple[str, ET.Element, Path]]) -> tuple[str, ...]:
    """Every object class named in the XML files, sorted."""
    return tuple(sorted({_text(obj, "name", xml_path) for _, root, xml_path in parsed
                         for obj in root.findall("object")}))


def convert(voc_root: str | Path, year: str, split: str | None = None, difficult_as_crowd: bool | None = None,
            classes: tuple[str, ...] | list[str] | None = None, notes: list[str] | None = None) -> dict:
    """COCO dict for VOC{year}: the images of ImageSets/Main/{split}.txt, or every XML of Annotations/
    when `split` is None. `classes` (category ids 1..K in this order) defaults to the classes named in
    the XML files, sorted. difficult_as_crowd defaults to (split == 'test'). Boxes with xmin == xmax or
    ymin == ymax (degenerate: a point or a line) are left out, counted and reported in `notes`."""
    voc_root = Path(voc_root)
    base = voc_root / f"VOC{year}"
    names, source = _names(base, split)
    parsed = _parse(base, names, source)
    if difficult_as_crowd is None:
        difficult_as_crowd = split == "test"
    notes = notes if notes is not None else []
    if classes is None:
        classes = infer_classes(parsed)
        notes.append(f"classes inferred from the XML (sorted): {', '.join(classes)}")
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, anns, degenerate = [], [], []
    for image_id, (name, root, xml_path) in enumerate(parsed, start=1):
        size = root.find("size")
        if size is None:
            raise DataError(f"{xml_path}: missing <size>")
        w, h = int(_number(size, "width", xml_path)), int(_number(size, "height", xml_path))
        node = root.find("filename")
        file_name = node.text.strip() if node is not None and node.text and node.text.strip() else f"{name}.jpg"
        images.append({"id": image_id, "file_name": os.path.join(f"VOC{year}", "JPEGImages", file_name),
                       "width": w, "height": h})
        for k, obj in enumerate(root.findall("object")):
            cls = _text(obj, "name", xml_path)
            if cls not in cat_id:
                raise DataError(f"{xml_path}: object {k}: unknown class {cls!r} (not one of --classes: "
                                f"{', '.join(classes[:6])}{' ...' if len(classes) > 6 else ''})")
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(f"{xml_path}: object {k} ({cls}): missing <bndbox>")
            xmin, ymin = _number(bb, "xmin", xml_path), _number(bb, "ymin", xml_path)
            xmax, ymax = _number(bb, "xmax", xml_path), _number(bb, "ymax", xml_path)
            if xmax < xmin or ymax < ymin:
                raise DataError(f"{xml_path}: object {k} ({cls}): empty or inverted box {[xmin, ymin, xmax, ymax]}")
            if xmax == xmin or ymax == ymin:
                degenerate.append(f"{xml_path.name} object {k}")
                continue
            x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
            diff_node = obj.find("difficult")
            difficult = diff_node is not None and diff_node.text is not None and diff_node.text.strip() == "1"
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id[cls],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": int(difficult and difficult_as_crowd), "difficult": int(difficult)})
    if degenerate:
        notes.append(f"{len(degenerate)} degenerate boxes (xmin == xmax or ymin == ymax) left out "
                     f"(first: {degenerate[0]})")
    categories = [{"id": i, "name": n, "supercategory": "voc"} for n, i in cat_id.items()]
    return {"images": images, "annotations": anns, "categories": categories}


def read_classes(arg: str) -> tuple[str, ...]:
    """--classes: `voc` (the 20 VOC classes), a file with one class a line, or a comma-separated list."""
    if arg == "voc":
        return VOC_CLASSES
    path = Path(arg)
    names = path.read_text(encoding="utf-8").splitlines() if path.is_file() else arg.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names or len(set(names)) != len(names):
        raise DataError(f"--classes {arg!r}: needs distinct class names (a,b,c, a file of one name a line, or voc)")
    return tuple(names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("voc_root")
    ap.add_argument("--year", required=True, help="the folder VOC{YEAR} under VOC_ROOT")
    ap.add_argument("--split", default=None, help="ImageSets/Main/SPLIT.txt; default: every XML in Annotations/")
    ap.add_argument("--classes", default=None,
                    help="a,b,c | a file with one class a line | voc (the 20 VOC classes); default: the classes "
                         "named in the XML files, sorted")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> None:
        out = new_output_file(args.out, "--out")
        notes: list[str] = []
        classes = read_classes(args.classes) if args.classes else None
        data = convert(args.voc_root, args.year, args.split, classes=classes, notes=notes)
        atomic_write_text(out, json.dumps(data))
        for note in notes:
            print(note)
        print(f"{out}: {len(data['images'])} images, {len(data['annotations'])} boxes, "
              f"{len(data['categories'])} classes")

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
