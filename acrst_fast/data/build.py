"""From a config to validated records: prepares generated data (demo, splits) and reads it.

`prepare_data` runs on rank 0 only (it writes files); `load_datasets` runs on every rank and
only reads, so all ranks see identical records.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from acrst_fast.config import Config, DataConfig
from acrst_fast.data.coco import Categories, ImageRecord, load_coco_records, load_folder_records
from acrst_fast.data.demo import generate
from acrst_fast.data.splits import standard_split_paths, write_standard_split


@dataclass(frozen=True)
class Datasets:
    labeled: list[ImageRecord]
    unlabeled: list[ImageRecord]
    val: list[ImageRecord]
    categories: Categories


def resolved_data(d: DataConfig) -> DataConfig:
    """The data config with COCO-standard split files in place of the full train json."""
    if d.split_percent <= 0:
        return d
    split_dir = d.split_dir or str(Path(d.train_json).parent / "splits")
    lab, unl = standard_split_paths(d.train_json, d.split_percent, d.split_fold, split_dir, d.split_folds)
    return dataclasses.replace(d, train_json=str(lab), unlabeled_json=str(unl),
                               unlabeled_images=d.unlabeled_images or d.train_images, split_percent=0.0)


def prepare_data(cfg: Config) -> None:
    """Write what the config asks to generate: the demo dataset, a COCO-standard split. Rank 0 only."""
    d = cfg.data
    if d.demo is not None:
        generate(Path(d.train_json).parent, d.demo)
    if d.split_percent > 0:
        split_dir = d.split_dir or str(Path(d.train_json).parent / "splits")
        write_standard_split(d.train_json, d.split_percent, d.split_fold, split_dir, d.split_folds)


def load_datasets(d: DataConfig) -> Datasets:
    """Read and validate labeled, unlabeled and validation records (`d` as given by `resolved_data`)."""
    labeled, categories = load_coco_records(d.train_json, d.train_images)
    if d.unlabeled_json:  # its boxes, if any, are hidden ground truth: pseudo-label metrics only, never targets
        unlabeled, _ = load_coco_records(d.unlabeled_json, d.unlabeled_images or d.train_images, categories)
    elif d.unlabeled_images:
        unlabeled = load_folder_records(d.unlabeled_images)
    else:
        unlabeled = []
    val, _ = load_coco_records(d.val_json, d.val_images, categories)
    return Datasets(labeled, unlabeled, val, categories)
