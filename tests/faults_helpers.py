"""Helpers of the fault tests (tests/test_faults_*.py): a user's folder and its fingerprint, running a tool or the
trainer as a user does, and the one-line error every tool prints."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "labeled.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "photo.jpg")
    return root


def _cli(module: str, *args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _train(cfg: Path, *extra: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return _cli("acrst_fast.train", str(cfg), *extra, env=env, timeout=timeout)
