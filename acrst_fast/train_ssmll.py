"""Train the SSMLL multi-label classifier with its own Mean Teacher (paper: "Semi-supervised
Multi-label Learning"), for the detector's two-stage pseudo-label filtering.

    python -m acrst_fast.train_ssmll CONFIG [KEY=VALUE ...] [--resume]

Multi-process: `torchrun --nproc_per_node=N -m acrst_fast.train_ssmll CONFIG`, like the detector.
Uses the detector config's data (labeled, unlabeled, val) and its `ssmll` section; the step is
`engine/ssmll_runner.py`'s, driven by the detector's Trainer and hooks (LR, EMA, evaluation,
divergence guard, logging, checkpoint; SIGTERM checkpoints and exits 130). Adam, optional
AMP (solver.amp); `data.pipeline=dali` makes the training views with the detector's DALI
pipeline. Writes to ssmll.output_dir (default RUN.OUTPUT_DIR/ssmll): atomic, resumable
checkpoints, metrics.jsonl, ssmll_metrics.json (Table 9: image-level negative accuracy and recall
at each ssmll.eval_taus, on the validation split and, where the unlabeled split has hidden
ground truth, on it) and ssmll_teacher.pt, the file the detector's `ssmll.checkpoint` names.
"""
from __future__ import annotations

import sys

import torch

from acrst_fast import dist
from acrst_fast.config import config_argparser, load_config
from acrst_fast.engine.launch import exit_code
from acrst_fast.engine.ssmll_stage import train


def main(argv: list[str] | None = None) -> int:
    ap = config_argparser("python -m acrst_fast.train_ssmll", __doc__, example="ssmll.total_steps=100")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in ssmll.output_dir")
    args = ap.parse_intermixed_args(argv)

    def body():
        cfg = load_config(args.config, args.overrides)
        info = dist.init_distributed(cfg.run.device)
        if info.device.type == "cpu" and info.world > 1:
            torch.set_num_threads(max(1, torch.get_num_threads() // info.world))
        train(cfg, args.config, args.resume, info)

    return exit_code(body)


if __name__ == "__main__":
    sys.exit(main())
