#!/usr/bin/env bash
# GPU check for acrst_fast on ONE CUDA GPU (H100/H200 class), in one run; it stops
# starting new steps after BUDGET seconds (default 540).
#
#   bash gpu_check.sh [REPO_DIR]          (default: the current directory; it must be the repo root)
#   SKIP_INSTALL=1 bash gpu_check.sh      (already installed: pip install -e ".[engine,test,dali]")
#   OFFLINE=1 bash gpu_check.sh           (no package index, torch already there, as on the lent H200: builds
#                                          acrst_fast._C with --no-deps and takes other wheels from .whl/)
#   BUDGET=900 bash gpu_check.sh          (more time: every step runs)
#   FULL_SUITE=0 bash gpu_check.sh        (skip step 6)
#   DEV=cpu SKIP_INSTALL=1 bash gpu_check.sh   (a dry run of every command on a machine without a GPU)
# Without DALI installed, the DALI cases are deselected and the pipeline bench is skipped.
#
# Steps 1-5 took 132 s on one H200 with OFFLINE=1 and no DALI (2026-11-30, bench/RESULTS.md); a cold
# torch download eats into the budget and the last steps are then skipped (they are ordered by value). Steps, each time-boxed, a
# failing one does not stop the others:
#   1 install the project (builds acrst_fast._C) with the dali extra; print versions
#   1b the paper-config step bench (bench/train_step.py --paper: R50-FPN frozen BN, 4 + 4 COCO photos at
#     800 x ~1200, top-n 1000/1000, 512 RoIs, bf16, channels-last) beside torchvision's stock
#     fasterrcnn_resnet50_fpn supervised step on the same 8 images and the FLOP floor
#   2 every CUDA test (pytest -m cuda): Triton kernel vs reference, DALI mixed-decode views vs the fallback,
#     training end to end on CUDA (ACRST + bf16, torch and DALI stages), the trainer's collectives under NCCL
#     (torchrun --nproc_per_node=1 with ACRST_DIST_FORCE=1: NCCL refuses CPU tensors)
#   3 benches on CUDA, small repeats: crop_paste, ema (fused vs reference vs copy), photometric (batched vs
#     per image), train_step (demo), pipeline (DALI vs fallback)
#   4 probes (bench/probes.py): box quantisation under bf16 autocast (expect 0.00 bf16-representable);
#     CropBank duplicate-slot writes on CUDA (expect consistent); bench/syncs.py: host-device syncs of
#     one mutual step by source line (torch.cuda.set_sync_debug_mode; expect <= 16 in all, torchvision's
#     included: the CPU count is 11 at 2 + 2 and at 8 + 8)
#   5 Triton kernel at 32x3x800x1333 (kernel-only time from the profiler vs the call)
#   6 the whole test suite as a GPU box runs it (interpreter cases skipped, CUDA cases run)
# Logs: $OUT/gpu_check/*.log if $OUT is set, else /tmp/gpu_check_logs. A summary is printed at the end.
set -u
REPO="${1:-$PWD}"
cd "$REPO" || { echo "no repo at $REPO"; exit 1; }
{ [ -f setup.py ] && [ -d acrst_fast ]; } || { echo "$REPO is not the acrst_fast repo root"; exit 1; }
LOG="${OUT:+$OUT/gpu_check}"; LOG="${LOG:-/tmp/gpu_check_logs}"; mkdir -p "$LOG"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
export PROBE_WORK="$WORK/probe" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
export DEV="${DEV:-cuda}"  # DEV=cpu: a dry run of the commands on a machine without a GPU
T0=$(date +%s)
NAMES=(); CODES=()

run() {  # run NAME LIMIT_S CMD...   (TAIL=n: lines of its log to print)
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 30 ]; then
    echo "=================== [$name] SKIPPED (budget spent)"; NAMES+=("$name"); CODES+=("skipped"); return
  fi
  [ "$limit" -gt $(( left - 5 )) ] && limit=$(( left - 5 ))
  echo; echo "=================== [$name] t=$(( $(date +%s) - T0 ))s limit=${limit}s: $*"
  timeout --kill-after=5 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-40}" "$LOG/$name.log"
  echo "=================== [$name] rc=$rc$([ $rc = 124 ] && echo ' TIMEOUT') t=$(( $(date +%s) - T0 ))s"
  NAMES+=("$name"); CODES+=("$rc")
}

# ---------- 1 install, versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
if [ "${OFFLINE:-0}" = 1 ]; then
  # a machine with torch, triton, pybind11 and cmake but no package index (the lent GPU): build acrst_fast._C
  # against what is there, and take the other wheels from .whl/ (pycocotools; DALI's 0.5 GB wheel cannot travel)
  TAIL=15 run install 240 bash -c "$PY -m pip install -q --disable-pip-version-check --no-index --no-deps \
      --no-build-isolation -e . && { [ ! -d .whl ] || $PY -m pip install -q --disable-pip-version-check --no-index \
      --no-deps --target /tmp/site .whl/*.whl; }"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "${SKIP_INSTALL:-0}" != 1 ]; then
  TAIL=15 run install 330 "$PY" -m pip install -q --disable-pip-version-check -e ".[engine,test,dali]"
fi
TAIL=10 run env_check 60 "$PY" -c '
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("triton", triton.__version__)
from acrst_fast import _ext; print("acrst_fast._C built:", _ext.HAS_EXT)
try:
    import nvidia.dali as d; print("dali", d.__version__)
except ImportError as e: print("dali missing:", e)
import os
assert torch.cuda.is_available() or os.environ["DEV"] == "cpu", "no CUDA device: this script is for a GPU machine"'

# the probes (run in steps 3-5): bench/probes.py

# ---------- 1b the paper-config step, the stock torchvision step, the floor (first: the table the GPU is for)
PAPER_SCALE=(); [ "$DEV" = cpu ] && PAPER_SCALE=(--scale 256)  # a CPU dry run at a small scale
TAIL=30 run bench_train_step_paper 240 "$PY" bench/train_step.py --paper "${PAPER_SCALE[@]}" --steps 5 --warmup 2 \
    run.device="$DEV" data.num_workers=4

# ---------- 2 GPU tests: every test marked cuda
HAS_DALI=$("$PY" -c 'import nvidia.dali' >/dev/null 2>&1 && echo 1 || echo 0)
NOT_DALI=(); [ "$HAS_DALI" = 1 ] || NOT_DALI=(-k "not dali")  # the DALI cases need the package, not only the GPU
TAIL=12 run test_cuda_kernels 90 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m cuda "${NOT_DALI[@]}" \
    --ignore=tests/test_cuda_e2e.py tests
TAIL=25 run test_cuda_e2e 200 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m cuda "${NOT_DALI[@]}" tests/test_cuda_e2e.py

# ---------- 3 benches (CUDA, small repeat counts)
TAIL=8 run bench_crop_paste 90 "$PY" bench/crop_paste.py --device "$DEV" --batch 16 --repeat 5
TAIL=6 run bench_ema 60 "$PY" bench/ema.py --device "$DEV" --repeat 5
TAIL=6 run bench_photometric 60 "$PY" bench/photometric.py --device "$DEV" --repeat 5
TAIL=8 run probe_triton_b32 120 "$PY" bench/probes.py triton  # the Triton kernel at paper scale
# options go before the positionals: argparse rejects CONFIG --steps N KEY=VALUE (overrides after an option)
TAIL=16 run bench_train_step_demo 120 "$PY" bench/train_step.py --steps 3 --warmup 1 configs/demo.yaml \
    'model.backbone_weights=""' run.device="$DEV"
TC=""
for d in tests/data/coco ../shared/data/tiny_coco; do [ -f "$d/annotations/instances_train2017.json" ] && TC="$d" && break; done
if [ -n "$TC" ]; then
  PIPE_ARGS=(--images "$TC/train2017" --json "$TC/annotations/instances_train2017.json")
else  # no COCO photos: the demo data bench_train_step_demo generated (160 px squares, resized to 640..800 by the views)
  PIPE_ARGS=(--images datasets/demo/unlabeled --json datasets/demo/unlabeled.json)
fi
[ "$HAS_DALI" = 1 ] && TAIL=6 run bench_pipeline 100 "$PY" bench/pipeline.py --device "$DEV" --workers 8 --batch 16 --batches 4 "${PIPE_ARGS[@]}"

# ---------- 4 probes (bench/probes.py)
TAIL=20 run probe_bf16_bank 90 "$PY" bench/probes.py bf16 bank
TAIL=30 run syncs 150 "$PY" bench/syncs.py configs/demo.yaml 'model.backbone_weights=""' run.device="$DEV" \
    acrst.fbr=true acrst.selective_supervision=true mean_teacher.tau_cls=0.0 model.box_detections_per_img=20

# ---------- 5 Triton at batch 32 (ran in step 3: probe_triton_b32)
# ---------- 6 the suite as a GPU box runs it (fast tests; the multi-process ones ran above or in CI)
[ "${FULL_SUITE:-1}" = 1 ] && TAIL=14 run test_suite_gpu_box 150 "$PY" -m pytest -q -p no:cacheprovider -rfE -m "not slow" tests

# ---------- summary
echo; echo "=================== summary ($(( $(date +%s) - T0 ))s; logs in $LOG)"
for i in "${!NAMES[@]}"; do printf '%-32s rc=%s\n' "${NAMES[$i]}" "${CODES[$i]}"; done
echo "expected: every rc=0; probe_bf16_bank: 0.00 of the coordinates bf16-representable under bf16 autocast,"
echo "both CropBank slots consistent. Record the tables in bench/RESULTS.md (device, date, command)."
