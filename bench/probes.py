"""GPU probes for acrst_fast (run from the repo root, by bench/gpu_check.sh): python bench/probes.py SECTION [SECTION ...]

Sections: triton  syncs  bf16  bank  (each prints its own result; one failing does not stop the others)
On a machine without CUDA it runs small versions where that makes sense (for a dry run of the code).
"""
import os
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

REPO = Path.cwd()
sys.path.insert(0, str(REPO / "tests"))
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
WORK = Path(os.environ.get("PROBE_WORK", "/tmp/acrst_probe"))
WORK.mkdir(parents=True, exist_ok=True)


def section(name):
    print(f"\n----- probe: {name} ({DEV}) -----", flush=True)


def kernel_ms(fn, name_part):
    """Device time of kernels whose name contains name_part, from the profiler (ms), or None."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    tot = 0.0
    for ev in prof.key_averages():
        if name_part in ev.key:
            tot += getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
    return tot / 1e3


def probe_triton():
    """Paper-scale batch: kernel == reference (GPU), padding untouched, later-on-top, timing, grid waste."""
    section("triton crop-paste at paper scale")
    from acrst_fast.augment import paste_pixels_ref
    from acrst_fast.kernels.crop_paste import BLOCK_H, BLOCK_W, paste_pixels_triton
    B, H, W = (32, 800, 1333) if CUDA else (2, 60, 90)
    g = torch.Generator().manual_seed(0)
    cell = 128  # the default crop_size: crops stored at their own aspect, longest side up to 128
    bank = torch.randint(0, 256, (1024, 3, cell, cell), dtype=torch.uint8, generator=g).to(DEV)
    bank_hw = torch.randint(cell // 4, cell + 1, (1024, 2), generator=g)
    bank_hw[torch.arange(1024), torch.randint(0, 2, (1024,), generator=g)] = cell  # the longest side fills the cell
    hw = torch.stack([torch.randint(H * 3 // 4, H + 1, (B,), generator=g),
                      torch.randint(W * 3 // 4, W + 1, (B,), generator=g)], 1)
    rows = []
    for n in range(B):
        h_img, w_img = hw[n].tolist()
        for j in range(10):  # one big paste (up to the whole image) then small/medium ones on top
            s = int(torch.randint(8, (h_img if j == 0 else max(9, h_img // 4)) + 1, (), generator=g))
            h = max(1, min(s, h_img))
            w = max(1, min(int(s * (0.5 + float(torch.rand((), generator=g)))), w_img))
            x0 = int(torch.randint(-(w // 2), w_img - w + w // 2 + 1, (), generator=g))
            y0 = int(torch.randint(-(h // 2), h_img - h + h // 2 + 1, (), generator=g))
            rows.append([n, int(torch.randint(len(bank), (), generator=g)), x0, y0, h, w, int(j % 2)])
    ops = torch.tensor(rows, dtype=torch.int64)
    tiles = ((ops[:, 4] + BLOCK_H - 1) // BLOCK_H) * ((ops[:, 5] + BLOCK_W - 1) // BLOCK_W)
    print(f"batch {B}x3x{H}x{W}, {len(ops)} ops; grid: {int(tiles.sum())} programs, one per {BLOCK_H}x{BLOCK_W} "
          f"tile with work (an ops x largest-op grid would have {len(ops) * int(tiles.max())})")
    cover = torch.zeros(B, H, W, dtype=torch.bool, device=DEV)
    for n, _, x0, y0, h, w, _ in ops.tolist():
        cover[n, max(y0, 0):max(0, y0 + h), max(x0, 0):max(0, x0 + w)] = True
    for n, (h, w) in enumerate(hw.tolist()):
        cover[n, h:, :] = False
        cover[n, :, w:] = False
    visible = int(cover.sum())
    gd = torch.Generator(device=DEV).manual_seed(1)
    for dtype, cl in ((torch.float32, False), (torch.bfloat16, True), (torch.uint8, False)):
        if dtype == torch.uint8:
            base = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, device=DEV, generator=gd)
        else:
            base = torch.rand(B, 3, H, W, device=DEV, generator=gd).to(dtype)
        if cl:
            base = base.contiguous(memory_format=torch.channels_last)
        expect = paste_pixels_ref(base.clone(), ops, bank, hw, bank_hw)
        got = paste_pixels_triton(base.clone(), ops, bank, hw, bank_hw=bank_hw)
        err = (got.float() - expect.float()).abs()
        pad = torch.ones(B, H, W, dtype=torch.bool, device=DEV)
        for n, (h, w) in enumerate(hw.tolist()):
            pad[n, :h, :w] = False
        pad_ok = bool((got.float() - base.float()).abs().amax(1)[pad].max() == 0) if pad.any() else True
        n_off = int((err > (1.0 if dtype == torch.uint8 else 1e-2)).sum())
        line = (f"{str(dtype):15s} {'channels_last' if cl else 'NCHW':13s} max|kernel-ref| {float(err.max()):.4g} "
                f"(pixels over tolerance: {n_off}), padding untouched: {pad_ok}")
        del expect, got, err
        if CUDA:
            img = base.clone()
            ops_dev, hw_dev = ops.to(DEV), hw.to(DEV)
            paste_pixels_triton(img, ops, bank, hw, bank_hw=bank_hw)
            k = kernel_ms(lambda: paste_pixels_triton(img, ops, bank, hw, bank_hw=bank_hw), "_paste_kernel")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                paste_pixels_triton(img, ops, bank, hw, bank_hw=bank_hw, check=False)  # as training calls it (host tables)
            torch.cuda.synchronize()
            e2e = (time.perf_counter() - t0) / 10 * 1e3
            t0 = time.perf_counter()
            for _ in range(10):
                paste_pixels_triton(img, ops_dev, bank, hw_dev, bank_hw=bank_hw)  # device ops: read back to plan
            torch.cuda.synchronize()
            e2e_dev = (time.perf_counter() - t0) / 10 * 1e3
            moved = visible * 3 * base.element_size() + int(bank_hw[ops[:, 1]].prod(1).sum()) * 3
            line += (f"; kernel {k:.3f} ms ({moved / max(k, 1e-9) / 1e6:.0f} GB/s of visible bytes), call {e2e:.3f} ms "
                     f"(host ops), {e2e_dev:.3f} ms (device ops, as in the bench)")
        print(line, flush=True)
        del base


def _tiny_runner(b=4, **solver):
    import yaml
    from conftest import tiny_config_dict
    from acrst_fast import dist
    from acrst_fast.config import DemoDataConfig, load_config
    from acrst_fast.data.build import load_datasets, resolved_data
    from acrst_fast.data.demo import generate
    from acrst_fast.engine.build import build_runner
    root = WORK / "demo"
    if not (root / "labeled.json").is_file():
        generate(root, DemoDataConfig(num_labeled=16, num_unlabeled=16, num_val=8, image_size=96, num_classes=4, seed=3))
    raw = tiny_config_dict(root, WORK / "run_probe", batch_labeled=b, batch_unlabeled=b, pretrain_steps=1,
                           total_steps=10, **solver)
    raw["acrst"] = {"fbr": True, "selective_supervision": True, "n_range": [0, 10]}
    raw["mean_teacher"]["tau_cls"] = 0.0
    raw["model"]["box_detections_per_img"] = 8  # about 8 pseudo-labels per image, a trained teacher's order
    path = WORK / "probe.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, [f"run.device={'cuda' if CUDA else 'cpu'}"])
    info = dist.init_distributed(cfg.run.device)
    datasets = load_datasets(resolved_data(cfg.data))
    runner, _ = build_runner(cfg, datasets, info, str(path))
    runner.start(0)
    return runner


def probe_syncs():
    """Host-device synchronisations of one mutual step (torch.cuda.set_sync_debug_mode), by source line."""
    section("synchronisations in one mutual step (b=4 labeled + 4 unlabeled, ACRST + selective supervision)")
    for b in (4, 8):
        runner = _tiny_runner(b=b)
        runner.run_step(0)
        measured = max(3, runner.labeled_bank_steps)  # past the labeled bank's first pass
        for s in range(1, measured):  # warm: Triton compile, allocator, cuDNN
            runner.run_step(s)
            runner.update_teacher()
        sites = Counter()

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return
            st = traceback.extract_stack()[:-1]
            proj = [fr for fr in st if "/acrst_fast/" in fr.filename or "/kernels/" in fr.filename]
            tv = [fr for fr in st if "torchvision" in fr.filename]
            if tv and (not proj or st.index(tv[-1]) > st.index(proj[-1])):
                sites["torchvision " + tv[-1].filename.split("torchvision/")[-1] + f":{tv[-1].lineno}"] += 1
            elif proj:
                fr = proj[-1]
                sites[fr.filename.split("/")[-2] + "/" + fr.filename.split("/")[-1] + f":{fr.lineno} {fr.name}"] += 1
            else:
                sites[f"{filename}:{lineno}"] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            out = runner.run_step(measured)
            runner.update_teacher()
            if CUDA:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        proj = sum(v for k, v in sites.items() if not k.startswith("torchvision"))
        tv = sum(v for k, v in sites.items() if k.startswith("torchvision"))
        print(f"b={b}: {proj + tv} syncs in the step ({proj} project, {tv} torchvision); pseudo-labels/img "
              f"{out.pseudo_per_image:.1f}, pasted/img {runner.acrst.last_pasted_per_image:.1f}; step {dt * 1e3:.1f} ms "
              f"(with sync warnings on); seconds: " + ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in out.seconds.items()))
        if b == 4:
            for k, v in sites.most_common(40):
                print(f"  {v:5d}  {k}")


def probe_bf16():
    """Detector boxes under bf16 autocast: are they quantised to bf16 (4 px steps at 512..1024, 8 px above)?"""
    section("detector boxes under autocast (teacher path)")
    from acrst_fast.config import ModelConfig
    from acrst_fast.engine.amp import float_outputs
    from acrst_fast.models.detector import build_detector
    torch.manual_seed(0)
    m = build_detector(ModelConfig(backbone="resnet50" if CUDA else "mobilenet_v2", box_score_thresh=0.0), 80).to(DEV).eval()
    x = [torch.rand(3, 800, 1216 if CUDA else 600, device=DEV)]
    for dtype in (None, torch.bfloat16, torch.float16):
        with torch.no_grad(), (torch.autocast(DEV.type, dtype=dtype) if dtype else torch.autocast(DEV.type, enabled=False)):
            boxes = float_outputs(m(x))[0]["boxes"]
        xs, ys = boxes[:, 0::2].flatten(), boxes[:, 1::2].flatten()
        H, W = x[0].shape[1:]
        inner = torch.cat([xs[(xs > 0) & (xs < W)], ys[(ys > 0) & (ys < H)]])  # not clipped to the image border
        rep = {d: float((inner == inner.to(d).float()).float().mean()) if inner.numel() else float("nan")
               for d in (torch.bfloat16, torch.float16)}
        print(f"autocast {str(dtype):15s}: {len(boxes)} boxes, {inner.numel()} unclipped coords; exactly representable "
              f"in bf16: {rep[torch.bfloat16]:.2f}, in fp16: {rep[torch.float16]:.2f} "
              "(1.00 in bf16 = boxes decoded in bf16: 2/4/8 px steps above 256/512/1024 px)")


def probe_bank():
    """CropBank.add with more offers than slots in one call: does each slot keep ONE offer (pixels and size)?"""
    section("CropBank.add: duplicate slots in one call (index_put_ with repeated indices)")
    from acrst_fast.augment.cropbank import PSEUDO, CropBank
    bank = CropBank(num_classes=1, capacity=2, crop_size=16, device=DEV)
    img = torch.zeros(3, 256, 256)
    boxes = []
    for i in range(64):  # offer i: colour (i + 1) / 255, size (8 + i // 8) x (8 + i % 8)
        y, x = (i // 8) * 32, (i % 8) * 32
        h, w = 8 + i // 8, 8 + i % 8
        img[:, y:y + h, x:x + w] = (i + 1) / 255.0
        boxes.append([x, y, x + w, y + h])
    boxes = torch.tensor(boxes, dtype=torch.float32, device=DEV)
    bank.add(PSEUDO, [img.to(DEV)], [boxes], [torch.ones(64, dtype=torch.int64, device=DEV)],
             [torch.arange(64, dtype=torch.float32, device=DEV)])
    for slot in (bank.slot_base(PSEUDO, 1), bank.slot_base(PSEUDO, 1) + 1):
        px = bank.pixels[slot, :, 4:12, 4:12].flatten().unique().tolist()
        h, w = bank.size_hw[slot].tolist()
        by_size = (int(h) - 8) * 8 + (int(w) - 8)
        print(f"slot {slot}: pixel offers {[v - 1 for v in px]}, size_hw offer {by_size}, score offer "
              f"{int(bank.score[slot])} -> {'consistent' if px == [by_size + 1] == [int(bank.score[slot]) + 1] else 'MIXED'}")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["triton", "syncs", "bf16", "bank"]:
        try:
            globals()[f"probe_{name}"]()
        except Exception:  # noqa: BLE001
            print(f"probe {name} FAILED:\n{traceback.format_exc()}", flush=True)
