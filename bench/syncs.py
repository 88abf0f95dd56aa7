"""Host-device synchronisations of one mutual-learning step, by source line.

    python bench/syncs.py [CONFIG] [--batch B] [--top 30] [KEY=VALUE ...]

Builds the runner as `python -m acrst_fast.train CONFIG` does (default configs/demo.yaml; the demo
data is generated if missing), trains past pre-training and the Labeled bank's first pass, then
counts one mutual step as the trainer runs it: the step function, the EMA update and the per-step
stop agreement. On CUDA the counts come from `torch.cuda.set_sync_debug_mode("warn")`; on the CPU
from `acrst_fast.syncs.SyncCounter` (the calls that would synchronise on CUDA). Prints the total
for the project's code and for libraries (torchvision), and the sites.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from _timing import timing_classifier
from acrst_fast import dist
from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.engine.trainer import StepAgreement
from acrst_fast.syncs import SyncCounter, _site
from acrst_fast.engine.build import build_runner

REPO = Path(__file__).resolve().parents[1]


def build(config: str, batch: int, overrides: list[str]):
    """A runner at its first mutual step after the Labeled bank's first pass; returns (runner, step)."""
    cfg = load_config(config, [f"solver.batch_labeled={batch}", f"solver.batch_unlabeled={batch}",
                               "solver.pretrain_steps=1", "solver.total_steps=1000",
                               f"run.output_dir={tempfile.mkdtemp(prefix='bench_syncs_')}", *overrides])
    info = dist.init_distributed(cfg.run.device)
    prepare_data(cfg)
    datasets = load_datasets(resolved_data(cfg.data))
    cfg = timing_classifier(cfg, datasets.categories.names)
    runner, _ = build_runner(cfg, datasets, info, config)
    runner.start(0)
    first = max(2, runner.labeled_bank_steps + 1)
    for step in range(first):
        runner.run_step(step)
        if step >= 1:
            runner.update_teacher()
    return runner, first


def one_step(runner, step: int):
    """The step as the trainer runs it: step function, stop agreement (launched; the trainer reads it one step
    later, from page-locked memory, after the next step is queued), EMA."""
    out = runner.run_step(step)
    agreement = StepAgreement.launch(step + 1, out, False)
    runner.update_teacher()
    agreement.read()
    return out


def count(runner, step: int, device: torch.device) -> tuple[Counter, Counter]:
    """(project sites, library sites) of one step."""
    if device.type != "cuda":
        with SyncCounter() as c:
            one_step(runner, step)
        lib = Counter({s: n for s, n in c.sites.items() if s not in c.project})
        return c.project, lib
    project, lib = Counter(), Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            site, mine = _site()
            (project if mine else lib)[site] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step(runner, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return project, lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--batch", type=int, action="append", help="images per stream (repeatable; default 8 and 32)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    args = ap.parse_intermixed_args()
    for batch in args.batch or [8, 32]:
        runner, step = build(args.config, batch, args.overrides)
        project, lib = count(runner, step, runner.device)
        pl = runner.last_pseudo_count
        print(f"batch {batch} + {batch} on {runner.device}: {sum(project.values())} syncs in project code, "
              f"{sum(lib.values())} in libraries (step {step}, pseudo-labels kept: {pl})")
        for site, n in (project + lib).most_common(args.top):
            print(f"  {n:5d}  {'project' if site in project else 'library'}  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
