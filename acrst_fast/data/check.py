"""Find bad images before training: a fast header check, and a full decode of every image.

`header_problems` opens each file's header (format, mode, size against the json) in threads; the
trainer runs it on every image at start-up, so a truncated, foreign or mis-sized file stops the
run (or is dropped, with `data.bad_images=skip`) before step 1 rather than at step 400. The
command decodes every image with a progress bar and lists every problem at once:

    python -m acrst_fast.data.check CONFIG [KEY=VALUE ...]

It exits 0 when every image decodes, 2 otherwise (one line per problem on stderr).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from acrst_fast.config import check_paths, config_argparser, load_config
from acrst_fast.data.coco import DataError, ImageRecord, decode_image
from acrst_fast.errors import cli_main

if TYPE_CHECKING:
    from acrst_fast.data.build import Datasets

FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "GIF", "TIFF", "MPO")
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L", "I;16B", "I;16N")


def header_problem(record: ImageRecord) -> str | None:
    """What is wrong with `record`'s file as far as its header tells (None if nothing), in one line."""
    where = f"{record.path} (image id {record.image_id})"
    try:
        with Image.open(record.path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except FileNotFoundError:
        return f"{where}: image file not found"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return f"{where}: not a readable image ({exc})"
    if fmt not in FORMATS:
        return f"{where}: unsupported image format {fmt} (supported: {', '.join(FORMATS)})"
    if mode not in MODES:
        return f"{where}: unsupported pixel mode {mode}"
    if record.width and record.height and (w, h) != (record.width, record.height):
        return f"{where}: image is {w}x{h} but the json says {record.width}x{record.height}"
    return None


def header_problems(records: list[ImageRecord], threads: int = 8) -> list[tuple[int, str]]:
    """(index into `records`, problem) for every record whose header check fails, in order."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = pool.map(header_problem, records, chunksize=64)
        return [(i, p) for i, p in enumerate(found) if p is not None]


def find_header_problems(datasets: Datasets, bad_images: str, threads: int = 8) -> dict[str, list[tuple[int, str]]]:
    """Header-check every image before training (`data.check.header_problems`): split -> [(index, problem)].

    bad_images `fail`: the first problem is a DataError that also counts the others. With `skip`,
    problems of labeled and unlabeled images are returned (`drop_bad_images` drops them); a
    validation image with a problem still fails, so evaluation always covers the whole set.
    """
    found = {}
    for split in ("labeled", "unlabeled", "val"):
        problems = header_problems(getattr(datasets, split), threads)
        if problems and (bad_images == "fail" or split == "val"):
            more = f"; {len(problems) - 1} more {split} images have problems" if len(problems) > 1 else ""
            raise DataError(f"{problems[0][1]}{more} (list them all: python -m acrst_fast.data.check CONFIG)")
        found[split] = problems
    return found


def drop_bad_images(datasets: Datasets, problems: dict[str, list[tuple[int, str]]]) -> tuple[Datasets, list[str]]:
    """`datasets` without the records `find_header_problems` listed, and one line per dropped image."""
    kept, dropped = {}, []
    for split, found in problems.items():
        bad = {i for i, _ in found}
        kept[split] = [r for i, r in enumerate(getattr(datasets, split)) if i not in bad]
        dropped += [f"{split}: {p}" for _, p in found]
    return dataclasses.replace(datasets, **kept), dropped


def decode_problems(records: list[ImageRecord], desc: str) -> list[str]:
    """Decode every image (header check first); one line per problem."""
    problems = []
    for rec in tqdm(records, desc=desc, unit="img", file=sys.stderr, mininterval=0.5):
        problem = header_problem(rec)
        if problem is None:
            try:
                decode_image(rec)
            except DataError as exc:
                problem = str(exc)
        if problem is not None:
            problems.append(problem)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = config_argparser("python -m acrst_fast.data.check", __doc__)
    args = ap.parse_intermixed_args(argv)

    def body() -> int:
        from acrst_fast.data.build import load_datasets, resolved_data

        cfg = load_config(args.config, args.overrides)
        data_cfg = resolved_data(cfg.data)
        check_paths(dataclasses.replace(cfg, data=data_cfg), args.config)
        datasets = load_datasets(data_cfg)
        problems, total = [], 0
        for split in ("labeled", "unlabeled", "val"):
            records = getattr(datasets, split)
            total += len(records)
            problems += decode_problems(records, split)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{total} images checked, {len(problems)} with problems", flush=True)
        return 2 if problems else 0

    return cli_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
