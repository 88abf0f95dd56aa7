"""Run report: `python -m acrst_fast.report RUN_DIR` writes RUN_DIR/report/ (PNG figures + report.md).

Reads only the run folder (metrics.jsonl, dataset_stats.json, final_metrics.json, config.yaml,
checkpoints), so it works on a finished run, on a running one, and on a folder copied to a
machine without the dataset. A figure whose inputs are missing is skipped with a note saying why;
a log cut by a kill (a partial last line) is read up to the damage, with a note.

Figures: losses.png (per head, and the learning rate), map.png (teacher/student AP over
evaluations), class_distribution.png (ground truth vs pseudo-labels, KL over time; paper Fig. 1
and 4b), pseudo_recall.png (per-class PR_k and mu_k over time), pseudo_quality.png (pseudo-label
precision/recall where hidden ground truth is logged; Fig. 2, 5), per_class_ap.png (last
evaluation, classes by frequency; Fig. 6), paste_grid.png (training images after crop-paste).
"""
from __future__ import annotations

from acrst_fast import metric_names as M
from acrst_fast.errors import cli_main
from acrst_fast.safe_io import OutputError

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class RunLogs:
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    stats: dict | None = None
    final: dict | None = None
    notes: list[str] = field(default_factory=list)


def read_logs(run_dir: Path) -> RunLogs:
    logs = RunLogs()
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        logs.notes.append("metrics.jsonl not found: no training or evaluation records")
    else:
        bad, foreign = 0, []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
                foreign.append(n)  # valid JSON, but not a record of this engine
                continue
            if rec.get("kind") == "branch":  # where a branched run started (train --branch-from)
                logs.notes.append(f"branched at step {rec['step']} from {rec.get('from', '?')}")
                continue
            (logs.evals if rec.get("kind") == "eval" else logs.train).append(rec)
        if bad:
            logs.notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped (a run killed mid-write)")
        if foreign:
            logs.notes.append(f"metrics.jsonl: {len(foreign)} line(s) skipped that are not records (an object with "
                              f"an integer 'step'), first: line {foreign[0]}")
    for name, attr in (("dataset_stats.json", "stats"), ("final_metrics.json", "final")):
        p = run_dir / name
        if p.is_file():
            try:
                value = json.loads(p.read_text(encoding="utf-8", errors="replace"))
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                setattr(logs, attr, value)
            else:
                logs.notes.append(f"{name}: unreadable or not an object, ignored")
    if logs.final is None:
        logs.notes.append("final_metrics.json not found: the run has not finished (figures show what is logged)")
    return logs


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _keys_with(records: list[dict], prefix: str) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith(prefix):
                seen[k] = None
    return list(seen)


FIGURES = ('losses.png', 'map.png', 'class_distribution.png', 'pseudo_recall.png', 'pseudo_quality.png', 'per_class_ap.png', 'paste_grid.png')  # the only files the report replaces in RUN_DIR/report/ (with report.md)


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def fig_losses(logs: RunLogs, out: Path) -> str | None:
    loss_keys = _keys_with(logs.train, M.class_prefix(M.SUP)) + _keys_with(logs.train, M.class_prefix(M.UNSUP))
    if not loss_keys:
        return None
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(12, 4))
    for k in loss_keys:
        ax.plot(*_series(logs.train, k), label=k, linestyle="-" if k.startswith(M.class_prefix(M.SUP)) else "--")
    ax.plot(*_series(logs.train, M.TOTAL), label="total", color="black", linewidth=1.5)
    ax.set(xlabel="step", ylabel="loss", title="losses (sup: solid, unsup: dashed)", yscale="log")
    ax.legend(fontsize=7)
    ax_lr.plot(*_series(logs.train, "lr"))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    return _save(fig, out, "losses.png")


def fig_map(logs: RunLogs, out: Path) -> str | None:
    if not logs.evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, color in (("teacher", "tab:blue"), ("student", "tab:orange")):
        recs = [e for e in logs.evals if e.get("model") == model]
        if recs:
            ax.plot(*_series(recs, "AP"), "o-", color=color, label=f"{model} AP")
            ax.plot(*_series(recs, "AP50"), "s--", color=color, label=f"{model} AP50", alpha=0.6)
    ax.set(xlabel="step", ylabel="%", title="mAP on the validation split")
    ax.legend()
    return _save(fig, out, "map.png")


def _kl(p: list[float], q: list[float], eps: float = 1e-6) -> float:
    sp, sq = sum(p), sum(q)
    if sp <= 0 or sq <= 0:
        return float("nan")
    qs = [max(x / sq, eps) for x in q]
    z = sum(qs)
    return sum((x / sp) * math.log((x / sp) / (y / z)) for x, y in zip(p, qs) if x > 0)


def fig_class_distribution(logs: RunLogs, out: Path) -> tuple[str | None, str | None]:
    """GT vs pseudo-label class distribution, and KL(GT || pseudo-labels) per log window."""
    if not logs.stats:
        return None, "class_distribution.png: dataset_stats.json not found (written at the start of training)"
    classes, gt = logs.stats["classes"], logs.stats["labeled_class_counts"]
    order = sorted(range(len(classes)), key=lambda i: -gt[i])
    count_keys = [M.class_key(M.PSEUDO_COUNT, c) for c in classes]
    windows = [r for r in logs.train if any(k in r for k in count_keys)]
    pl = [sum(r.get(k, 0.0) for r in windows) for k in count_keys]
    note = None if windows else "class_distribution.png: no pseudo-labels logged yet (pre-training only): ground truth alone"
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(classes))
    gt_total = sum(gt) or 1
    ax.bar([i - 0.2 for i in x], [gt[i] / gt_total for i in order], width=0.4, label="ground truth (labeled)")
    if windows and sum(pl) > 0:
        ax.bar([i + 0.2 for i in x], [pl[i] / sum(pl) for i in order], width=0.4, label="pseudo-labels")
    ax.set_xticks(list(x), [classes[i] for i in order], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="fraction of boxes", title="class distribution (by ground-truth frequency)")
    ax.legend()
    steps, kls = [], []
    for r in windows:
        kl = _kl(gt, [r.get(k, 0.0) for k in count_keys])
        if math.isfinite(kl):
            steps.append(r["step"])
            kls.append(kl)
    ax_kl.plot(steps, kls, label="KL(GT || pseudo-labels), per log window")
    ax_kl.plot(*_series(logs.train, M.KL_GT_PL), label="KL over the PR window (ACRST)", linestyle="--")
    ax_kl.set(xlabel="step", ylabel="KL divergence", title="class-distribution gap")
    ax_kl.legend(fontsize=8)
    return _save(fig, out, "class_distribution.png"), note


def fig_pseudo_recall(logs: RunLogs, out: Path) -> str | None:
    pr_keys, mu_keys = _keys_with(logs.train, M.class_prefix(M.PR)), _keys_with(logs.train, M.class_prefix(M.MU))
    if not pr_keys:
        return None
    fig, (ax_pr, ax_mu) = plt.subplots(1, 2, figsize=(12, 4))
    for k in pr_keys:
        ax_pr.plot(*_series(logs.train, k), label=k.rsplit("/", 1)[1])
    sampled = _keys_with(logs.train, M.class_prefix(M.MU_SAMPLED))
    for i, k in enumerate(sampled or mu_keys):  # what the planner samples from, solid; raw mu dashed beside it
        name = k.rsplit("/", 1)[1]
        ax_mu.plot(*_series(logs.train, k), color=f"C{i % 10}", label=name)
        if sampled:
            ax_mu.plot(*_series(logs.train, M.class_key(M.MU, name)), color=f"C{i % 10}", linestyle="--", alpha=0.6)
    ax_pr.set(xlabel="step", ylabel="PR_k", title="Pseudo Recall per class (Eq. 8)", yscale="symlog")
    ax_mu.set(xlabel="step", ylabel="mu_k", title="class sampling: sampled (solid), raw mu of Eq. 9 (dashed)"
              if sampled else "AFFR sampling probability per class (Eq. 9)")
    for ax in (ax_pr, ax_mu):
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, out, "pseudo_recall.png")


def fig_pseudo_quality(logs: RunLogs, out: Path) -> str | None:
    """Precision = tp / pseudo-labels, recall = tp / hidden ground truths, per log window (IoU 0.5, class-aware)."""
    recs = [r for r in logs.train if M.PSEUDO_TP in r]
    if not recs:
        return None
    steps = [r["step"] for r in recs]
    precision = [r[M.PSEUDO_TP] / r[M.PSEUDO_NUM] if r[M.PSEUDO_NUM] else float("nan") for r in recs]
    recall = [r[M.PSEUDO_TP] / r[M.PSEUDO_NUM_GT] if r[M.PSEUDO_NUM_GT] else float("nan") for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    two_stage = any(M.STAGE1_TP in r for r in recs)  # two-stage filtering: stage 1 dashed (Fig. 5a)
    ax.plot(steps, precision, label="precision (after stage 2)" if two_stage else "precision")
    ax.plot(steps, recall, label="recall (after stage 2)" if two_stage else "recall")
    if two_stage:
        s1 = [r for r in recs if M.STAGE1_TP in r]
        ax.plot([r["step"] for r in s1], [r[M.STAGE1_TP] / r[M.STAGE1_NUM]
                                          if r[M.STAGE1_NUM] else float("nan") for r in s1],
                "--", color="C0", label="precision (stage 1: score only)")
        ax.plot([r["step"] for r in s1], [r[M.STAGE1_TP] / r[M.PSEUDO_NUM_GT]
                                          if r[M.PSEUDO_NUM_GT] else float("nan") for r in s1],
                "--", color="C1", label="recall (stage 1: score only)")
    ax.set(xlabel="step", ylim=(0, 1.02), title="pseudo-label quality vs hidden ground truth (IoU >= 0.5)")
    ax.legend()
    return _save(fig, out, "pseudo_quality.png")


def fig_per_class_ap(logs: RunLogs, out: Path) -> tuple[str | None, dict | None]:
    if not logs.evals:
        return None, None
    last_step = max(e["step"] for e in logs.evals)
    last = [e for e in logs.evals if e["step"] == last_step]
    entry = next((e for e in last if e["model"] == "teacher"), last[0])
    per_class = entry.get("AP_per_class") or {}
    if not per_class:
        return None, None
    names = list(per_class)
    if logs.stats:
        freq = dict(zip(logs.stats["classes"], logs.stats["labeled_class_counts"]))
        names.sort(key=lambda n: -freq.get(n, 0))
        labels = [f"{n} ({freq.get(n, 0)})" for n in names]
    else:
        labels = names
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    ax.bar(range(len(names)), [per_class[n] if math.isfinite(per_class[n]) else 0 for n in names])
    ax.set_xticks(range(len(names)), labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="AP (%)", title=f"per-class AP, {entry['model']} at step {last_step} (frequent -> rare)")
    return _save(fig, out, "per_class_ap.png"), entry


def fig_paste_grid(run_dir: Path, out: Path, n_images: int = 6) -> tuple[str | None, str | None]:
    """Training images after crop-paste: own boxes green, pasted boxes red. Needs the dataset and ACRST."""
    from acrst_fast.config import ConfigError, load_config

    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        return None, f"paste_grid.png: cannot read the run's config ({exc})"
    if not cfg.acrst.fbr:
        return None, "paste_grid.png: ACRST crop-paste (acrst.fbr) is off in this run"
    from acrst_fast.data.build import load_datasets, resolved_data
    from acrst_fast.data.coco import DataError

    try:
        data = load_datasets(resolved_data(cfg.data))
    except DataError as exc:
        return None, f"paste_grid.png: the dataset is not available here ({exc})"
    import torch

    from acrst_fast.data.loader import DetectionViews
    from acrst_fast.engine import checkpoint as ckpt
    from acrst_fast.engine.build import build_acrst

    acrst = build_acrst(cfg, data.categories.num_classes, torch.device("cpu"))
    from acrst_fast.engine.resume import rank_state_of
    from acrst_fast.streams import report_sample_seed

    latest = ckpt.latest_checkpoint(run_dir)
    part = rank_state_of(run_dir, ckpt.list_checkpoints(run_dir)[-1][0], 0) if latest else None
    views = DetectionViews(data.labeled[:n_images], cfg.augment, ("weak",), train=True, with_boxes=True)
    samples = [views[(i, report_sample_seed(i))] for i in range(len(views))]
    if part is not None:
        acrst.load_state_dict(part["acrst"])
        source = f"CropBank of checkpoint {latest.name}"
    else:
        acrst.add_ground_truth([s["weak"] for s in samples], [s["boxes"] for s in samples],
                               [s["labels"] for s in samples])
        source = "a Labeled CropBank of these images (no checkpoint yet)"
    images = [s["weak"].clone() for s in samples]
    _, boxes, labels, pasted = acrst.rebalance(images, [s["boxes"] for s in samples], [s["labels"] for s in samples],
                                               torch.Generator().manual_seed(0))
    cols = 3
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, b, lab, p in zip(axes.flat, images, boxes, labels, pasted):
        ax.imshow(img.permute(1, 2, 0).numpy())
        for (x1, y1, x2, y2), k, is_pasted in zip(b.tolist(), lab.tolist(), p.tolist()):
            color = "red" if is_pasted else "lime"
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, linewidth=1.5))
            ax.text(x1, y1, data.categories.names[k - 1], color=color, fontsize=7, va="bottom")
    fig.suptitle(f"after crop-paste (green: own boxes, red: pasted) - {source}")
    return _save(fig, out, "paste_grid.png"), None


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/{*.png, report.md}; returns the path of report.md."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir}: run folder not found")
    out = run_dir / "report"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the report folder names a file")
    out.mkdir(exist_ok=True)
    for name in FIGURES:  # this report's own figures only; anything else in the folder is left alone
        (out / name).unlink(missing_ok=True)
    logs = read_logs(run_dir)
    figures, notes = [], list(logs.notes)

    def add(name: str | None, note: str | None, note_only_if_missing: bool = True) -> None:
        if name:
            figures.append(name)
        if note and (not name or not note_only_if_missing):
            notes.append(note)

    add(fig_losses(logs, out), "losses.png: no training records yet")
    add(fig_map(logs, out), "map.png: no evaluation yet")
    add(*fig_class_distribution(logs, out), note_only_if_missing=False)
    add(fig_pseudo_recall(logs, out), "pseudo_recall.png: no Pseudo Recall logged (ACRST off, or mutual learning "
                                      "not started)")
    add(fig_pseudo_quality(logs, out), "pseudo_quality.png: no pseudo-label precision/recall in the logs (needs "
                                       "unlabeled data with hidden ground truth, after pre-training)")
    name, last_eval = fig_per_class_ap(logs, out)
    add(name, "per_class_ap.png: no per-class AP logged yet")
    add(*fig_paste_grid(run_dir, out))
    (out / "report.md").write_text(_summary(run_dir, logs, figures, notes, last_eval), encoding="utf-8")
    return out / "report.md"


def _summary(run_dir: Path, logs: RunLogs, figures: list[str], notes: list[str], last_eval: dict | None) -> str:
    lines = [f"# Run report: `{run_dir}`", ""]
    if logs.stats:
        s = logs.stats
        lines += [f"Data: {s['num_labeled']} labeled, {s['num_unlabeled']} unlabeled, {s['num_val']} validation "
                  f"images; {len(s['classes'])} classes.", ""]
    if logs.train:
        last = logs.train[-1]
        lines += [f"Last logged step: {last['step']} ({last.get('phase', '?')}), loss {last.get('total', float('nan')):.4f}, "
                  f"lr {last.get('lr', float('nan')):.5g}, {last.get('images_per_s', float('nan')):.1f} images/s.", ""]
    if logs.evals:
        lines += ["## Evaluations", "", "| step | model | stage | AP | AP50 | VOC AP50 |", "| --- | --- | --- | --- | --- | --- |"]
        for e in logs.evals:
            lines.append(f"| {e['step']} | {e['model']} | {e.get('stage', '')} | {e['AP']:.2f} | {e['AP50']:.2f} | "
                         f"{e.get('voc_AP50', float('nan')):.2f} |")
        base = (logs.final or {}).get("supervised_same_steps")
        if base:  # eval.supervised_branch: supervised training alone for the same steps (RUN_DIR/supervised)
            lines.append(f"| {base['step']} | student | supervised, same steps (branch) | {base['AP']:.2f} | "
                         f"{base['AP50']:.2f} | {base.get('voc_AP50', float('nan')):.2f} |")
        lines.append("")
    if last_eval and last_eval.get("AP_per_class"):
        freq = dict(zip(logs.stats["classes"], logs.stats["labeled_class_counts"])) if logs.stats else {}
        lines += [f"## Per-class AP ({last_eval['model']}, step {last_eval['step']})", "",
                  "| class | labeled boxes | AP |", "| --- | --- | --- |"]
        for n, ap in sorted(last_eval["AP_per_class"].items(), key=lambda kv: -freq.get(kv[0], 0)):
            lines.append(f"| {n} | {freq.get(n, '?')} | {ap:.2f} |")
        lines.append("")
    lines += _pseudo_per_class(logs)
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _pseudo_per_class(logs: RunLogs) -> list[str]:
    """Pseudo-label precision and recall per class against the hidden ground truth, over every logged
    mutual step (pooled figures mostly describe the head class; the rare classes are the point)."""
    if not logs.stats:
        return []
    freq = dict(zip(logs.stats["classes"], logs.stats["labeled_class_counts"]))
    rows = []
    for name in sorted(freq, key=lambda n: -freq[n]):
        keys = [M.class_key(g, name) for g in (M.PSEUDO_TP, M.PSEUDO_NUM, M.PSEUDO_NUM_GT)]
        recs = [r for r in logs.train if keys[0] in r]
        if recs:
            tp, n_pl, n_gt = (sum(r[k] for r in recs) for k in keys)
            precision = f"{tp / n_pl:.3f}" if n_pl else "-"
            recall = f"{tp / n_gt:.3f}" if n_gt else "-"
            pasted = [logs.train[-1].get(M.class_key(g, name)) for g in (M.PASTED_LABELED, M.PASTED_PSEUDO)]
            pasted_text = " / ".join(f"{v:.0f}" for v in pasted) if None not in pasted else "-"
            rows.append(f"| {name} | {freq[name]} | {n_pl / len(recs):.2f} | {precision} | {recall} | {pasted_text} |")
    if not rows:
        return []
    return ["## Pseudo-labels per class (hidden ground truth, IoU 0.5, all logged mutual steps)", "",
            "Rarest classes last; pasted: instances FBR pasted from the Labeled / Pseudo bank (did AFFR reach them?).",
            "", "| class | labeled boxes | pseudo-labels per step | precision | recall | pasted (Labeled / Pseudo) |",
            "| --- | --- | --- | --- | --- | --- |", *rows, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    return cli_main(lambda: print(f"report: {write_report(args.run_dir)}"))


if __name__ == "__main__":
    raise SystemExit(main())
