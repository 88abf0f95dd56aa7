"""Scaling on paper: the per-step collectives of a training step and their bytes, the fixed host cost, and the
images/s expected at 8, 16, 32 and 64 ranks, from the measured parts of one rank's step.

    python bench/scaling.py [CONFIG] [--step-ms 157.05] [--pairs 4] [--fixed-ms 5.15]
                            [--intra-gbs 400] [--inter-gbs 40] [--gpus-per-node 8]

The gradient bytes are counted on the config's model (built here, on the CPU: parameters that train, in
fp32 as DDP reduces them, in 25 MB buckets). The step time of one rank at `--pairs` labeled + unlabeled
images is the measured one (default: bench/RESULTS.md, "First GPU run": 157.05 ms at 4 + 4 on an H200);
`--fixed-ms` is its part that does not grow with the batch (EMA 2.81 + other 2.34 ms there), the rest is
taken as proportional to the images (the step is host-bound by per-image work: torchvision's syncs grow
with the batch, 377 at 8 + 8 and 1,432 at 32 + 32). A ring all-reduce of S bytes over w ranks moves
2 (w - 1) / w x S through the slowest link: NVLink inside a node (`--intra-gbs`, bus GB/s), the network
across nodes (`--inter-gbs` per GPU). No overlap of the gradient all-reduce with the backward pass is
assumed (DDP overlaps most of it: the bound is pessimistic). Nothing here is measured on more than one
GPU: it is arithmetic over one rank's measured step, to be checked when a multi-GPU machine is lent.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from acrst_fast.config import load_config
from acrst_fast.engine.build import world_sizes
from acrst_fast.models.detector import build_detector

REPO = Path(__file__).resolve().parents[1]
BUCKET = 25 * 2**20  # DDP's default bucket_cap_mb


def allreduce_ms(nbytes: int, world: int, gpus_per_node: int, intra: float, inter: float) -> float:
    if world == 1:
        return 0.0
    bus = intra if world <= gpus_per_node else inter
    return 2 * (world - 1) / world * nbytes / (bus * 1e9) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "coco_additional.yaml"))
    ap.add_argument("--step-ms", type=float, default=157.05)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--fixed-ms", type=float, default=2.81 + 2.34)
    ap.add_argument("--intra-gbs", type=float, default=400.0)
    ap.add_argument("--inter-gbs", type=float, default=40.0)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--classes", type=int, default=80)
    args = ap.parse_args(argv)
    cfg = load_config(args.config, ['model.backbone_weights=""'])
    model = build_detector(dataclasses.replace(cfg.model, backbone_weights=""), args.classes)
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in bn)
    grad = 4 * params
    k, lab, unl = args.classes, cfg.solver.batch_labeled, cfg.solver.batch_unlabeled
    print(f"config {args.config}: global batch {lab} + {unl}; runs on {world_sizes(lab, unl)} processes")
    print(f"\nper-step collectives (w ranks, K = {k} classes)")
    rows = [("DDP gradient all-reduce (device)", f"{grad / 2**20:.1f} MiB in {math.ceil(grad / BUCKET)} buckets",
             "every step"),
            ("stop agreement: stop flag + every rank's loss (device)", "8 (1 + w) B", "every step"),
            ("Pseudo Recall sums + pseudo-label counts (device)", f"{16 * k} B", "every mutual step"),
            ("log flush: metric means (gloo)", f"~{8 * (8 * k + 40)} B", "every run.log_period steps"),
            ("checkpoint: RNG states to rank 0 (gloo)", "~5 KB a rank", "every run.checkpoint_period"),
            ("Labeled-bank merge: metadata, then the chosen crops (bank_merge.py)", "~30 B a crop, then <= 1 bank",
             "once a run")]
    for name, size, when in rows:
        print(f"  {name:<70}{size:>26}  {when}")
    per_pair = (args.step_ms - args.fixed_ms) / args.pairs
    print(f"\none rank's step: {args.step_ms:.2f} ms at {args.pairs} + {args.pairs}; fixed {args.fixed_ms:.2f} ms, "
          f"{per_pair:.2f} ms per labeled + unlabeled pair; {params / 1e6:.1f} M trainable parameters")
    print(f"all-reduce bus bandwidth: {args.intra_gbs:.0f} GB/s within a node of {args.gpus_per_node}, "
          f"{args.inter_gbs:.0f} GB/s per GPU across nodes; no overlap with the backward pass assumed\n")
    print(f"{'ranks':>6} {'batch/rank':>11} {'compute ms':>11} {'all-reduce ms':>14} {'step ms':>8} "
          f"{'images/s':>9} {'per GPU':>8} {'efficiency':>11}")
    base = None
    for w in (8, 16, 32, 64):
        strong = lab % w == 0 and unl % w == 0
        pairs = lab / w if strong else 1  # past the batch's divisors: weak scaling at 1 + 1 a rank
        compute = args.fixed_ms + per_pair * pairs
        comm = allreduce_ms(grad, w, args.gpus_per_node, args.intra_gbs, args.inter_gbs)
        step = compute + comm
        images = 2 * pairs * w / (step / 1e3)
        base = base or images / w
        label = f"{pairs:g} + {pairs:g}" + ("" if strong else " *")
        print(f"{w:>6} {label:>11} {compute:>11.1f} {comm:>14.2f} {step:>8.1f} {images:>9.0f} {images / w:>8.1f} "
              f"{images / w / base:>10.0%}")
    print("* the global batch does not divide: weak scaling (global batch 2 w), with the LR scaled to match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
