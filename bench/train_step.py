"""Benchmark: one mutual-learning step of ACRST, broken into its parts.

    python bench/train_step.py [CONFIG] [--steps 10] [--warmup 3] [KEY=VALUE ...]   (any order)
    python bench/train_step.py --paper [--scale 800] [--steps 10] [--warmup 3] [KEY=VALUE ...]

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
and ACRST's extra work (PR + bank + planning + paste) as a share of the whole step. Then the whole step
without the boundary synchronisations (STEPS steps back to back, one synchronisation at the end), as the
trainer runs it.

--paper: the paper's per-rank configuration (configs/coco_additional.yaml, i.e. _paper_base.yaml at 8 GPUs:
4 labeled + 4 unlabeled images a rank): ResNet-50 FPN with FrozenBatchNorm2d and 3 trainable stages (the
ImageNet-weights path, from a random weights file with calibrated statistics: bench/_floor.py), the COCO
photos shipped in tests/data/coco (varied aspect) at --scale (800: 800 x ~1,200, max 1,333), RPN top-n
2000/2000 train and 1000/1000 test, 512 RoIs per image, FBR + AFFR + selective supervision + the
two-stage filter (an untrained R50 SSMLL classifier at 576 px), bf16 and channels-last on CUDA. In the same
run it also times torchvision's stock `fasterrcnn_resnet50_fpn` supervised training step on the same 8
images (the labeled batch and the unlabeled batch with its hidden ground truth) and prints the compute
floor: the step's counted FLOPs over the bf16 (CPU: float32) matmul peak measured now, with the ratios
step / stock step and step / floor. On a CPU use a small --scale (e.g. 320) for a dry run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _timing import describe, median_ms, sync, timing_classifier
from acrst_fast import dist
from acrst_fast.config import load_config
from acrst_fast.data.build import load_datasets, prepare_data, resolved_data
from acrst_fast.engine.build import build_runner

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests" / "data" / "coco"
PARTS = [("data wait", "data"), ("teacher forward", "teacher_only"), ("pseudo recall", "acrst_pr"),
         ("bank update", "acrst_bank"), ("planning", "acrst_plan"), ("paste", "acrst_paste"),
         ("student fwd/bwd", "student"), ("EMA", "ema")]
ACRST_PARTS = ("acrst_pr", "acrst_bank", "acrst_plan", "acrst_paste")


def paper_overrides(scale: int, device: str, out: Path) -> list[str]:
    """The paper's per-rank setting on the shipped COCO photos (see the module doc)."""
    from _floor import calibrated_resnet50

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    weights = calibrated_resnet50(out / "resnet50_calibrated.pth")
    ann = COCO / "annotations"
    return [f"data.train_json={ann / 'instances_train2017.json'}", f"data.train_images={COCO / 'train2017'}",
            f"data.unlabeled_json={ann / 'instances_val2017.json'}", f"data.unlabeled_images={COCO / 'val2017'}",
            f"data.val_json={ann / 'instances_val2017.json'}", f"data.val_images={COCO / 'val2017'}",
            "data.split_percent=0", f"augment.scales=[{scale}]", f"augment.max_size={scale * 1333 // 800}",
            f"augment.test_scale={scale}", "solver.batch_labeled=4", "solver.batch_unlabeled=4",
            f"model.backbone_weights={weights}", "ssmll.backbone_weights=random", f"run.device={device}",
            # random weights at the paper's lr 0.01 diverge within a step or two and leave the step without
            # proposals (no RoI work to time): a tiny lr keeps the model as it is, at the same cost per step
            "solver.lr=1e-6",
            f"solver.amp={'bf16' if cuda else 'off'}", f"solver.channels_last={'true' if cuda else 'false'}"]


def build(args):
    out = Path(tempfile.mkdtemp(prefix="bench_step_"))
    total = args.warmup + 2 * args.steps + 2
    config = str(REPO / "configs" / "coco_additional.yaml") if args.paper else args.config
    device = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run.device=")), "auto")
    overrides = ["acrst.fbr=true", "acrst.selective_supervision=true", "solver.pretrain_steps=1",
                 f"solver.total_steps={total}", f"run.output_dir={out}",
                 *(paper_overrides(args.scale, device, out) if args.paper else []), *args.overrides]
    cfg = load_config(config, overrides)
    info = dist.init_distributed(cfg.run.device)
    prepare_data(cfg)
    datasets = load_datasets(resolved_data(cfg.data))
    cfg = timing_classifier(cfg, datasets.categories.names)
    runner, _ = build_runner(cfg, datasets, info, config)
    runner.start(0)
    return cfg, info, runner, config


def time_parts(args, runner, device) -> tuple[dict[str, float], int]:
    """Median seconds of each part over STEPS mutual steps, with the device synchronised at every boundary.
    Returns (medians in ms, the next step)."""
    runner.sync_timing = runner.acrst.sync_timing = True
    rows: list[dict[str, float]] = []
    step = 0
    while len(rows) < args.steps:
        out = runner.run_step(step)
        sync(device)
        t0 = time.perf_counter()
        runner.update_teacher()
        sync(device)
        sec = dict(out.seconds, ema=time.perf_counter() - t0)
        # observe_teacher (PR + bank) runs inside the teacher section: take it out
        sec["teacher_only"] = sec["teacher"] - sec.get("acrst_pr", 0.0) - sec.get("acrst_bank", 0.0)
        sec["step"] = sum(v for k, v in sec.items() if k in {"data", "teacher", "acrst", "student", "ema"})
        if out.phase == "mutual" and step > args.warmup:
            rows.append(sec)
        step += 1
    runner.sync_timing = runner.acrst.sync_timing = False
    return {k: statistics.median(r.get(k, 0.0) for r in rows) * 1e3 for k in rows[0]}, step


def time_whole(runner, device, start: int, steps: int) -> float:
    """Milliseconds per mutual step, `steps` steps back to back (no boundary synchronisation)."""
    sync(device)
    t0 = time.perf_counter()
    for step in range(start, start + steps):
        runner.run_step(step)
        runner.update_teacher()
    sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def print_parts(med: dict[str, float]) -> None:
    print(f"{'part':>18} {'ms':>9} {'share':>7}")
    for name, key in PARTS:
        print(f"{name:>18} {med.get(key, 0.0):9.2f} {med.get(key, 0.0) / med['step']:7.1%}")
    other = med["step"] - sum(med.get(k, 0.0) for _, k in PARTS)
    print(f"{'other':>18} {other:9.2f} {other / med['step']:7.1%}")
    print(f"{'step':>18} {med['step']:9.2f} {1:7.1%}")
    extra = sum(med.get(k, 0.0) for k in ACRST_PARTS)
    print(f"ACRST extra work (PR + bank + planning + paste): {extra:.2f} ms = {extra / med['step']:.1%} of the step")


def stock_and_floor(runner, cfg, device, step: int, whole_ms: float, repeat: int) -> None:
    """torchvision's stock supervised step on the same 8 images, the counted FLOPs and the floor."""
    from _floor import count_flops, peak_flops, stock_detector, stock_step

    lab, unl = next(runner.data.labeled(0)), next(runner.data.unlabeled(0))
    lab, unl = (b.finish_views(device) if b.raw else b for b in (lab, unl))
    images = [im.to(device) for im in lab.strong + unl.strong]
    targets = lab.targets(device) + unl.targets(device)  # the unlabeled batch's hidden ground truth; labels 1..80
    dtype = runner.precision.dtype
    model = stock_detector(device, Path(cfg.model.backbone_weights), max(cfg.augment.scales), cfg.augment.max_size)
    if cfg.solver.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    stock_ms = median_ms(lambda: stock_step(model, opt, images, targets, dtype), repeat, device, warmup=2)
    stock_flops = count_flops(lambda: stock_step(model, opt, images, targets, dtype))
    step_flops = count_flops(lambda: (runner.run_step(step), runner.update_teacher()))
    peak = peak_flops(device, dtype or torch.float32)
    floor_ms, stock_floor = step_flops / peak * 1e3, stock_flops / peak * 1e3
    hs, ws = [im.shape[1] for im in images], [im.shape[2] for im in images]
    print(f"\nthe same 8 images (heights {min(hs)}..{max(hs)}, widths {min(ws)}..{max(ws)}); matmul peak measured "
          f"now: {peak / 1e12:.1f} TFLOP/s ({dtype or torch.float32})")
    print(f"{'':>44} {'ms':>9} {'TFLOP':>8} {'floor ms':>9} {'x floor':>8}")
    print(f"{'ACRST mutual step (4 + 4, teacher on 4)':>44} {whole_ms:9.2f} {step_flops / 1e12:8.3f} {floor_ms:9.2f} "
          f"{whole_ms / floor_ms:8.2f}")
    print(f"{'torchvision stock supervised step (8)':>44} {stock_ms:9.2f} {stock_flops / 1e12:8.3f} {stock_floor:9.2f} "
          f"{stock_ms / stock_floor:8.2f}")
    print(f"step / stock supervised step: {whole_ms / stock_ms:.2f}; step / floor: {whole_ms / floor_ms:.2f} "
          "(FLOPs of matmuls and convolutions only: the floor is a lower bound)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--paper", action="store_true", help="the paper's configuration on tests/data/coco (module doc)")
    ap.add_argument("--scale", type=int, default=800, help="--paper: the short side of the images")
    ap.add_argument("overrides", nargs="*", help="dotted KEY=VALUE config overrides")
    args = ap.parse_intermixed_args()  # CONFIG --steps N KEY=VALUE, in any order
    if args.paper and args.config != str(REPO / "configs" / "demo.yaml"):
        if "=" not in args.config:
            raise SystemExit("--paper uses configs/coco_additional.yaml; give overrides, not a config")
        args.overrides = [args.config, *args.overrides]  # the first override, taken for the CONFIG positional
        args.config = str(REPO / "configs" / "demo.yaml")
    cfg, info, runner, config = build(args)
    med, step = time_parts(args, runner, info.device)
    whole = time_whole(runner, info.device, step, args.steps)
    print(f"mutual-learning step on {describe(info.device)}: {'paper configuration' if args.paper else Path(config).name}, "
          f"{cfg.solver.batch_labeled} labeled + {cfg.solver.batch_unlabeled} unlabeled images, "
          f"backbone {cfg.model.backbone}, amp {runner.precision.dtype}, median of {args.steps} steps")
    print_parts(med)
    print(f"whole step, {args.steps} back to back without boundary synchronisation: {whole:.2f} ms")
    if args.paper:
        stock_and_floor(runner, cfg, info.device, step + args.steps, whole, args.steps)


if __name__ == "__main__":
    sys.exit(main())
