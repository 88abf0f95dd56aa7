"""Build what a training run is made of, from its config: the detector runner (student, optimizer,
data stage, ACRST, SSMLL classifier) of one rank, and the SSMLL classifier's runner with its data.
The command-line modules and the benches call these; nothing here reads the command line or writes
files.
"""
from __future__ import annotations

import math
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from acrst_fast import dist
from acrst_fast.augment import ACRST, PasteConfig, class_histogram
from acrst_fast.config import Config, ConfigError
from acrst_fast.data.dali_stage import DaliDataStage
from acrst_fast.data.loader import TorchDataStage
from acrst_fast.engine.mean_teacher import MeanTeacher, StudentLosses
from acrst_fast.engine.ssmll_runner import SSMLLRunner, class_weights
from acrst_fast.models.detector import build_detector
from acrst_fast.models.weights import backbone_file
from acrst_fast.ssmll.data import SquareViews, dali_step_batches, eval_loader, step_loader
from acrst_fast.ssmll.metrics import image_labels
from acrst_fast.ssmll.model import load_classifier
from acrst_fast.streams import Stream, rank_global_seed


def fetch_pretrained(cfg: Config, ssmll: bool = False) -> None:
    """Bring `imagenet` backbone weights into the torch hub cache (rank 0, before the ranks build their
    models, so one process downloads); a WeightsError says where to put the file when offline."""
    if ssmll:
        backbone_file(cfg.ssmll.backbone_weights, cfg.ssmll.backbone, "ssmll.backbone_weights")
    else:
        backbone_file(cfg.model.backbone_weights, cfg.model.backbone, "model.backbone_weights")


def world_sizes(*batches: int) -> list[int]:
    """The numbers of processes that divide every global batch in `batches` (each rank takes an equal share)."""
    g = math.gcd(*batches)
    return [w for w in range(1, g + 1) if g % w == 0]


def checked_images(cfg: Config, datasets):
    """`datasets` after every image header was checked (on rank 0, the verdict sent to every rank): a bad file
    stops the run now (`data.bad_images: fail`, one line naming it), or is dropped up front with `skip` (said
    once). Collective. Both stages call it before their first step."""
    from acrst_fast.data.check import drop_bad_images, find_header_problems
    from acrst_fast.engine.launch import on_main

    problems = on_main(lambda: find_header_problems(datasets, cfg.data.bad_images, max(4, cfg.data.num_workers * 2)))
    datasets, dropped = drop_bad_images(datasets, problems)
    if dropped and dist.rank() == 0:
        print(f"[data] data.bad_images=skip: {len(dropped)} images dropped before training; first: {dropped[0]}",
              file=sys.stderr, flush=True)
    return datasets


def _per_rank(total: int, world: int, key: str, source: str, *others: int) -> int:
    """A rank's share of the global batch `total` (config key `key`); `others`: the batches that share the
    world size (the labeled and unlabeled batch), for the list of world sizes that work."""
    if total % world:
        fits = world_sizes(total, *others)
        raise ConfigError(f"{source}: key '{key}' ({total}) must be divisible by the number of processes ({world}); "
                          f"this config runs on {', '.join(map(str, fits))} processes, or change the batch (batches are "
                          "global: each rank takes 1/world of each)")
    return total // world


def build_acrst(cfg: Config, num_classes: int, device: torch.device) -> ACRST:
    a = cfg.acrst
    paste = PasteConfig(n_min=a.n_range[0], n_max=a.n_range[1], scale_min=a.scale_range[0],
                        scale_max=a.scale_range[1], flip_prob=a.flip_prob, min_size=a.min_size,
                        visibility_threshold=a.visibility_threshold)
    return ACRST(num_classes, capacity=a.capacity_per_class, crop_size=a.crop_size, paste=paste, beta=a.beta,
                 pr_window=a.pr_window, pr_threshold=a.pr_threshold, sources=tuple(a.banks), device=device,
                 range_check="never")  # the loader's images are in [0, 1] by construction: no extra read


def class_counts(records, num_classes: int) -> torch.Tensor:
    """Ground-truth boxes per class (Tensor[K] float64) over the labeled records."""
    labels = [torch.from_numpy(r.labels) for r in records]
    return class_histogram(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64), num_classes)


def build_runner(cfg: Config, datasets, info, source: str,
                 labeled_counts: torch.Tensor | None = None) -> tuple[MeanTeacher, TorchDataStage | DaliDataStage]:
    """Student, optimizer, data stage, ACRST (when `acrst.fbr`) and the Mean Teacher runner of one rank.

    datasets: `load_datasets(...)`; info: `dist.init()`'s rank/world/device; source: the config's
    name for error messages. The bench scripts build their runner here too.
    """
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    student = build_detector(cfg.model, datasets.categories.num_classes).to(info.device)
    if cfg.solver.channels_last:
        student = student.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.solver.lr, momentum=cfg.solver.momentum,
                                weight_decay=cfg.solver.weight_decay)
    losses = StudentLosses(student, cfg.mean_teacher.unsup_focal_gamma, cfg.mean_teacher.joint_forward)
    if info.world > 1:  # frozen-BN buffers never change: no per-forward buffer broadcast
        losses = DistributedDataParallel(losses, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                                         process_group=dist.device_group(info.device), broadcast_buffers=False)
    both = (cfg.solver.batch_labeled, cfg.solver.batch_unlabeled)
    batch_labeled = _per_rank(both[0], info.world, "solver.batch_labeled", source, both[1])
    stage_args = dict(
        batch_labeled=batch_labeled,
        batch_unlabeled=_per_rank(both[1], info.world, "solver.batch_unlabeled", source, both[0]),
        seed=cfg.run.seed, rank=info.rank, world=info.world, bad_images=cfg.data.bad_images,
        labeled_views=("weak", "strong") if cfg.acrst.fbr else ("strong",))
    if cfg.data.pipeline == "dali":
        device_id = info.device.index if info.device.type == "cuda" else None
        stage = DaliDataStage(datasets.labeled, datasets.unlabeled, datasets.val, cfg.augment, device_id=device_id,
                              threads=max(1, cfg.data.num_workers), **stage_args)
    else:
        stage = TorchDataStage(datasets.labeled, datasets.unlabeled, datasets.val, cfg.augment,
                               num_workers=cfg.data.num_workers,
                               view_device=info.device if info.device.type == "cuda" else None, **stage_args)
    acrst = build_acrst(cfg, datasets.categories.num_classes, info.device) if cfg.acrst.fbr else None
    classifier, classifier_size = None, 0
    if cfg.ssmll.filter != "single":
        classifier, classifier_size = load_classifier(cfg.ssmll.checkpoint, datasets.categories.names, info.device)
    # per-rank streams for the RoI/RPN samplers, seeded after everything built draws (the classifier's
    # init): every ablation row, with or without a classifier, trains its burn-in on the same draws
    torch.manual_seed(rank_global_seed(cfg.run.seed, info.rank))
    shard = math.ceil(len(datasets.labeled) / info.world)
    runner = MeanTeacher(cfg, student, losses, optimizer, stage, info.device, acrst=acrst,
                         labeled_bank_steps=math.ceil(shard / batch_labeled),
                         class_names=datasets.categories.names,
                         gt_class_counts=labeled_counts,
                         rank=info.rank, world=info.world,
                         hidden_gt=any(len(r.boxes) for r in datasets.unlabeled),
                         classifier=classifier, classifier_size=classifier_size)
    return runner, stage


def build_ssmll_runner(cfg: Config, datasets, info, source: str) -> tuple[SSMLLRunner, dict]:
    """The SSMLL runner of one rank (its data: this rank's slice of each step's batch, from
    `ssmll.data.SquareViews`, made by DALI with `data.pipeline=dali`) and its evaluation loaders
    ({"val": ..., "unlabeled": ... when the unlabeled split has hidden ground truth}, this rank's shard)."""
    m, k = cfg.ssmll, datasets.categories.num_classes
    for key, other in (("batch_labeled", m.batch_unlabeled), ("batch_unlabeled", m.batch_labeled)):
        _per_rank(getattr(m, key), info.world, f"ssmll.{key}", source, other)
    views = {"labeled": SquareViews(datasets.labeled, k, m.input_size, cfg.augment, cfg.run.seed, Stream.SSMLL_LABELED),
             "unlabeled": SquareViews(datasets.unlabeled, k, m.input_size, cfg.augment, cfg.run.seed,
                                      Stream.SSMLL_UNLABELED)}
    batch = {"labeled": m.batch_labeled, "unlabeled": m.batch_unlabeled}
    workers = cfg.data.num_workers
    device_id = info.device.index if info.device.type == "cuda" else None

    def batches(split: str, first: int, end: int):
        if cfg.data.pipeline == "dali":  # the detector's DALI pipeline, at input_size x input_size
            return dali_step_batches(views[split], batch[split], first, end, device_id, max(1, workers),
                                     cfg.data.bad_images, info.rank, info.world)
        return iter(step_loader(views[split], batch[split], first, end, workers, info.rank, info.world))

    labels = image_labels([torch.from_numpy(r.labels) for r in datasets.labeled], k)
    runner = SSMLLRunner(cfg, k, info.device, batches, info.rank, info.world,
                         pos_weight=class_weights(labels, m.rebalance_beta))
    splits = {"val": datasets.val} | ({"unlabeled": datasets.unlabeled}
                                      if any(len(r.labels) for r in datasets.unlabeled) else {})
    loaders = {s: eval_loader(r, k, m.input_size, cfg.augment, m.batch_labeled, workers, info.rank, info.world)
               for s, r in splits.items()}
    return runner, loaders
