"""Benchmark: one mutual-learning step of ACRST, broken into its parts.

    python bench/train_step.py [CONFIG] [--steps 10] [--warmup 3] [KEY=VALUE ...]   (any order)

Builds the runner exactly as `python -m acrst_fast.train CONFIG` does (default configs/demo.yaml,
with acrst.fbr=true and selective supervision; the demo data is generated if missing), trains
past pre-training, then times STEPS mutual-learning steps with the device synchronised at every
boundary. Prints the median milliseconds of each part and its share of the step:

  data wait         the time the step waits for its labeled and unlabeled batches (the data
                    stage works ahead in DataLoader workers or DALI threads)
  teacher forward   teacher on the weak views (+ pseudo-label filtering)
  pseudo recall     PR update and pseudo-label class counts (ACRST)
  bank update       crops of the kept pseudo-labels into the CropBank (ACRST)
  planning          paste plans of the labeled and unlabeled batches (ACRST, C++)
  paste             crop pixels into the images (ACRST; Triton on CUDA)
  student fwd/bwd   student losses, backward, optimizer step
  EMA               teacher update
  other             the rest of the step (diagnostics snapshots; labeled crops into the bank, first pass only)
and ACRST's extra work (PR + bank + planning + paste) as a share of the whole step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _timing import describe, sync, timing_classifier
from acrst_fast import dist
from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.engine.build import build_runner

REPO = Path(__file__).resolve().parents[1]
PARTS = [("data wait", "data"), ("teacher forward", "teacher_only"), ("pseudo recall", "acrst_pr"),
         ("bank update", "acrst_bank"), ("planning", "acrst_plan"), ("paste", "acrst_paste"),
         ("student fwd/bwd", "student"), ("EMA", "ema")]
ACRST_PARTS = ("acrst_pr", "acrst_bank", "acrst_plan", "acrst_paste")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    args = ap.parse_intermixed_args()  # CONFIG --steps N KEY=VALUE, in any order
    total = args.warmup + args.steps + 2
    overrides = ["acrst.fbr=true", "acrst.selective_supervision=true", "solver.pretrain_steps=1",
                 f"solver.total_steps={total}", f"run.output_dir={tempfile.mkdtemp(prefix='bench_step_')}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    info = dist.init_distributed(cfg.run.device)
    prepare_data(cfg)
    datasets = load_datasets(resolved_data(cfg.data))
    cfg = timing_classifier(cfg, datasets.categories.names)
    runner, _ = build_runner(cfg, datasets, info, args.config)
    runner.sync_timing = True
    runner.acrst.sync_timing = True
    runner.start(0)
    rows: list[dict[str, float]] = []
    for step in range(total - 1):
        out = runner.run_step(step)
        sync(info.device)
        t0 = time.perf_counter()
        runner.update_teacher()
        sync(info.device)
        sec = dict(out.seconds, ema=time.perf_counter() - t0)
        # observe_teacher (PR + bank) runs inside the teacher section: take it out
        sec["teacher_only"] = sec["teacher"] - sec.get("acrst_pr", 0.0) - sec.get("acrst_bank", 0.0)
        sec["step"] = sum(v for k, v in sec.items() if k in {"data", "teacher", "acrst", "student", "ema"})
        if out.phase == "mutual" and step > args.warmup:
            rows.append(sec)
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) * 1e3 for k in rows[0]}
    print(f"mutual-learning step on {describe(info.device)}: {Path(args.config).name}, "
          f"{cfg.solver.batch_labeled} labeled + {cfg.solver.batch_unlabeled} unlabeled images, "
          f"backbone {cfg.model.backbone}, amp {runner.precision.dtype}, median of {len(rows)} steps")
    print(f"{'part':>18} {'ms':>9} {'share':>7}")
    for name, key in PARTS:
        print(f"{name:>18} {med.get(key, 0.0):9.2f} {med.get(key, 0.0) / med['step']:7.1%}")
    other = med["step"] - sum(med.get(k, 0.0) for _, k in PARTS)
    print(f"{'other':>18} {other:9.2f} {other / med['step']:7.1%}")
    print(f"{'step':>18} {med['step']:9.2f} {1:7.1%}")
    extra = sum(med.get(k, 0.0) for k in ACRST_PARTS)
    print(f"ACRST extra work (PR + bank + planning + paste): {extra:.2f} ms = {extra / med['step']:.1%} of the step")


if __name__ == "__main__":
    sys.exit(main())
