"""Benchmark: box operations of the C++ extension against their PyTorch references.

    python bench/box_ops.py [--sizes 64x64 512x512 2000x2000] [--plan 64x50x10] [--repeat 20]

Pairwise IoU: median milliseconds of `box_iou` (acrst_fast._C), `box_iou_ref` (PyTorch) and a
plain copy of the output's bytes (the memory roofline), and their ratios. Paste planning: one
batch of IMAGES x BOXES x PASTES planned by the C++ planner (`plan_paste`) and by the Python
reference (`plan_paste_ref`) from the same draws (checked equal), and a copy moving the plan's
input and output bytes. All measured in one run, on the CPU (the planner is host code).
"""
from __future__ import annotations

import argparse

import torch

from _timing import copy_ms, describe, median_ms
from acrst_fast import _ext
from acrst_fast.augment import PasteConfig, draw_uniforms, plan_paste, plan_paste_ref
from acrst_fast.ops import box_iou, box_iou_ref


def _boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 800
    return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 200], dim=1)


def bench_iou(sizes: list[str], repeat: int, gen: torch.Generator) -> None:
    print(f"{'IoU N x M':>12} {'C++ ms':>9} {'ref ms':>9} {'copy ms':>9} {'ref/C++':>8} {'copy/C++':>9}")
    for size in sizes:
        n, m = (int(v) for v in size.split("x"))
        a, b = _boxes(n, gen), _boxes(m, gen)
        torch.testing.assert_close(box_iou(a, b), box_iou_ref(a, b), atol=1e-5, rtol=1e-4)
        out = torch.empty(n, m)
        src = torch.rand(n, m)
        t_ext = median_ms(lambda: box_iou(a, b), repeat)
        t_ref = median_ms(lambda: box_iou_ref(a, b), repeat)
        t_copy = median_ms(lambda: out.copy_(src), repeat)
        print(f"{size:>12} {t_ext:9.3f} {t_ref:9.3f} {t_copy:9.3f} {t_ref / t_ext:8.2f} {t_copy / t_ext:9.2f}")


def bench_plan(spec: str, repeat: int, gen: torch.Generator) -> None:
    n_img, n_box, n_paste = (int(v) for v in spec.split("x"))
    k, entries = 80, 2000
    hw = [(int(torch.randint(480, 800, (), generator=gen)), int(torch.randint(640, 1333, (), generator=gen)))
          for _ in range(n_img)]
    boxes = [_boxes(n_box, gen).clamp(max=480) for _ in hw]
    labels = [torch.randint(1, k + 1, (n_box,), generator=gen) for _ in hw]
    bank = (torch.randperm(entries, generator=gen), torch.randint(1, k + 1, (entries,), generator=gen),
            torch.rand(entries, 2, generator=gen) * 300 + 4)
    probs = torch.rand(k, generator=gen, dtype=torch.float64)
    cfg = PasteConfig(n_min=n_paste, n_max=n_paste)
    draws = draw_uniforms(n_img, cfg, gen)
    fast = plan_paste(hw, boxes, labels, *bank, probs, cfg, draws=draws)
    ref = plan_paste_ref(hw, boxes, labels, *bank, probs, cfg, draws=draws)
    assert torch.equal(fast.ops, ref.ops) and all(torch.equal(a, b) for a, b in zip(fast.boxes, ref.boxes))
    out_bytes = fast.ops.numel() * 8 + sum(b.numel() * 4 + len(b) * 9 for b in fast.boxes) \
        + sum(b.numel() * 4 + len(b) * 8 for b in boxes) + draws[1].numel() * 8
    t_fast = median_ms(lambda: plan_paste(hw, boxes, labels, *bank, probs, cfg, draws=draws), repeat)
    t_ref = median_ms(lambda: plan_paste_ref(hw, boxes, labels, *bank, probs, cfg, draws=draws), max(3, repeat // 5))
    t_copy = copy_ms(out_bytes, repeat, torch.device("cpu"))
    print(f"{'plan IxBxP':>12} {'C++ ms':>9} {'ref ms':>9} {'copy ms':>9} {'ref/C++':>8} {'copy/C++':>9}")
    print(f"{spec:>12} {t_fast:9.3f} {t_ref:9.3f} {t_copy:9.3f} {t_ref / t_fast:8.1f} {t_copy / t_fast:9.3f}")
    print(f"  ({len(fast.ops)} pastes kept, {sum(len(b) for b in fast.boxes)} boxes after merging)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["64x64", "512x512", "2000x2000"])
    ap.add_argument("--plan", nargs="+", default=["64x50x10"], help="IMAGESxBOXESxPASTES batches to plan")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    if not _ext.HAS_EXT:
        raise SystemExit("acrst_fast._C is not built: pip install -e .")
    gen = torch.Generator().manual_seed(0)
    print(f"box ops on {describe(torch.device('cpu'))}")
    bench_iou(args.sizes, args.repeat, gen)
    for spec in args.plan:
        bench_plan(spec, args.repeat, gen)


if __name__ == "__main__":
    main()
