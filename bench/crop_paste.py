"""Benchmark: batched crop-paste, Triton kernel vs the reference's per-crop loop vs a copy roofline.

    python bench/crop_paste.py [--device auto] [--batch 16] [--pastes 10] [--size 800x1333]
                               [--dtypes float32 bfloat16 uint8] [--repeat 20]

One batch Tensor[B, 3, H, W] receives B x PASTES crops (bank crops 64 x 64 uint8, resized to
32..256 pixels a side, overlapping, some over the border). Prints median milliseconds of the
Triton kernel (`paste_pixels_triton`, one launch; CUDA only), of the reference
(`paste_pixels_ref`, one bilinear resize and slice copy per crop) and of the memory roofline: a
plain copy moving the bytes the paste must move (it writes the visible pasted pixels, 3 channels
x element size, and reads each crop of the bank once), with the ratios; copy/kernel is the
fraction of the roofline the kernel reaches. The kernel is timed as training calls it: the op
table and sizes on the host (`check=False`: the planner's table is not validated again), so the
call includes building the program table and its one upload; "kernel-only ms" beside it is the
device time of `_paste_kernel` from the profiler. Without a GPU the kernel columns say n/a: under
TRITON_INTERPRET=1 it is a correctness tool, not a speed.
"""
from __future__ import annotations

import argparse

import torch

from _timing import copy_ms, describe, median_ms, pick_device
from acrst_fast.augment import paste_pixels_ref

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def make_ops(batch: int, pastes: int, h_img: int, w_img: int, n_slots: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for n in range(batch):
        for _ in range(pastes):
            h, w = (int(v) for v in torch.randint(32, 257, (2,), generator=gen))
            x0 = int(torch.randint(-(w // 2), w_img - w + w // 2 + 1, (), generator=gen))
            y0 = int(torch.randint(-(h // 2), h_img - h + h // 2 + 1, (), generator=gen))
            rows.append([n, int(torch.randint(n_slots, (), generator=gen)), x0, y0, h, w,
                         int(torch.randint(2, (), generator=gen))])
    return torch.tensor(rows, dtype=torch.int64)


def written_pixels(ops: torch.Tensor, batch: int, h_img: int, w_img: int) -> int:
    """Pixels the paste must write: the union of each image's clipped paste rectangles."""
    cover = torch.zeros(batch, h_img, w_img, dtype=torch.bool)
    for n, _, x0, y0, h, w, _ in ops.tolist():
        cover[n, max(y0, 0):max(0, y0 + h), max(x0, 0):max(0, x0 + w)] = True
    return int(cover.sum())


def kernel_only_ms(fn, name: str = "_paste_kernel") -> float:
    """Device milliseconds of the kernels whose name contains `name` during `fn()`, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm (compilation)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum((getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0))
                for e in prof.key_averages() if name in e.key)
    return total / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pastes", type=int, default=10)
    ap.add_argument("--size", default="800x1333")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "uint8"], choices=list(DTYPES))
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    device = pick_device(args.device)
    h_img, w_img = (int(v) for v in args.size.split("x"))
    gen = torch.Generator().manual_seed(0)
    bank = torch.randint(0, 256, (512, 3, 64, 64), dtype=torch.uint8, generator=gen).to(device)
    ops = make_ops(args.batch, args.pastes, h_img, w_img, len(bank), gen)
    hw = torch.tensor([[h_img, w_img]] * args.batch)
    pixels = written_pixels(ops, args.batch, h_img, w_img)
    kernel = None
    if device.type == "cuda":
        from acrst_fast.kernels.crop_paste import paste_pixels_triton as kernel
    print(f"crop-paste on {describe(device)}: batch {args.batch} x 3 x {h_img} x {w_img}, {len(ops)} pastes, "
          f"{pixels / 1e6:.2f} M visible pasted pixels")
    print(f"{'dtype':>9} {'call ms':>10} {'kernel-only':>12} {'ref ms':>9} {'copy ms':>9} {'ref/call':>9} "
          f"{'copy/kernel':>12} {'ref/copy':>9}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        images = torch.zeros(args.batch, 3, h_img, w_img, dtype=dtype, device=device)
        t_ref = median_ms(lambda: paste_pixels_ref(images, ops, bank), max(3, args.repeat // 4), device)
        t_copy = copy_ms(pixels * 3 * images.element_size() + len(ops) * bank[0].numel(), args.repeat, device)
        if kernel is not None:
            expect = paste_pixels_ref(torch.zeros_like(images), ops, bank)
            got = kernel(torch.zeros_like(images), hw, ops, bank)
            max_err = (got.float() - expect.float()).abs().max().item()
            t_call = median_ms(lambda: kernel(images, hw, ops, bank, check=False), args.repeat, device)
            t_k = kernel_only_ms(lambda: kernel(images, hw, ops, bank, check=False))
            print(f"{name:>9} {t_call:10.3f} {t_k:12.3f} {t_ref:9.3f} {t_copy:9.3f} {t_ref / t_call:9.1f} "
                  f"{t_copy / t_k:12.2f} {t_ref / t_copy:9.1f}   (max |kernel - ref| {max_err:.3g})")
        else:
            print(f"{name:>9} {'n/a':>10} {'n/a':>12} {t_ref:9.3f} {t_copy:9.3f} {'n/a':>9} {'n/a':>12} "
                  f"{t_ref / t_copy:9.1f}")


if __name__ == "__main__":
    main()
