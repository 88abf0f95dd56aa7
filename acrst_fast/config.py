"""YAML -> frozen, typed, validated config dataclasses.

Load with `load_config(path, overrides)`. A config file may name base files with `_base_`
(a path or list of paths, relative to the file); keys of the file override its bases.
Overrides are dotted `key=value` strings whose value is parsed as YAML
(`solver.lr=0.02`, `data.scales=[128,160]`). Every error is a `ConfigError` naming the file
and the dotted key.
"""
from __future__ import annotations

from acrst_fast.errors import UserError

import argparse
import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acrst_fast.modes import AMP_MODES, BACKBONES, BANK_SOURCES, EVAL_BACKENDS, FILTER_MODES, PHOTOMETRIC_MODES


class ConfigError(UserError):
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
    them (written to `split_dir`, labeled part trains, the rest is the unlabeled stream), chosen by
    `split_folds`: `published` (the literature's fold file, folds 0-9; `data/splits.py`), `generator`
    (a seeded permutation, any percent), or the path of a fold file of the same format.
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
    split_folds: str = "published"  # published | generator | path of a fold file
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
    crop_min_box: float = 1.0  # pixels: a box the crop leaves narrower or shorter than this is dropped
    photometric_after_paste: bool = True  # the student's strong view: geometry, crop-paste, then the photometric
    # ops below (paper: pasted instances get the strong augmentation); false = the old order (photometric in the
    # data stage, then paste)
    # those ops over the step's images as one padded batch (data/photometric_batch.py: fewer launches, more work):
    # auto = batch on CUDA, per_image elsewhere; batch; per_image (the reference; faster on the CPU)
    batched_photometric: str = "auto"
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
    backbone_weights: str = ""  # imagenet (torchvision's, via the hub cache) | random | a local state dict; empty = random
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
    # the RPN's proposal filter and the detections over the whole batch (models/batched_rpn.py,
    # batched_detections.py: the NMS kernel on CUDA, one host read per call); false = torchvision's per-image code
    # (the reference; the same proposals and detections)
    batched_nms: bool = True
    # the RPN and RoI samplers by random keys on the device (models/weighted_heads.py KeySampler: torchvision's
    # counts and distribution, other draws, no host read); false = torchvision's randperm sampler
    key_sampler: bool = True
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
    # divergence: a checkpoint is "last good" once the next divergence_check_steps steps had finite
    # losses below divergence_factor x the median loss of the steps before it (see engine/divergence.py)
    divergence_check_steps: int = 20
    divergence_factor: float = 10.0


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Paper Eq. 1-5."""

    # the teacher's half-life is ln(0.5) / ln(ema_decay) steps: 0.9996 -> 1,733, 0.999 -> 693, 0.99 -> 69; a mutual
    # phase shorter than a few half-lives leaves the teacher close to the burn-in's student
    ema_decay: float = 0.9996
    tau_cls: float = 0.7
    lambda_unsup: float = 4.0
    # the unlabeled images' RoI classification: 0 = cross-entropy (the paper), > 0 = focal loss with this gamma
    # (Unbiased Teacher: 1.5; with cross-entropy at lambda 4 every object below tau_cls trains as background)
    unsup_focal_gamma: float = 0.0
    # one student forward over labeled and unlabeled images together, each group's losses normalised as in
    # two forwards (StudentLosses); false: a forward per group (the reference path)
    joint_forward: bool = True


@dataclass(frozen=True)
class ACRSTConfig:
    """CropBank, FBR, AFFR, selective supervision (paper Method; ablations of Tables 4-6 are one override each:
    `acrst.fbr=true`, `acrst.beta=0` (FBR without AFFR), `acrst.selective_supervision=true`,
    `acrst.banks=[pseudo]`, `acrst.n_range=[0,5]`)."""

    fbr: bool = False  # paste CropBank instances into the student's images (labeled and unlabeled)
    paste_during_pretrain: bool = False  # also paste during burn-in (default: FBR starts with mutual learning,
    # so every ablation row shares the same pre-training; the Labeled bank still fills during burn-in)
    beta: float = 0.6  # AFFR: mu_k ~ (1 / PR_k)^beta; 0 = uniform class sampling (FBR alone)
    selective_supervision: bool = False  # unlabeled regression losses on pasted instances only (Eq. 10)
    banks: list[str] = field(default_factory=lambda: ["labeled", "pseudo"])
    n_range: list[int] = field(default_factory=lambda: [0, 10])  # [N_min, N_max] instances per image
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])  # pasted size / size in the bank
    flip_prob: float = 0.5
    min_size: int = 4  # pixels; smaller (clipped) pastes are skipped
    visibility_threshold: float = 0.0  # remove boxes with visible fraction <= this (0: fully occluded only)
    crop_size: int = 128  # slot side: a crop keeps its aspect, its longest side at most crop_size (see cropbank.py)
    capacity_per_class: int = 256  # per sub-bank and class: the fixed memory budget
    pr_window: int = 200  # steps over which Pseudo Recall is accumulated
    pr_threshold: float = 0.1


@dataclass(frozen=True)
class SSMLLConfig:
    """Semi-supervised multi-label classifier (C-Tran style) and two-stage pseudo-label filtering
    (paper: "Semi-supervised Multi-label Learning", "Two-stage Pseudo-label Filtering", Tables 9-10).
    `python -m acrst_fast.train_ssmll CONFIG` trains the classifier; the detector reads its
    `checkpoint` when `filter` is two_stage or mining, and trains it first when none is named."""

    filter: str = "single"  # single (score >= tau_cls) | two_stage (and classifier not negative) | mining
    checkpoint: str = ""  # classifier file (train_ssmll's ssmll_teacher.pt); empty with two_stage/mining: the
    # detector's command trains this run's SSMLL stage first (RUN/ssmll), and resumes it with --resume
    tau_ml: float = 0.2  # two_stage: drop predictions of classes with classifier probability < tau_ml
    tau_pos: float = 0.7  # mining: also keep predictions of classes with probability >= tau_pos ...
    mining_min_score: float = 0.3  # ... whose detector score is at least this
    backbone: str = "resnet50"  # resnet50 | resnet18 | mobilenet_v2
    backbone_weights: str = ""  # imagenet | random | a local state dict (as model.backbone_weights); empty = random
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
    label_mask: float = 0.75  # C-Tran label-mask training: up to this fraction of a labeled image's labels is
    # revealed as positive/negative states, the loss is on the rest; 0 = off
    rebalance_beta: float = 0.6  # class rebalancing: a class's positive term weighs (its labeled image
    # frequency)^-beta, normalised to mean 1 (ACRST's exponent); 0 = off
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
    # after mutual learning, train supervised training alone for the same steps from this run's burn-in
    # checkpoint (a branch into RUN_DIR/supervised) and print it beside the result: the equal-steps baseline
    supervised_branch: bool = False
    backend: str = "pycocotools"  # pycocotools | faster_coco_eval (pip install faster-coco-eval): the same AP, faster


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_period: int = 5000
    keep_checkpoints: int = 3
    log_period: int = 20
    progress_bar: bool = True
    # start from this checkpoint of another run (`--branch-from`): its student, teacher, optimizer, step,
    # evaluation history and CropBank (when it has one); randomness after it follows this run's seed
    branch_from: str = ""
    keep_burn_in: bool = True  # write the checkpoint at the end of burn-in and never prune it (the branch point)


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
    check_device(cfg, str(path))
    return cfg


def config_argparser(prog: str, description: str | None, example: str = "solver.lr=0.02") -> argparse.ArgumentParser:
    """The command line every config-driven tool takes: CONFIG [KEY=VALUE ...] (parse it with
    `parse_intermixed_args`, so options may stand between the overrides)."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help=f"dotted KEY=VALUE overrides, e.g. {example}")
    return ap


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again by `load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except two YAML 1.2 rules, as people write them: `1e-3` and `1E+6` are
    numbers, and only true/false are booleans (`amp: off` is the mode 'off'; a boolean key still takes
    yes/no/on/off, see `_coerce`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."))
_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
                                   for first, resolvers in _Loader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}  # what a boolean key also accepts


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text (numbers such as 1e-3 included); a syntax error is one line naming `where`, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"{where}{at}: not valid YAML: {problem}{f' ({context})' if context else ''}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    data = parse_yaml(text, str(path))
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
    value = parse_yaml(text, f"override '{item}' (for {source})")
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
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
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


class _Checks:
    """The range checks of one config file: each failure is a ConfigError naming the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def need(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{self.source}: key '{key}' {msg}")

    def within(self, key: str, value: float, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> None:
        ok = (lo is None or (value > lo if lo_open else value >= lo)) and \
             (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            if hi is None:
                allowed = f"{'>' if lo_open else '>='} {lo:g}"
            elif lo is None:
                allowed = f"{'<' if hi_open else '<='} {hi:g}"
            else:
                allowed = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            self.need(False, key, f"must be {allowed}; got {value!r}")

    def prob(self, key: str, value: float) -> None:
        self.within(key, value, 0.0, 1.0)

    def one_of(self, key: str, value: str, allowed: tuple[str, ...]) -> None:
        self.need(value in allowed, key, f"must be one of {', '.join(allowed)}; got '{value}'")


def _check_values(cfg: Config, source: str) -> None:
    """Range and consistency checks that types alone cannot express: every numeric key has a range."""
    c = _Checks(source)
    for check in (_check_solver, _check_model, _check_augment, _check_data, _check_acrst, _check_ssmll, _check_run):
        check(c, cfg)


def _check_solver(c: _Checks, cfg: Config) -> None:
    s = cfg.solver
    # solver
    c.within("solver.total_steps", s.total_steps, 1)
    c.within("solver.pretrain_steps", s.pretrain_steps, 0, s.total_steps)
    c.within("solver.batch_labeled", s.batch_labeled, 1)
    c.within("solver.batch_unlabeled", s.batch_unlabeled, 1)
    c.within("solver.lr", s.lr, 0.0, lo_open=True)
    c.within("solver.momentum", s.momentum, 0.0, 1.0, hi_open=True)
    c.within("solver.weight_decay", s.weight_decay, 0.0)
    c.within("solver.warmup_steps", s.warmup_steps, 0)
    c.within("solver.warmup_factor", s.warmup_factor, 0.0, 1.0, lo_open=True)
    c.within("solver.lr_gamma", s.lr_gamma, 0.0, 1.0, lo_open=True)
    c.within("solver.grad_clip_norm", s.grad_clip_norm, 0.0)
    c.need(list(s.lr_steps) == sorted(s.lr_steps) and all(x > 0 for x in s.lr_steps), "solver.lr_steps",
           f"must be increasing positive steps; got {s.lr_steps}")
    c.one_of("solver.amp", s.amp, AMP_MODES)
    c.within("solver.divergence_check_steps", s.divergence_check_steps, 1)
    c.within("solver.divergence_factor", s.divergence_factor, 1.0, lo_open=True)
    # mean teacher
    c.within("mean_teacher.ema_decay", cfg.mean_teacher.ema_decay, 0.0, 1.0, hi_open=True)
    c.prob("mean_teacher.tau_cls", cfg.mean_teacher.tau_cls)
    c.within("mean_teacher.lambda_unsup", cfg.mean_teacher.lambda_unsup, 0.0)
    c.within("mean_teacher.unsup_focal_gamma", cfg.mean_teacher.unsup_focal_gamma, 0.0, 5.0)


def _check_model(c: _Checks, cfg: Config) -> None:
    m = cfg.model
    # model
    c.one_of("model.backbone", m.backbone, BACKBONES)
    c.within("model.trainable_backbone_layers", m.trainable_backbone_layers, 0, 5)
    c.within("model.fpn_channels", m.fpn_channels, 1)
    c.within("model.representation_size", m.representation_size, 1)
    c.need(len(m.anchor_sizes) == 5 and all(x > 0 for x in m.anchor_sizes), "model.anchor_sizes",
           f"must list 5 positive sizes (one per FPN level); got {m.anchor_sizes}")
    for key in ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
                "box_detections_per_img"):
        c.within(f"model.{key}", getattr(m, key), 1)
    c.within("model.roi_sampling_ratio", m.roi_sampling_ratio, 0)
    c.prob("model.box_score_thresh", m.box_score_thresh)


def _check_augment(c: _Checks, cfg: Config) -> None:
    a = cfg.augment
    # augmentation
    c.need(len(a.scales) > 0 and all(x > 0 for x in a.scales), "augment.scales",
           f"must be a non-empty list of positive sizes; got {a.scales}")
    c.within("augment.max_size", a.max_size, max(a.scales))
    c.within("augment.test_scale", a.test_scale, 1, a.max_size)
    for key in ("flip_prob", "crop_prob", "jitter_prob", "grayscale_prob", "blur_prob"):
        c.prob(f"augment.{key}", getattr(a, key))
    c.within("augment.crop_min_frac", a.crop_min_frac, 0.0, 1.0, lo_open=True)
    c.within("augment.crop_min_box", a.crop_min_box, 0.0)
    c.need(len(a.jitter) == 4, "augment.jitter", f"must be [brightness, contrast, saturation, hue]; got {a.jitter}")
    for name, value in zip(("brightness", "contrast", "saturation"), a.jitter):
        c.within(f"augment.jitter ({name})", value, 0.0, 1.0)
    c.within("augment.jitter (hue)", a.jitter[3], 0.0, 0.5)
    c.need(len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma",
           f"must be [min, max] with 0 < min <= max; got {a.blur_sigma}")
    c.one_of("augment.batched_photometric", a.batched_photometric, PHOTOMETRIC_MODES)
    c.need(all(len(c) == 3 and 0 <= c[0] <= 1 and 0 < c[1] <= c[2] < 1 for c in a.cutout), "augment.cutout",
           f"entries must be [prob in [0, 1], min_area, max_area] with 0 < min_area <= max_area < 1; got {a.cutout}")


def _check_data(c: _Checks, cfg: Config) -> None:
    s, d = cfg.solver, cfg.data
    # data
    c.one_of("data.pipeline", d.pipeline, ("torch", "dali"))
    c.one_of("data.bad_images", d.bad_images, ("fail", "skip"))
    c.within("data.num_workers", d.num_workers, 0)
    c.within("data.split_percent", d.split_percent, 0.0, 100.0)
    c.within("data.split_fold", d.split_fold, 0, 9 if d.split_folds == "published" else None)
    c.need(d.split_percent <= 0 or d.split_folds in ("published", "generator") or Path(d.split_folds).is_file(),
           "data.split_folds", f"must be published, generator or the path of a fold file; got '{d.split_folds}'")
    c.need(bool(d.val_json), "data.val_json", "must be set")
    c.need(bool(d.train_json), "data.train_json", "must be set")
    if s.total_steps > s.pretrain_steps:
        c.need(bool(d.unlabeled_json or d.unlabeled_images or d.split_percent > 0), "data.unlabeled_json",
               "or data.unlabeled_images or data.split_percent must be set for mutual learning")
    if d.demo is not None:
        c.within("data.demo.num_labeled", d.demo.num_labeled, 1)
        c.within("data.demo.num_unlabeled", d.demo.num_unlabeled, 0)
        c.within("data.demo.num_val", d.demo.num_val, 1)
        c.within("data.demo.image_size", d.demo.image_size, 32)
        c.within("data.demo.num_classes", d.demo.num_classes, 1, 8)
        c.within("data.demo.imbalance", d.demo.imbalance, 0.0)
        c.within("data.demo.max_objects", d.demo.max_objects, 1)


def _check_acrst(c: _Checks, cfg: Config) -> None:
    r = cfg.acrst
    # ACRST
    c.need(len(r.n_range) == 2 and 0 <= r.n_range[0] <= r.n_range[1], "acrst.n_range",
           f"must be [N_min, N_max] with 0 <= N_min <= N_max; got {r.n_range}")
    c.need(len(r.scale_range) == 2 and 0 < r.scale_range[0] <= r.scale_range[1], "acrst.scale_range",
           f"must be [min, max] with 0 < min <= max; got {r.scale_range}")
    c.need(len(r.banks) > 0 and set(r.banks) <= set(BANK_SOURCES), "acrst.banks",
           f"must be a non-empty subset of [{', '.join(BANK_SOURCES)}]; got {r.banks}")
    c.within("acrst.beta", r.beta, 0.0)
    c.prob("acrst.flip_prob", r.flip_prob)
    c.within("acrst.min_size", r.min_size, 1)
    c.within("acrst.visibility_threshold", r.visibility_threshold, 0.0, 1.0, hi_open=True)
    c.within("acrst.crop_size", r.crop_size, 2)
    c.within("acrst.capacity_per_class", r.capacity_per_class, 1)
    c.within("acrst.pr_window", r.pr_window, 1)
    c.prob("acrst.pr_threshold", r.pr_threshold)


def _check_ssmll(c: _Checks, cfg: Config) -> None:
    m2 = cfg.ssmll
    # SSMLL
    c.one_of("ssmll.filter", m2.filter, FILTER_MODES)
    c.one_of("ssmll.backbone", m2.backbone, BACKBONES)
    c.within("ssmll.total_steps", m2.total_steps, 1)
    c.within("ssmll.pretrain_steps", m2.pretrain_steps, 0, m2.total_steps)
    for key in ("tau_ml", "tau_pos", "pseudo_threshold"):
        c.within(f"ssmll.{key}", getattr(m2, key), 0.0, 1.0, lo_open=True, hi_open=True)
    c.prob("ssmll.mining_min_score", m2.mining_min_score)
    c.within("ssmll.input_size", m2.input_size, 32)
    c.within("ssmll.dim", m2.dim, 1)
    c.within("ssmll.layers", m2.layers, 1)
    c.within("ssmll.heads", m2.heads, 1)
    c.need(m2.dim % m2.heads == 0, "ssmll.dim", f"must be divisible by ssmll.heads ({m2.heads}); got {m2.dim}")
    c.within("ssmll.batch_labeled", m2.batch_labeled, 1)
    c.within("ssmll.batch_unlabeled", m2.batch_unlabeled, 1)
    c.within("ssmll.lr", m2.lr, 0.0, lo_open=True)
    c.within("ssmll.ema_decay", m2.ema_decay, 0.0, 1.0, hi_open=True)
    c.within("ssmll.focal_gamma", m2.focal_gamma, 0.0)
    c.within("ssmll.label_mask", m2.label_mask, 0.0, 1.0, hi_open=True)
    c.within("ssmll.rebalance_beta", m2.rebalance_beta, 0.0)
    c.within("ssmll.lambda_unsup", m2.lambda_unsup, 0.0)
    c.within("ssmll.checkpoint_period", m2.checkpoint_period, 1)
    c.within("ssmll.eval_period", m2.eval_period, 0)
    c.need(all(0 < t < 1 for t in m2.eval_taus), "ssmll.eval_taus", f"must lie in (0, 1); got {m2.eval_taus}")


def _check_run(c: _Checks, cfg: Config) -> None:
    run = cfg.run
    # evaluation and run
    c.within("eval.period", cfg.eval.period, 0)
    c.one_of("eval.backend", cfg.eval.backend, EVAL_BACKENDS)
    c.need(cfg.eval.backend != "faster_coco_eval" or importlib.util.find_spec("faster_coco_eval") is not None,
           "eval.backend", "is faster_coco_eval, which is not installed: pip install faster-coco-eval")
    c.one_of("run.device", run.device, ("auto", "cpu", "cuda"))
    c.within("run.checkpoint_period", run.checkpoint_period, 0)
    c.within("run.keep_checkpoints", run.keep_checkpoints, 1)
    c.within("run.log_period", run.log_period, 1)
    c.within("run.seed", run.seed, 0)


def check_device(cfg: Config, source: str) -> None:
    """run.device=cuda needs a CUDA device."""
    import torch

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: key 'run.device' is 'cuda' but no CUDA device is available "
                          "(torch.cuda.is_available() is False); use auto or cpu")


def _local(weights: str) -> str:
    """A weights setting that names a local file ("" for imagenet and random: resolved when the model is built)."""
    return "" if weights in ("imagenet", "random") else weights


def check_paths(cfg: Config, source: str) -> None:
    """Every path the config names must exist (call after demo data / splits are generated)."""
    d, m = cfg.data, cfg.model
    checks = [
        ("data.train_json", d.train_json, "file"), ("data.train_images", d.train_images, "dir"),
        ("data.val_json", d.val_json, "file"), ("data.val_images", d.val_images, "dir"),
        ("data.unlabeled_json", d.unlabeled_json, "file"), ("data.unlabeled_images", d.unlabeled_images, "dir"),
        ("model.backbone_weights", _local(m.backbone_weights), "file"), ("model.weights", m.weights, "file"),
        ("ssmll.backbone_weights", _local(cfg.ssmll.backbone_weights), "file"),
        ("ssmll.checkpoint", cfg.ssmll.checkpoint if cfg.ssmll.filter != "single" else "", "file"),
    ]
    for key, value, kind in checks:
        if not value:
            continue
        p = Path(value)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            raise ConfigError(f"{source}: key '{key}': {kind} not found: {value}")
