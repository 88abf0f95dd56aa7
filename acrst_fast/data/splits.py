"""COCO-standard and COCO-additional splits, written as files.

COCO-standard: `percent` % of the images of a COCO instances json are labeled, the rest are the
unlabeled stream (their annotations stay in the unlabeled json as hidden ground truth, for
pseudo-label metrics; the trainer never reads them as targets). Two ways to choose, both a
function of (json contents, percent, fold) alone, so every rank and machine picks the same images:

- `published` (default): the fold file the literature's COCO-standard numbers use
  (`coco_folds/COCO_supervision.txt`, from Unbiased Teacher, MIT; see its README), percents 0.01,
  0.1, 0.5, 1, 2, 5, 10 and folds 0 to 9. Its indices point into the json's images sorted by id
  after dropping those without a non-crowd annotation (n = 117266 for train2017); a fold lists
  int(percent / 100 * n) of them. The unlabeled set is the rest of that list. A split made this way
  is comparable with published numbers.
- `generator`: round(percent % of all images), permuted by a generator seeded with the fold (for
  other datasets, or percents the file does not hold). A fold file of the same format can be named
  instead of `published`.

COCO-additional: the whole train json is labeled; the unlabeled stream is an image-only json
listing a folder (unlabeled2017).

    python -m acrst_fast.data.splits standard ANNOTATIONS.json --percent 1 --fold 1 --out DIR [--folds published|generator|FILE]
    python -m acrst_fast.data.splits additional UNLABELED_DIR --out unlabeled.json
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from acrst_fast.data.coco import IMAGE_SUFFIXES, DataError, check_fields, read_json
from acrst_fast.errors import cli_main
from acrst_fast.safe_io import atomic_write_text, new_output_file


PUBLISHED_FOLDS = Path(__file__).resolve().parent / "coco_folds" / "COCO_supervision.txt"


def standard_split_paths(json_path: str | Path, percent: float, fold: int, out_dir: str | Path,
                         folds: str = "published") -> tuple[Path, Path]:
    stem = Path(json_path).stem
    source = "" if folds == "generator" else "published_" if folds == "published" else f"{Path(folds).stem}_"
    tag = f"{percent:g}p_{source}fold{fold}"
    out_dir = Path(out_dir)
    return out_dir / f"{stem}.{tag}.labeled.json", out_dir / f"{stem}.{tag}.unlabeled.json"


def choose_labeled(image_ids: list[int], percent: float, fold: int) -> set[int]:
    """The generator's labeled image ids: round(percent % of N) of them (at least 1), fixed by `fold`."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    ids = np.array(sorted(image_ids), dtype=np.int64)
    n = max(1, int(round(len(ids) * percent / 100.0)))
    order = np.random.default_rng(fold).permutation(len(ids))
    return {int(i) for i in ids[order[:n]]}


def indexed_images(data: dict) -> list[int]:
    """The image ids a fold file's indices point into: sorted by id, without the images that have no
    annotation with iscrowd == 0."""
    annotated = {a.get("image_id") for a in data.get("annotations", []) if not a.get("iscrowd", 0)}
    return sorted(im["id"] for im in data["images"] if im["id"] in annotated)


def _read_folds(path: Path) -> dict:
    """A fold file: JSON {percent: {fold: [index, ...]}}; a DataError naming the file otherwise."""
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: fold file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a fold file (not JSON: {exc})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise DataError(f"{path}: not a fold file ({{percent: {{fold: [index, ...]}}}} expected)")
    return table


def choose_published(data: dict, percent: float, fold: int, folds_path: str | Path,
                     json_path: str | Path) -> tuple[set[int], list[int]]:
    """(labeled image ids, the indexed images) of fold `fold` at `percent` of a fold file. A percent or
    fold the file lacks, or a fold made for another image count, is a DataError naming both files."""
    folds_path = Path(folds_path)
    table = _read_folds(folds_path)
    key = str(float(percent))
    if key not in table:
        raise DataError(f"{folds_path}: no {percent:g} % folds (it holds {', '.join(sorted(table, key=float))} %); "
                        "use data.split_folds=generator (or --folds generator) for other percents")
    if str(fold) not in table[key]:
        raise DataError(f"{folds_path}: no fold {fold} at {percent:g} % (folds {', '.join(sorted(table[key], key=int))})")
    indices = table[key][str(fold)]
    ids = indexed_images(data)
    if len(indices) != int(percent / 100 * len(ids)) or (indices and not 0 <= min(indices) <= max(indices) < len(ids)):
        raise DataError(f"{json_path}: has {len(ids)} images with a non-crowd annotation, but fold {fold} at "
                        f"{percent:g} % of {folds_path.name} lists {len(indices)} indices (int({percent:g} / 100 * n) "
                        "for another n): the fold file was made for another annotation file (instances_train2017)")
    return {ids[i] for i in indices}, ids


def _write_split_file(obj: dict, path: Path) -> None:
    """Write a split file; one already there is kept if it holds exactly this split, else it is an error
    (a split file is deterministic in its name, so another content is not ours to replace)."""
    text = json.dumps(obj)
    if path.exists():
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
            return
        raise DataError(f"{path}: exists with other content than this split; remove it or choose another --out")
    atomic_write_text(path, text)


def write_standard_split(json_path: str | Path, percent: float, fold: int, out_dir: str | Path,
                         folds: str = "published") -> tuple[Path, Path]:
    """Write the labeled and unlabeled jsons of a COCO-standard split (skipped if both exist). `folds`:
    "published" (the shipped fold file), "generator", or the path of a fold file."""
    lab_path, unl_path = standard_split_paths(json_path, percent, fold, out_dir, folds)
    if lab_path.is_file() and unl_path.is_file():
        return lab_path, unl_path
    data = read_json(json_path)
    check_fields(json_path, data)  # every field read below, named by record when it is wrong
    if not data["images"]:
        raise DataError(f"{json_path}: no images to split")
    if folds == "generator":
        labeled = choose_labeled([im["id"] for im in data["images"]], percent, fold)
        pool = {im["id"] for im in data["images"]}
    else:
        labeled, indexed = choose_published(data, percent, fold, PUBLISHED_FOLDS if folds == "published" else folds,
                                            json_path)
        pool = set(indexed)  # images without a non-crowd annotation are in neither part
    common = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    anns = data.get("annotations", [])
    parts = {}
    for name, keep in (("labeled", True), ("unlabeled", False)):
        ids = {i for i in pool if (i in labeled) == keep}
        parts[name] = dict(common, images=[im for im in data["images"] if im["id"] in ids],
                           annotations=[a for a in anns if a.get("image_id") in ids])
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    _write_split_file(parts["labeled"], lab_path)
    _write_split_file(parts["unlabeled"], unl_path)
    return lab_path, unl_path


def write_folder_json(image_dir: str | Path, out_path: str | Path) -> Path:
    """Image-only COCO json listing every image in `image_dir` (sizes read from the file headers)."""
    from PIL import Image

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    out_path = new_output_file(out_path, "--out")
    images = []
    for i, name in enumerate(sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_SUFFIXES))):
        try:
            with Image.open(image_dir / name) as im:
                w, h = im.size
        except OSError as exc:
            raise DataError(f"{image_dir / name}: cannot read image header: {exc}") from None
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    if not images:
        raise DataError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)}); nothing written")
    atomic_write_text(out_path, json.dumps({"images": images, "annotations": []}))
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("standard")
    s.add_argument("json")
    s.add_argument("--percent", type=float, required=True)
    s.add_argument("--fold", type=int, default=1, help="published folds: 0 to 9 (the literature's default: 1)")
    s.add_argument("--folds", default="published",
                   help="published (the shipped COCO-standard fold file), generator, or a fold file's path")
    s.add_argument("--out", required=True)
    a = sub.add_parser("additional")
    a.add_argument("image_dir")
    a.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> None:
        if args.cmd == "standard":
            if not 0 < args.percent <= 100:
                raise DataError(f"--percent must be in (0, 100], got {args.percent:g}")
            if args.fold < 0:
                raise DataError(f"--fold must be >= 0, got {args.fold}")
            for p in write_standard_split(args.json, args.percent, args.fold, args.out, args.folds):
                print(p)
        else:
            print(write_folder_json(args.image_dir, args.out))

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
