"""Ablation of the paper's Table 4 over seeds, by the protocol that can show the method's effect: one burn-in
per seed, every row branched from it for the same number of steps, rows compared by paired per-seed differences.

    python bench/ablate.py [--config configs/demo.yaml] [--out runs/ablate] [--rows sup mt fbr affr ss all]
                           [--seeds 3] [--burn-in STEPS] [--mutual STEPS] [--eval-period N] [--ssmll CLASSIFIER]
                           [KEY=VALUE ...]

1. Burn-in, once per seed: supervised training for `--burn-in` steps (default: the config's
   solver.pretrain_steps) into OUT/burn_in/seedS, evaluated every `--eval-period` steps, with the Labeled
   CropBank filling (nothing is pasted during burn-in). Its AP curve is printed with the plateau rule: the
   burn-in is at its plateau when the mean AP of its last PLATEAU_WINDOW evaluations exceeds the mean of
   the PLATEAU_WINDOW before them by at most PLATEAU_AP (a window, because one evaluation on a small
   validation split moves by a few AP); otherwise the table says so (lengthen --burn-in).
2. Rows, each a branch of that burn-in (`train --branch-from`, same seed: the rows of a seed see the same
   labeled batches) for the same `--mutual` steps (default: total_steps - pretrain_steps): `sup` continues
   supervised training, the others start mutual learning. Rows start from plain Mean Teacher (ACRST and
   two-stage filtering off) and switch parts on, so they do not depend on what the config enables.
   The two-stage rows filter with one SSMLL classifier per seed, trained once into OUT/ssmll/seedS.
3. Prints per row mean ± std over seeds of AP and AP50 (the teacher; `sup`: the student), then the paired
   per-seed differences, mean ± std: every row minus the supervised continuation, every ACRST row minus
   Mean Teacher, for AP and the rarest classes' AP. THE RULE: an ordering is claimed only where the mean
   paired difference exceeds its standard deviation over the seeds (|mean| > std, 2 seeds or more); else
   "within the spread". Then, for the rarest classes: pseudo-labels the teacher kept, instances pasted from
   each bank, and their AP at each evaluation; and the compute the shared burn-in saved.

A run whose folder holds final_metrics.json is not trained again, and a stopped one resumes, so an
interrupted ablation continues where it stopped.
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

PLATEAU_AP = 1.0  # the burn-in's plateau rule: the mean AP of its last PLATEAU_WINDOW evaluations exceeds
PLATEAU_WINDOW = 3  # the mean of the PLATEAU_WINDOW before them by at most PLATEAU_AP
MEAN_TEACHER = ["acrst.fbr=false", "acrst.selective_supervision=false", "ssmll.filter=single"]
FBR, AFFR, SS, TWO_STAGE = (["acrst.fbr=true", "acrst.beta=0"], ["acrst.fbr=true", "acrst.beta=0.6"],
                            ["acrst.selective_supervision=true"], ["ssmll.filter=two_stage"])
SUPERVISED = "@supervised"  # this row's branch keeps pre-training to the end: no mutual learning
RATIO_4 = "@unlabeled_4x"  # solver.batch_unlabeled = 4 x the config's batch_labeled (SoftTeacher's 4:1)
FOCAL = ["mean_teacher.unsup_focal_gamma=1.5"]  # Unbiased Teacher's focal RoI classification on unlabeled images
ROWS = {
    "sup": ("supervised continuation", MEAN_TEACHER + [SUPERVISED]),
    "mt": ("Mean Teacher", MEAN_TEACHER),
    "fbr": ("+ FBR", MEAN_TEACHER + FBR),
    "affr": ("+ FBR + AFFR", MEAN_TEACHER + AFFR),
    "ss": ("+ FBR + AFFR + SS", MEAN_TEACHER + AFFR + SS),
    "ts": ("+ Two-stage", MEAN_TEACHER + TWO_STAGE),
    "affr_ts": ("+ FBR + AFFR + Two-stage", MEAN_TEACHER + AFFR + TWO_STAGE),
    "all": ("+ FBR + AFFR + Two-stage + SS", MEAN_TEACHER + AFFR + TWO_STAGE + SS),
    # the recipe switches of short schedules (README, "Recipe switches")
    "mt_focal": ("Mean Teacher, focal 1.5", MEAN_TEACHER + FOCAL),
    "ss_focal": ("+ FBR + AFFR + SS, focal 1.5", MEAN_TEACHER + AFFR + SS + FOCAL),
    "mt_4to1": ("Mean Teacher, 4:1 unlabeled", MEAN_TEACHER + [RATIO_4]),
}
ACRST_ROWS = ("fbr", "affr", "ss", "affr_ts", "all", "ss_focal")  # compared with Mean Teacher too
# a recipe switch against the row it changes; the two-stage filter against the same row without it
VARIANT_OF = {"mt_focal": "mt", "ss_focal": "ss", "mt_4to1": "mt", "all": "ss", "affr_ts": "affr"}


# ------------------------------------------------------------------------------------------------
# statistics (unit-tested on fixed numbers)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN when a value is NaN)."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: list[float], b: list[float]) -> tuple[float, float, list[float]]:
    """Per-seed differences a_i - b_i of two rows that share each seed's burn-in: (mean, std, the differences)."""
    if len(a) != len(b):
        raise ValueError(f"paired rows need the same seeds ({len(a)} vs {len(b)} values)")
    diffs = [x - y for x, y in zip(a, b)]
    m, s = mean_std(diffs)
    return m, s, diffs


def verdict(mean: float, std: float, n: int) -> str:
    """THE RULE: an ordering only where the mean paired difference exceeds its spread over 2+ seeds."""
    if n < 2 or math.isnan(mean):
        return "too few seeds"
    if abs(mean) > std:
        return "higher" if mean > 0 else "lower"
    return "within the spread"


def row_values(runs: list[dict], rare: list[str]) -> dict[str, list[float]]:
    """Per seed, the row's end model (the teacher; the supervised row: its student): AP, AP50, rare APs."""
    ends = [r["teacher"] or r["supervised"] for r in runs]
    out = {"AP": [e["AP"] for e in ends], "AP50": [e["AP50"] for e in ends]}
    return out | {n: [e["AP_per_class"][n] for e in ends] for n in rare}


def comparisons(results: dict[str, list[dict]], rare: list[str]) -> list[tuple[str, str, str, float, float, list]]:
    """(row, baseline, metric, mean, std, per-seed differences) of every row against the supervised
    continuation, of every ACRST row against Mean Teacher, and of every recipe switch (and the two-stage
    filter) against the row it changes (VARIANT_OF), for AP and each rare class's AP."""
    values = {row: row_values(runs, rare) for row, runs in results.items()}
    pairs = [(row, "sup") for row in results if row != "sup" and "sup" in results]
    pairs += [(row, "mt") for row in results if row in ACRST_ROWS and "mt" in results]
    pairs += [(row, VARIANT_OF[row]) for row in results if VARIANT_OF.get(row) in results]
    out = []
    for row, base in pairs:
        for metric in ["AP", *rare]:
            m, s, d = paired(values[row][metric], values[base][metric])
            out.append((row, base, metric, m, s, d))
    return out


# ------------------------------------------------------------------------------------------------
# reading runs


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def burn_in_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, AP) of the burn-in's student evaluations."""
    return [(r["step"], r["AP"]) for r in records(run_dir) if r.get("kind") == "eval" and r["model"] == "student"]


def at_plateau(curve: list[tuple[int, float]]) -> bool:
    """The plateau rule (needs 2 x PLATEAU_WINDOW evaluations): see `plateau_gain`."""
    gain = plateau_gain(curve)
    return gain is not None and gain <= PLATEAU_AP


def plateau_gain(curve: list[tuple[int, float]]) -> float | None:
    """Mean AP of the last PLATEAU_WINDOW evaluations minus the mean of the PLATEAU_WINDOW before them;
    None with fewer than 2 x PLATEAU_WINDOW evaluations."""
    w = PLATEAU_WINDOW
    if len(curve) < 2 * w:
        return None
    aps = [ap for _, ap in curve]
    return sum(aps[-w:]) / w - sum(aps[-2 * w:-w]) / w


def rare_visibility(run_dir: Path, branch_step: int, rare: list[str]) -> dict[str, dict[str, float]]:
    """Per rare class, after the branch point: pseudo-labels the teacher kept (sum over steps, from the
    logged per-step averages), instances pasted from each bank (cumulative count at the last log), AP at
    each evaluation of the branch."""
    recs = [r for r in records(run_dir) if r["step"] > branch_step]
    train = [r for r in recs if r.get("kind") == "train"]
    steps = [b["step"] - a["step"] for a, b in zip([{"step": branch_step}] + train[:-1], train)]
    out = {}
    for n in rare:
        kept = sum(r.get(M.class_key(M.PSEUDO_COUNT, n), 0.0) * k for r, k in zip(train, steps))
        last = train[-1] if train else {}
        out[n] = {"kept": kept, "pasted_labeled": last.get(M.class_key(M.PASTED_LABELED, n), math.nan),
                  "pasted_pseudo": last.get(M.class_key(M.PASTED_PSEUDO, n), math.nan),
                  "ap": [(r["step"], r["AP_per_class"][n]) for r in recs
                         if r.get("kind") == "eval" and r["model"] == ("teacher" if r["stage"] != "supervised"
                                                                       else "student")]}
    return out


# ------------------------------------------------------------------------------------------------
# training


def _run(cmd: list[str], what: str, timing: dict, key: str) -> None:
    print(f"[ablate] {what}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[ablate] {what} failed (exit {proc.returncode})")
    timing[key] = timing.get(key, 0.0) + time.time() - t0
    print(f"[ablate] {what}: {time.time() - t0:.0f} s", flush=True)


def _train(args, run_dir: Path, extra: list[str], what: str, timing: dict, key: str) -> dict:
    if not (run_dir / "final_metrics.json").is_file():
        _run([sys.executable, "-m", "acrst_fast.train", args.config, *args.overrides, *extra,
              f"run.output_dir={run_dir}", "run.progress_bar=false", "eval.supervised_branch=false", "--resume"],
             what, timing, key)
    return json.loads((run_dir / "final_metrics.json").read_text())


def classifier(args, out: Path, seed: int, timing: dict) -> str:
    """The two-stage rows' SSMLL classifier of `seed`: --ssmll, or trained once for all rows."""
    if args.ssmll:
        return args.ssmll
    folder = out / "ssmll" / f"seed{seed}"
    if not (folder / "ssmll_metrics.json").is_file():
        resume = ["--resume"] if folder.is_dir() else []
        _run([sys.executable, "-m", "acrst_fast.train_ssmll", args.config, *args.overrides, f"run.seed={seed}",
              f"ssmll.output_dir={folder}", "run.progress_bar=false", *resume], f"SSMLL seed {seed}", timing,
             f"ssmll/seed{seed}")
    return str(folder / "ssmll_teacher.pt")


def burn_in(args, out: Path, seed: int, timing: dict) -> Path:
    """The seed's burn-in (with the Labeled bank filling), trained once; returns its last checkpoint."""
    run_dir = out / "burn_in" / f"seed{seed}"
    extra = [f"solver.pretrain_steps={args.burn_in}", f"solver.total_steps={args.burn_in}", "acrst.fbr=true",
             "acrst.selective_supervision=false", "ssmll.filter=single", f"eval.period={args.eval_period}",
             f"run.seed={seed}"]
    _train(args, run_dir, extra, f"burn-in, seed {seed}", timing, f"burn_in/seed{seed}")
    return run_dir / f"ckpt_{args.burn_in:08d}.pt"


def train_row(args, out: Path, row: str, seed: int, start: Path, timing: dict) -> dict:
    label, extra = ROWS[row]
    end = args.burn_in + args.mutual
    extra = [f"solver.pretrain_steps={end}" if e == SUPERVISED else e for e in extra]
    extra = [f"solver.batch_unlabeled={4 * args.batch_labeled}" if e == RATIO_4 else e for e in extra]
    if SUPERVISED not in ROWS[row][1]:
        extra = [*extra, f"solver.pretrain_steps={args.burn_in}"]
    if "ssmll.filter=two_stage" in extra:
        extra = [*extra, f"ssmll.checkpoint={classifier(args, out, seed, timing)}"]
    extra += [f"solver.total_steps={end}", f"eval.period={args.eval_period}", f"run.seed={seed}",
              f"run.branch_from={start}"]
    return _train(args, out / row / f"seed{seed}", extra, f"{label}, seed {seed}", timing, f"{row}/seed{seed}")


# ------------------------------------------------------------------------------------------------
# printing


def _pm(s: tuple[float, float]) -> str:
    return f"{s[0]:.2f} ± {s[1]:.2f}"


def row_table(results: dict[str, list[dict]], rare: list[str], counts: dict[str, int]) -> list[str]:
    head = f"{'row':<32}{'AP':>15}{'AP50':>15}" + "".join(f"{f'{n} ({counts[n]})':>17}" for n in rare)
    lines = [head, "-" * len(head)]
    for row, runs in results.items():
        v = row_values(runs, rare)
        lines.append(f"{ROWS[row][0]:<32}{_pm(mean_std(v['AP'])):>15}{_pm(mean_std(v['AP50'])):>15}"
                     + "".join(f"{_pm(mean_std(v[n])):>17}" for n in rare))
    return lines


def paired_table(results: dict[str, list[dict]], rare: list[str]) -> list[str]:
    lines = ["paired per-seed differences, mean ± std (rule: an ordering only where |mean| > std over 2+ seeds):"]
    n = min(len(r) for r in results.values())
    for row, base, metric, m, s, d in comparisons(results, rare):
        name = f"{ROWS[row][0]} - {ROWS[base][0]}"
        per_seed = ", ".join(f"{x:+.2f}" for x in d)
        lines.append(f"  {name:<62}{metric:>10} {m:+7.2f} ± {s:5.2f}  ({per_seed}): {verdict(m, s, n)}")
    return lines


def burn_in_lines(curves: dict[int, list[tuple[int, float]]]) -> list[str]:
    lines = [f"burn-in AP curve per seed (plateau rule: the mean AP of the last {PLATEAU_WINDOW} evaluations exceeds "
             f"the mean of the {PLATEAU_WINDOW} before them by <= {PLATEAU_AP} AP):"]
    for seed, curve in curves.items():
        pts = ", ".join(f"{s}: {ap:.2f}" for s, ap in curve)
        gain = plateau_gain(curve)
        said = "too few evaluations" if gain is None else f"window gain {gain:+.2f}"
        lines.append(f"  seed {seed}: {pts}  -> {said}, {'at its plateau' if at_plateau(curve) else 'NOT at its plateau'}")
    return lines


def visibility_lines(out: Path, rows: list[str], seeds: int, branch_step: int, rare: list[str]) -> list[str]:
    lines = ["rare classes after the branch point, mean over seeds: pseudo-labels kept, pasted from the Labeled / "
             "Pseudo bank, AP at each evaluation:"]
    for row in rows:
        vis = [rare_visibility(out / row / f"seed{s}", branch_step, rare) for s in range(seeds)]
        for n in rare:
            kept = statistics.fmean(v[n]["kept"] for v in vis)
            pl, pp = (statistics.fmean(v[n][k] for v in vis) for k in ("pasted_labeled", "pasted_pseudo"))
            steps = [s for s, _ in vis[0][n]["ap"]]
            aps = [statistics.fmean(dict(v[n]["ap"]).get(s, math.nan) for v in vis) for s in steps]
            curve = ", ".join(f"{s}: {a:.1f}" for s, a in zip(steps, aps))
            pasted = "" if math.isnan(pl) else f", pasted {pl:.0f} / {pp:.0f}"
            lines.append(f"  {ROWS[row][0]:<32}{n:>10}: kept {kept:.0f}{pasted}; AP {curve}")
    return lines


def compute_lines(timing: dict, rows: list[str], seeds: int) -> list[str]:
    """What sharing the burn-in saved: each row after the first would otherwise train its own."""
    burn = [timing[f"burn_in/seed{s}"] for s in range(seeds) if f"burn_in/seed{s}" in timing]
    if not burn:
        return ["compute: no burn-in time in timing.json (trained by an older ablate.py)"]
    per_seed = statistics.fmean(burn)
    branches = sum(timing.get(f"{r}/seed{s}", 0.0) for r in rows for s in range(seeds))
    saved = per_seed * seeds * (len(rows) - 1)
    timed = f" (timed on {len(burn)} of the {seeds} seeds)" if len(burn) < seeds else ""
    return [f"compute: burn-in {per_seed:.0f} s per seed{timed}, trained once and shared by {len(rows)} rows: "
            f"{saved:.0f} s saved, {saved / (saved + per_seed * seeds + branches):.0%} of what the ablation would cost "
            f"with a burn-in per row; branches {branches:.0f} s in all"]


def labeled_class_counts(run_dir: Path) -> dict[str, int]:
    stats = json.loads((run_dir / "dataset_stats.json").read_text())
    return dict(zip(stats["classes"], stats["labeled_class_counts"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--rows", nargs="+", default=["sup", "mt", "affr", "ss", "all"], choices=list(ROWS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (run.seed)")
    ap.add_argument("--burn-in", type=int, default=0, help="burn-in steps (default: the config's pretrain_steps)")
    ap.add_argument("--mutual", type=int, default=0, help="steps of every row after the burn-in (default: the "
                                                            "config's total_steps - pretrain_steps)")
    ap.add_argument("--eval-period", type=int, default=0, help="steps between evaluations (default: burn-in / 4)")
    ap.add_argument("--rare", type=int, default=2, help="how many of the rarest classes to show")
    ap.add_argument("--ssmll", default="", help="an SSMLL classifier file for the two-stage rows (default: one "
                                                  "trained per seed)")
    ap.add_argument("--train-seed", type=int, default=None, metavar="S",
                    help="train seed S's burn-in and rows only, and print nothing: seeds can then train in parallel "
                         "processes (e.g. OMP_NUM_THREADS=1 each); a run without it prints the table")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE applied to every run (e.g. solver.lr_steps=[900])")
    args = ap.parse_args()
    from acrst_fast.config import load_config

    solver = load_config(args.config, args.overrides).solver
    args.burn_in = args.burn_in or solver.pretrain_steps
    args.mutual = args.mutual or solver.total_steps - solver.pretrain_steps
    args.eval_period = args.eval_period or max(1, args.burn_in // 4)
    args.batch_labeled = solver.batch_labeled
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {row: [] for row in args.rows}
    for seed in range(args.seeds) if args.train_seed is None else [args.train_seed]:
        timing_file = out / f"timing_seed{seed}.json"  # one file per seed: parallel --train-seed processes
        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
        start = burn_in(args, out, seed, timing)
        timing_file.write_text(json.dumps(timing, indent=1))
        for row in args.rows:
            results[row].append(train_row(args, out, row, seed, start, timing))
            timing_file.write_text(json.dumps(timing, indent=1))
    if args.train_seed is not None:
        return
    timing = {k: v for f in sorted(out.glob("timing_seed*.json")) for k, v in json.loads(f.read_text()).items()}
    counts = labeled_class_counts(out / "burn_in" / "seed0")
    rare = sorted(counts, key=counts.get)[: args.rare]
    curves = {s: burn_in_curve(out / "burn_in" / f"seed{s}") for s in range(args.seeds)}
    text = "\n".join([
        f"{args.seeds} seeds; burn-in {args.burn_in} steps, then every row {args.mutual} steps from it "
        f"(steps {args.burn_in + 1}-{args.burn_in + args.mutual}); AP of the teacher (supervised: the student) "
        "on the validation split", *burn_in_lines(curves), "", *row_table(results, rare, counts), "",
        *paired_table(results, rare), "", *visibility_lines(out, args.rows, args.seeds, args.burn_in, rare), "",
        *compute_lines(timing, args.rows, args.seeds)])
    print("\n" + text)
    (out / "ablation.txt").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
