"""Ablation of the paper's Table 4 on the demo data, over seeds: each row is a set of config overrides.

    python bench/ablate.py [--config configs/demo.yaml] [--out runs/ablate] [--rows sup mt fbr affr ss all]
                           [--seeds 3] [--ssmll CLASSIFIER] [KEY=VALUE ...]

Each (row, seed) trains `python -m acrst_fast.train CONFIG run.seed=SEED` into OUT/ROW/seedSEED; one
whose folder already holds final_metrics.json is not trained again, so an interrupted ablation
continues where it stopped. Rows start from plain Mean Teacher (ACRST and two-stage filtering off)
and switch parts on, so they do not depend on what the config enables; `sup` is supervised
training alone for the same number of steps (the fair baseline of a short schedule). The two-stage rows (ts,
affr_ts, all) filter with one SSMLL classifier per seed, trained once into OUT/ssmll/seedSEED
(`python -m acrst_fast.train_ssmll`) and shared by those rows, or with `--ssmll FILE`.

Prints, per row, mean ± std over the seeds of: teacher AP and AP50 at the end, the per-class AP of the
rarest classes (by labeled-box count), and the mutual-learning gain, AP at the end minus the AP at
the end of burn-in (the figure the method is about: every row shares the burn-in); then each row's
difference from Mean Teacher, marked as an ordering only where it is larger than the spread (the
sum of the two rows' standard deviations). Pseudo-label precision and recall over the mutual steps
where the run logged them.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from acrst_fast import metric_names as M

MEAN_TEACHER = ["acrst.fbr=false", "acrst.selective_supervision=false", "ssmll.filter=single"]
FBR, AFFR, SS, TWO_STAGE = (["acrst.fbr=true", "acrst.beta=0"], ["acrst.fbr=true", "acrst.beta=0.6"],
                            ["acrst.selective_supervision=true"], ["ssmll.filter=two_stage"])
SUPERVISED = "@supervised"  # replaced by solver.pretrain_steps=<the config's total_steps>: no mutual learning
ROWS = {
    "sup": ("supervised only, same steps", MEAN_TEACHER + [SUPERVISED]),
    "mt": ("Mean Teacher", MEAN_TEACHER),
    "fbr": ("+ FBR", MEAN_TEACHER + FBR),
    "affr": ("+ FBR + AFFR", MEAN_TEACHER + AFFR),
    "ss": ("+ FBR + AFFR + SS", MEAN_TEACHER + AFFR + SS),
    "ts": ("+ Two-stage", MEAN_TEACHER + TWO_STAGE),
    "affr_ts": ("+ FBR + AFFR + Two-stage", MEAN_TEACHER + AFFR + TWO_STAGE),
    "all": ("+ FBR + AFFR + Two-stage + SS", MEAN_TEACHER + AFFR + TWO_STAGE + SS),
}


def pseudo_quality(run_dirs: list[Path]) -> str:
    """Pseudo-label precision / recall summed over the logged mutual steps of the runs (final filter)."""
    recs = [json.loads(line) for d in run_dirs for line in (d / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
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
    stats = json.loads((run_dir / "dataset_stats.json").read_text())
    return dict(zip(stats["classes"], stats["labeled_class_counts"]))


def _run(cmd: list[str], what: str) -> None:
    print(f"[ablate] {what}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[ablate] {what} failed (exit {proc.returncode})")
    print(f"[ablate] {what}: {time.time() - t0:.0f} s", flush=True)


def classifier(args, out: Path, seed: int) -> str:
    """The two-stage rows' SSMLL classifier of `seed`: --ssmll, or trained once for all rows."""
    if args.ssmll:
        return args.ssmll
    folder = out / "ssmll" / f"seed{seed}"
    if not (folder / "ssmll_metrics.json").is_file():
        resume = ["--resume"] if folder.is_dir() else []
        _run([sys.executable, "-m", "acrst_fast.train_ssmll", args.config, *args.overrides, f"run.seed={seed}",
              f"ssmll.output_dir={folder}", "run.progress_bar=false", *resume], f"SSMLL seed {seed}")
    return str(folder / "ssmll_teacher.pt")


def train_row(args, out: Path, row: str, seed: int) -> dict:
    label, extra = ROWS[row]
    if SUPERVISED in extra:
        from acrst_fast.config import load_config

        total = load_config(args.config, args.overrides).solver.total_steps
        extra = [e if e != SUPERVISED else f"solver.pretrain_steps={total}" for e in extra]
    if "ssmll.filter=two_stage" in extra:
        extra = [*extra, f"ssmll.checkpoint={classifier(args, out, seed)}"]
    run_dir = out / row / f"seed{seed}"
    if not (run_dir / "final_metrics.json").is_file():
        resume = ["--resume"] if run_dir.is_dir() else []
        _run([sys.executable, "-m", "acrst_fast.train", args.config, *args.overrides, *extra, f"run.seed={seed}",
              f"run.output_dir={run_dir}", "run.progress_bar=false", *resume], f"{label}, seed {seed}")
    return json.loads((run_dir / "final_metrics.json").read_text())


def _stat(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):  # statistics.stdev fails on NaN
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def burn_in_ap(results: dict[str, list[dict]]) -> dict[int, float]:
    """Per seed: AP at the end of the burn-in that every row of that seed shares (bit for bit: the runs'
    logged losses agree up to it), read from any row with mutual learning."""
    out: dict[int, float] = {}
    for runs in results.values():
        for seed, r in enumerate(runs):
            if r["teacher"]:
                out.setdefault(seed, r["supervised"]["AP"])
    return out


def summarize(results: dict[str, list[dict]], rare: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per row: mean and std over seeds of AP, AP50, gain (end AP - end-of-burn-in AP), rare-class APs.

    The `sup` row has no mutual learning: its gain is over the same steps, its end AP minus the shared
    burn-in's AP of the same seed (NaN when no row with mutual learning ran that seed)."""
    out, burn_in = {}, burn_in_ap(results)
    for row, runs in results.items():
        ends = [r["teacher"] or r["supervised"] for r in runs]
        starts = [r["supervised"]["AP"] if r["teacher"] else burn_in.get(seed, math.nan) for seed, r in enumerate(runs)]
        stats = {"AP": _stat([e["AP"] for e in ends]), "AP50": _stat([e["AP50"] for e in ends]),
                 "gain": _stat([e["AP"] - a for e, a in zip(ends, starts)])}
        stats |= {n: _stat([e["AP_per_class"][n] for e in ends]) for n in rare}
        out[row] = stats
    return out


def table(summary: dict, rare: list[str], counts: dict[str, int], quality: dict[str, str], seeds: int) -> str:
    pm = lambda s: f"{s[0]:.2f} ± {s[1]:.2f}"  # noqa: E731
    head = (f"{'row':<30}{'AP':>15}{'AP50':>15}{'gain in mutual':>17}"
            + "".join(f"{f'{n} ({counts[n]})':>17}" for n in rare))
    lines = [f"teacher on the validation split, mean ± std over {seeds} seeds; gain = AP at the end - AP at the "
             "end of burn-in (supervised only: over the same steps, from the burn-in the rows share)",
             head, "-" * len(head)]
    for row, s in summary.items():
        lines.append(f"{ROWS[row][0]:<30}{pm(s['AP']):>15}{pm(s['AP50']):>15}{pm(s['gain']):>17}"
                     + "".join(f"{pm(s[n]):>17}" for n in rare) + "   " + quality.get(row, ""))
    if "mt" in summary:
        lines += ["", "difference from Mean Teacher (an ordering only where |difference| > the sum of the stds):"]
        for row, s in summary.items():
            if row == "mt":
                continue
            for key in ("AP", "gain"):
                d = s[key][0] - summary["mt"][key][0]
                spread = s[key][1] + summary["mt"][key][1]
                verdict = ("higher" if d > 0 else "lower") if abs(d) > spread else "within the spread"
                lines.append(f"  {ROWS[row][0]:<30}{key:>6} {d:+.2f} (spread {spread:.2f}): {verdict}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--rows", nargs="+", default=["mt", "affr", "ss", "all"], choices=list(ROWS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per row (run.seed)")
    ap.add_argument("--rare", type=int, default=2, help="how many of the rarest classes to show")
    ap.add_argument("--ssmll", default="", help="an SSMLL classifier file for the two-stage rows (default: "
                                                  "one trained per seed)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE applied to every run (e.g. solver.total_steps=300)")
    args = ap.parse_args()
    out = Path(args.out)
    results = {row: [train_row(args, out, row, seed) for seed in range(args.seeds)] for row in args.rows}
    counts = labeled_class_counts(out / args.rows[0] / "seed0")
    rare = sorted(counts, key=counts.get)[: args.rare]
    quality = {row: pseudo_quality([out / row / f"seed{s}" for s in range(args.seeds)]) for row in args.rows}
    text = table(summarize(results, rare), rare, counts, quality, args.seeds)
    print("\n" + text)
    (out / "ablation.txt").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
