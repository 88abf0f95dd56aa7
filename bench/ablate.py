"""Ablation of the paper's Table 4 on the demo data: each row is one config override of the same run.

    python bench/ablate.py [--config configs/demo.yaml] [--out runs/ablate] [--rows mt fbr affr ss]
                           [--ssmll CLASSIFIER] [KEY=VALUE ...]

Each row trains `python -m acrst_fast.train CONFIG` into OUT/ROW (same seed, same steps); a row
whose folder already holds final_metrics.json is not trained again, so an interrupted ablation
continues where it stopped. Prints teacher AP, AP50 and the per-class AP of the rarest classes
(by labeled-box count), and, where the run logged them, the pseudo-label precision and recall
over the mutual steps. The two-stage rows (ts, affr_ts, all) need `--ssmll`, the classifier
`python -m acrst_fast.train_ssmll CONFIG` wrote (OUTPUT/ssmll/ssmll_teacher.pt).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from acrst_fast import metric_names as M

ROWS = {
    "mt": ("Mean Teacher", []),
    "fbr": ("+ FBR", ["acrst.fbr=true", "acrst.beta=0"]),
    "affr": ("+ FBR + AFFR", ["acrst.fbr=true", "acrst.beta=0.6"]),
    "ss": ("+ FBR + AFFR + SS", ["acrst.fbr=true", "acrst.beta=0.6", "acrst.selective_supervision=true"]),
    "ts": ("+ Two-stage", ["ssmll.filter=two_stage"]),
    "affr_ts": ("+ FBR + AFFR + Two-stage", ["acrst.fbr=true", "acrst.beta=0.6", "ssmll.filter=two_stage"]),
    "all": ("+ FBR + AFFR + Two-stage + SS", ["acrst.fbr=true", "acrst.beta=0.6", "ssmll.filter=two_stage",
                                              "acrst.selective_supervision=true"]),
}


def pseudo_quality(run_dir: Path) -> str:
    """Pseudo-label precision / recall summed over the logged mutual steps (final filter; stage 1 too)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train" and M.PSEUDO_TP in r]
    if not recs:
        return ""
    tp, n, gt = (sum(r[k] for r in recs) for k in (M.PSEUDO_TP, M.PSEUDO_NUM, M.PSEUDO_NUM_GT))
    text = f"P {tp / max(n, 1e-9):.3f} R {tp / max(gt, 1e-9):.3f}"
    if M.STAGE1_TP in recs[-1]:
        tp1, n1 = (sum(r.get(k, 0.0) for r in recs) for k in (M.STAGE1_TP, M.STAGE1_NUM))
        text += f" (stage 1: P {tp1 / max(n1, 1e-9):.3f} R {tp1 / max(gt, 1e-9):.3f})"
    return text


def labeled_class_counts(run_dir: Path) -> dict[str, int]:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = json.loads(Path(cfg["data"]["train_json"]).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    counts = {n: 0 for n in names.values()}
    for a in data["annotations"]:
        counts[names[a["category_id"]]] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--rare", type=int, default=2, help="how many of the rarest classes to show")
    ap.add_argument("--ssmll", default="", help="SSMLL classifier file for the two-stage rows")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE applied to every row (e.g. solver.total_steps=300)")
    args = ap.parse_args()
    out = Path(args.out)
    results = {}
    for row in args.rows:
        label, extra = ROWS[row]
        if any(e.startswith("ssmll.filter") for e in extra):
            if not args.ssmll:
                raise SystemExit(f"[ablate] row {row} needs --ssmll CLASSIFIER (python -m acrst_fast.train_ssmll)")
            extra = [*extra, f"ssmll.checkpoint={args.ssmll}"]
        run_dir = out / row
        if not (run_dir / "final_metrics.json").is_file():
            cmd = [sys.executable, "-m", "acrst_fast.train", args.config, *args.overrides, *extra,
                   f"run.output_dir={run_dir}", "run.progress_bar=false"]
            print(f"[ablate] {label}: {' '.join(cmd[2:])}", flush=True)
            t0 = time.time()
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SystemExit(f"[ablate] row {row} failed (exit {proc.returncode}); its folder is {run_dir}")
            print(f"[ablate] {label}: {time.time() - t0:.0f} s", flush=True)
        results[row] = json.loads((run_dir / "final_metrics.json").read_text())

    counts = labeled_class_counts(out / args.rows[0])
    rare = sorted(counts, key=counts.get)[: args.rare]
    head = f"{'row':<30}{'AP':>8}{'AP50':>8}" + "".join(f"{f'{n} ({counts[n]})':>16}" for n in rare)
    lines = [head, "-" * len(head)]
    for row in args.rows:
        t = results[row]["teacher"] or results[row]["supervised"]
        lines.append(f"{ROWS[row][0]:<30}{t['AP']:>8.2f}{t['AP50']:>8.2f}"
                     + "".join(f"{t['AP_per_class'][n]:>16.2f}" for n in rare) + "   " + pseudo_quality(out / row))
    sup = next(iter(results.values()))["supervised"]
    if sup:
        lines.insert(2, f"{'supervised (pre-training)':<30}{sup['AP']:>8.2f}{sup['AP50']:>8.2f}"
                     + "".join(f"{sup['AP_per_class'][n]:>16.2f}" for n in rare))
    print("\nteacher AP on the validation split; per-class AP of the rarest classes (labeled boxes)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
