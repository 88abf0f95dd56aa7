"""YAML -> frozen, typed, validated config dataclasses.

Load with `load_config(path, overrides)`. A config file may name base files with `_base_`
(a path or list of paths, relative to the file); keys of the file override its bases.
Overrides are dotted `key=value` strings whose value is parsed as YAML
(`solver.lr=0.02`, `data.scales=[128,160]`). Every error is a `ConfigError` naming the file
and the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names the file and the dotted key."""


@dataclass(frozen=True)
class DemoDataConfig:
    """Parameters of the embedded demo dataset generator (acrst_fast.data.demo)."""

    num_labeled: int = 64
    num_unlabeled: int = 256
    num_val: int = 64
    image_size: int = 160
    num_classes: int = 6
    # class k's share of objects is proportional to (k + 1) ** -imbalance (long tail, paper Fig. 1)
    imbalance: float = 1.5
    max_objects: int = 5
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the data is. Paths are relative to the working directory.

    Labeled: `train_json` + `train_images`, or, with `split_percent` > 0, a COCO-standard split of
    them (written to `split_dir`, labeled part trains, the rest is the unlabeled stream).
    Unlabeled: `unlabeled_json` (COCO json whose annotations, if any, are never trained on) and/or
    `unlabeled_images` (a folder of images; COCO-additional's unlabeled2017).
    """

    train_json: str = ""
    train_images: str = ""
    val_json: str = ""
    val_images: str = ""
    unlabeled_json: str = ""
    unlabeled_images: str = ""
    split_percent: float = 0.0
    split_fold: int = 1
    split_dir: str = ""
    demo: DemoDataConfig | None = None
    num_workers: int = 2  # torch pipeline: DataLoader worker processes; dali: the pipeline's CPU threads
    pipeline: str = "torch"  # torch (DataLoader + torchvision) | dali (NVIDIA DALI; GPU when training on CUDA)
    bad_images: str = "fail"  # fail (stop with the file's path) | skip (drop it from its batch, count in the log)


@dataclass(frozen=True)
class AugmentConfig:
    """Weak (geometric) and strong (photometric) augmentation; the strong view shares the weak geometry."""

    scales: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])  # short side, train
    max_size: int = 1333
    test_scale: int = 800
    flip_prob: float = 0.5
    crop_prob: float = 0.0
    crop_min_frac: float = 0.6  # random crop keeps at least this fraction of each side
    jitter_prob: float = 0.8
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # CutOut as in Unbiased Teacher: three erasing passes, each (probability, min area frac, max area frac)
    cutout: list[list[float]] = field(
        default_factory=lambda: [[0.7, 0.05, 0.2], [0.5, 0.02, 0.2], [0.3, 0.02, 0.2]]
    )


@dataclass(frozen=True)
class ModelConfig:
    """Faster R-CNN with FPN (torchvision)."""

    backbone: str = "resnet50"  # resnet50 | resnet18 | mobilenet_v2
    backbone_weights: str = ""  # local ImageNet classifier state dict; empty = random init
    weights: str = ""  # local detector checkpoint (state dict or acrst_fast checkpoint); empty = none
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256
    representation_size: int = 1024
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    roi_sampling_ratio: int = 2  # RoIAlign samples per bin side; 1 is ~4x cheaper (its CPU backward is slow)
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100


@dataclass(frozen=True)
class SolverConfig:
    """SGD, warmup then step decay. Batch sizes are totals over all ranks (paper: 32 + 32)."""

    total_steps: int = 180000
    pretrain_steps: int = 5000
    batch_labeled: int = 32
    batch_unlabeled: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    lr_steps: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    grad_clip_norm: float = 0.0  # 0 = off
    amp: str = "auto"  # auto (bf16 / fp16 on CUDA, off on CPU), off, bf16, fp16: see engine/amp.py
    channels_last: bool = False  # student and teacher in channels-last memory format (convolutions on GPU)


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Paper Eq. 1-5."""

    ema_decay: float = 0.9996
    tau_cls: float = 0.7
    lambda_unsup: float = 4.0


@dataclass(frozen=True)
class ACRSTConfig:
    """CropBank, FBR, AFFR, selective supervision (paper Method; ablations of Tables 4-6 are one override each:
    `acrst.fbr=true`, `acrst.beta=0` (FBR without AFFR), `acrst.selective_supervision=true`,
    `acrst.banks=[pseudo]`, `acrst.n_range=[0,5]`)."""

    fbr: bool = False  # paste CropBank instances into the student's images (labeled and unlabeled)
    beta: float = 0.6  # AFFR: mu_k ~ (1 / PR_k)^beta; 0 = uniform class sampling (FBR alone)
    selective_supervision: bool = False  # unlabeled regression losses on pasted instances only (Eq. 10)
    banks: list[str] = field(default_factory=lambda: ["labeled", "pseudo"])
    n_range: list[int] = field(default_factory=lambda: [0, 10])  # [N_min, N_max] instances per image
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # pasted size / size in the bank
    flip_prob: float = 0.5
    min_size: int = 4  # pixels; smaller (clipped) pastes are skipped
    visibility_threshold: float = 0.0  # remove boxes with visible fraction <= this (0: fully occluded only)
    crop_size: int = 64  # crops are stored at crop_size x crop_size
    capacity_per_class: int = 256  # per sub-bank and class: the fixed memory budget
    pr_window: int = 200  # steps over which Pseudo Recall is accumulated
    pr_threshold: float = 0.1


@dataclass(frozen=True)
class SSMLLConfig:
    """Semi-supervised multi-label classifier (C-Tran style) and two-stage pseudo-label filtering
    (paper: "Semi-supervised Multi-label Learning", "Two-stage Pseudo-label Filtering", Tables 9-10).
    `python -m acrst_fast.train_ssmll CONFIG` trains the classifier; the detector reads its
    `checkpoint` when `filter` is two_stage or mining."""

    filter: str = "single"  # single (score >= tau_cls) | two_stage (and classifier not negative) | mining
    checkpoint: str = ""  # classifier file written by train_ssmll (OUTPUT/ssmll_teacher.pt)
    tau_ml: float = 0.2  # two_stage: drop predictions of classes with classifier probability < tau_ml
    tau_pos: float = 0.7  # mining: also keep predictions of classes with probability >= tau_pos ...
    mining_min_score: float = 0.3  # ... whose detector score is at least this
    backbone: str = "resnet50"  # resnet50 | resnet18 | mobilenet_v2
    backbone_weights: str = ""  # local ImageNet classifier state dict; empty = random init
    input_size: int = 576
    dim: int = 256  # transformer width
    layers: int = 2
    heads: int = 4
    total_steps: int = 36000
    pretrain_steps: int = 2000
    batch_labeled: int = 64
    batch_unlabeled: int = 64
    lr: float = 1e-5  # Adam
    ema_decay: float = 0.999
    focal_gamma: float = 2.0
    pseudo_threshold: float = 0.5  # teacher probability -> image-level pseudo-label
    lambda_unsup: float = 1.0
    output_dir: str = ""  # empty = RUN.OUTPUT_DIR/ssmll
    checkpoint_period: int = 500
    eval_period: int = 0  # 0 = at the end only
    eval_taus: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])


@dataclass(frozen=True)
class EvalConfig:
    period: int = 5000  # steps between evaluations; the last step is always evaluated
    teacher: bool = True
    student: bool = True
    report: bool = True  # refresh RUN_DIR/report/ (figures + report.md) after each evaluation


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3
    log_period: int = 20
    progress_bar: bool = True


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    mean_teacher: MeanTeacherConfig = field(default_factory=MeanTeacherConfig)
    acrst: ACRSTConfig = field(default_factory=ACRSTConfig)
    ssmll: SSMLLConfig = field(default_factory=SSMLLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read `path` (and its `_base_` files), apply dotted `key=value` overrides, validate."""
    path = Path(path)
    raw = _read_with_bases(path, seen=())
    for item in overrides:
        _apply_override(raw, item, path)
    cfg = _build(Config, raw, prefix="", source=str(path))
    _check_values(cfg, str(path))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again by `load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(str(p) for p in seen)}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        _deep_merge(merged, _read_with_bases(path.parent / base, seen + (resolved,)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value


def _apply_override(raw: dict, item: str, source: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' (for {source}): expected KEY=VALUE, e.g. solver.lr=0.02")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}' (for {source}): value is not valid YAML: {exc}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}' (for {source}): '{part}' is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: key '{where}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}", source) for name in fields if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: key '{key}' has unsupported type {tp}")  # a bug in this module


def _check_values(cfg: Config, source: str) -> None:
    """Range and consistency checks that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: key '{key}' {msg}")

    s, m, a = cfg.solver, cfg.model, cfg.augment
    need(s.total_steps > 0, "solver.total_steps", "must be > 0")
    need(0 <= s.pretrain_steps <= s.total_steps, "solver.pretrain_steps", "must be in [0, solver.total_steps]")
    need(s.batch_labeled > 0, "solver.batch_labeled", "must be > 0")
    need(s.batch_unlabeled > 0, "solver.batch_unlabeled", "must be > 0")
    need(s.lr > 0, "solver.lr", "must be > 0")
    need(list(s.lr_steps) == sorted(s.lr_steps), "solver.lr_steps", "must be increasing")
    need(s.amp in ("auto", "off", "bf16", "fp16"), "solver.amp", f"must be auto, off, bf16 or fp16; got '{s.amp}'")
    need(0.0 <= cfg.mean_teacher.ema_decay < 1.0, "mean_teacher.ema_decay", "must be in [0, 1)")
    need(0.0 <= cfg.mean_teacher.tau_cls <= 1.0, "mean_teacher.tau_cls", "must be in [0, 1]")
    need(m.backbone in ("resnet50", "resnet18", "mobilenet_v2"), "model.backbone",
         f"must be one of resnet50, resnet18, mobilenet_v2; got '{m.backbone}'")
    need(len(m.anchor_sizes) == 5, "model.anchor_sizes", "must list 5 sizes (one per FPN level)")
    need(len(a.scales) > 0 and all(x > 0 for x in a.scales), "augment.scales", "must be a non-empty list of sizes")
    need(len(a.jitter) == 4, "augment.jitter", "must be [brightness, contrast, saturation, hue]")
    need(len(a.blur_sigma) == 2, "augment.blur_sigma", "must be [min, max]")
    need(all(len(c) == 3 for c in a.cutout), "augment.cutout", "entries must be [prob, min_area, max_area]")
    need(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", "must be auto, cpu or cuda")
    need(cfg.data.pipeline in ("torch", "dali"), "data.pipeline", f"must be torch or dali; got '{cfg.data.pipeline}'")
    need(cfg.data.bad_images in ("fail", "skip"), "data.bad_images", f"must be fail or skip; got '{cfg.data.bad_images}'")
    need(0.0 <= cfg.data.split_percent <= 100.0, "data.split_percent", "must be in [0, 100]")
    r = cfg.acrst
    need(len(r.n_range) == 2 and 0 <= r.n_range[0] <= r.n_range[1], "acrst.n_range", "must be [N_min, N_max], 0 <= N_min <= N_max")
    need(len(r.scale_range) == 2 and 0 < r.scale_range[0] <= r.scale_range[1], "acrst.scale_range",
         "must be [min, max] with 0 < min <= max")
    need(len(r.banks) > 0 and set(r.banks) <= {"labeled", "pseudo"}, "acrst.banks",
         f"must be a non-empty subset of [labeled, pseudo]; got {r.banks}")
    need(r.beta >= 0, "acrst.beta", "must be >= 0")
    need(0.0 <= r.visibility_threshold < 1.0, "acrst.visibility_threshold", "must be in [0, 1)")
    need(r.crop_size >= 2 and r.capacity_per_class >= 1 and r.pr_window >= 1, "acrst.crop_size",
         "crop_size >= 2, capacity_per_class >= 1 and pr_window >= 1 are required")
    m2 = cfg.ssmll
    need(m2.filter in ("single", "two_stage", "mining"), "ssmll.filter",
         f"must be single, two_stage or mining; got '{m2.filter}'")
    need(m2.filter == "single" or bool(m2.checkpoint), "ssmll.checkpoint",
         f"must name the classifier (train_ssmll's ssmll_teacher.pt) when ssmll.filter is {m2.filter}")
    need(m2.backbone in ("resnet50", "resnet18", "mobilenet_v2"), "ssmll.backbone",
         f"must be one of resnet50, resnet18, mobilenet_v2; got '{m2.backbone}'")
    need(0 <= m2.pretrain_steps <= m2.total_steps and m2.total_steps > 0, "ssmll.pretrain_steps",
         "must be in [0, ssmll.total_steps], total_steps > 0")
    need(0 < m2.tau_ml < 1 and 0 < m2.tau_pos < 1 and 0 < m2.pseudo_threshold < 1, "ssmll.tau_ml",
         "tau_ml, tau_pos and pseudo_threshold must lie in (0, 1)")
    need(m2.input_size >= 32 and m2.dim % m2.heads == 0, "ssmll.input_size", "input_size >= 32 and dim divisible by heads")
    d = cfg.data
    need(bool(d.val_json), "data.val_json", "must be set")
    need(bool(d.train_json), "data.train_json", "must be set")
    if s.total_steps > s.pretrain_steps:
        need(bool(d.unlabeled_json or d.unlabeled_images or d.split_percent > 0), "data.unlabeled_json",
             "or data.unlabeled_images or data.split_percent must be set for mutual learning")


def check_paths(cfg: Config, source: str) -> None:
    """Every path the config names must exist (call after demo data / splits are generated)."""
    d, m = cfg.data, cfg.model
    checks = [
        ("data.train_json", d.train_json, "file"), ("data.train_images", d.train_images, "dir"),
        ("data.val_json", d.val_json, "file"), ("data.val_images", d.val_images, "dir"),
        ("data.unlabeled_json", d.unlabeled_json, "file"), ("data.unlabeled_images", d.unlabeled_images, "dir"),
        ("model.backbone_weights", m.backbone_weights, "file"), ("model.weights", m.weights, "file"),
        ("ssmll.backbone_weights", cfg.ssmll.backbone_weights, "file"),
        ("ssmll.checkpoint", cfg.ssmll.checkpoint if cfg.ssmll.filter != "single" else "", "file"),
    ]
    for key, value, kind in checks:
        if not value:
            continue
        p = Path(value)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            raise ConfigError(f"{source}: key '{key}': {kind} not found: {value}")
