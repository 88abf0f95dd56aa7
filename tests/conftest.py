"""Shared fixtures: a tiny generated demo dataset, tiny-model configs, paths to shipped data."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton kernels run on CPU tensors under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton reads TRITON_INTERPRET once, when a kernel is defined: a process runs either compiled
# kernels (CUDA tensors) or the interpreter (CPU tensors), never both. On a GPU machine the
# compiled kernel is what matters, so the interpreter cases (marked `triton_cpu`) are skipped there.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def seeds(fixed: tuple[int, ...] = (0, 1, 2)) -> list[int]:
    """Seeds of a randomised test: the fixed ones, and a fresh one when ACRST_FRESH_SEEDS is set (it shows in
    the test id, so a failure can be rerun)."""
    import random

    return list(fixed) + ([random.SystemRandom().randrange(2**31)] if os.environ.get("ACRST_FRESH_SEEDS") else [])


def cpu_and_cuda(triton: bool = False) -> list:
    """Device parameters for a device-dependent test, as torchvision's tests do: "cpu" and "cuda".

    The cuda case carries the `cuda` mark and shows as skipped where there is no GPU. With
    `triton=True` the cpu case runs a Triton kernel under the interpreter (mark `triton_cpu`)."""
    return [pytest.param("cpu", marks=[pytest.mark.triton_cpu] if triton else []),
            pytest.param("cuda", marks=pytest.mark.cuda)]

from acrst_fast.config import DemoDataConfig
from acrst_fast.data.demo import generate

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO / "tests" / "data" / "coco"  # shipped: a fresh clone needs nothing outside the repo

TINY_DEMO = DemoDataConfig(num_labeled=8, num_unlabeled=8, num_val=6, image_size=96, num_classes=4, seed=3)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_interp = pytest.mark.skip(reason="Triton runs compiled on this GPU machine (TRITON_INTERPRET unset); "
                                        "the cuda case of this test runs the kernel")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "triton_cpu" in item.keywords and not INTERPRETER:
            item.add_marker(no_interp)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "demo", TINY_DEMO)


def tiny_config_dict(data_root: Path, out_dir: Path, **solver) -> dict:
    """A config of a very small random-init detector on the tiny demo data (seconds per run on CPU)."""
    return {
        "data": {
            "train_json": str(data_root / "labeled.json"), "train_images": str(data_root / "labeled"),
            "unlabeled_json": str(data_root / "unlabeled.json"), "unlabeled_images": str(data_root / "unlabeled"),
            "val_json": str(data_root / "val.json"), "val_images": str(data_root / "val"),
            "num_workers": 0,
        },
        "augment": {"scales": [80, 96], "max_size": 128, "test_scale": 96},
        "model": {"backbone": "mobilenet_v2", "trainable_backbone_layers": 5, "fpn_channels": 16,
                  "representation_size": 32, "anchor_sizes": [16, 32, 64, 128, 256],
                  "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
                  "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 30,
                  "rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32},
        "solver": {"total_steps": 6, "pretrain_steps": 3, "batch_labeled": 2, "batch_unlabeled": 2,
                   "lr": 0.01, "warmup_steps": 2, **solver},
        "mean_teacher": {"ema_decay": 0.9, "tau_cls": 0.05},
        "eval": {"period": 0},
        "run": {"output_dir": str(out_dir), "checkpoint_period": 2, "log_period": 1, "progress_bar": False},
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cpu_env():
    """Environment for child processes: CPU only, 1 thread (deterministic and light)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    return env


def start_group(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Popen `cmd` in a new process group (torchrun's workers too), text stdout/stderr piped."""
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def finish_group(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `start_group`'s process; a timeout kills the whole group and fails the test (a hang)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(proc.args)}\n{out[-2000:]}\n{err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, but a timeout kills the whole process group (torchrun's workers too), not only `cmd`."""
    return finish_group(start_group(cmd, **kwargs), timeout)


def rank_pid(rank: int, marker: str) -> int:
    """The pid of the training process of global rank `rank` under torchrun whose command line holds `marker`
    (read from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "acrst_fast.train" in cmd and marker in cmd and f"RANK={rank}".encode() in env \
                and "torch.distributed.run" not in cmd:
            return int(pid)
    raise AssertionError(f"no process of rank {rank}")


FAULT_SHIM = REPO / "tests" / "fault_shim"


def fault_env(env: dict, **faults: str) -> dict:
    """`env` for training processes with the test fault shim loaded (tests/fault_shim/sitecustomize.py):
    faults such as ACRST_TEST_NAN="4:1" (step index 4 on rank 1)."""
    return dict(env, PYTHONPATH=f"{FAULT_SHIM}{os.pathsep}{env.get('PYTHONPATH', '')}", **faults)
