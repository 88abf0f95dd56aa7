"""examples/mean_teacher_torchvision.py, the external trainer that uses only the public module, runs on the
shipped COCO photos: the burn-in fills the Labeled bank, mutual steps paste, and a stopped run resumes."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

EXAMPLE = REPO / "examples" / "mean_teacher_torchvision.py"
COCO = REPO / "tests" / "data" / "coco"


def test_example_imports_only_the_public_module():
    tree = ast.parse(EXAMPLE.read_text())
    ours = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("acrst_fast")}
    ours |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("acrst_fast")}
    assert ours == {"acrst_fast.augment"}


def _run(tmp_path, *extra: str) -> str:
    cmd = [sys.executable, str(EXAMPLE), "--labeled-json", str(COCO / "annotations" / "instances_train2017.json"),
           "--labeled-images", str(COCO / "train2017"), "--unlabeled-images", str(COCO / "val2017"),
           "--burn-in", "2", "--batch-labeled", "1", "--batch-unlabeled", "1", "--min-size", "160", "--max-size", "240",
           "--checkpoint-period", "2", "--output-dir", str(tmp_path / "run"), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_example_trainer_trains_pastes_and_resumes(tmp_path):
    first = _run(tmp_path, "--steps", "3")
    steps = re.findall(r"step (\d+)/3 loss ([\d.]+) mutual (\d) pasted (\d+) bank (\d+)", first)
    assert [s[0] for s in steps] == ["1", "2", "3"]
    assert [s[2] for s in steps] == ["0", "0", "1"]  # burn-in, then a mutual step
    assert int(steps[0][4]) > 0 and int(steps[1][4]) >= int(steps[0][4])  # the first pass fills the bank
    assert int(steps[2][3]) > 0  # the mutual step pasted instances into the unlabeled image
    assert (tmp_path / "run" / "checkpoint.rank0.pt").is_file() and not list((tmp_path / "run").glob("*.tmp"))
    second = _run(tmp_path, "--steps", "4", "--resume")
    assert "resumed at step 3" in second
    resumed = re.findall(r"step (\d+)/4 loss [\d.]+ mutual (\d) pasted (\d+) bank (\d+)", second)
    assert [r[:2] for r in resumed] == [("4", "1")]
    # the bank came back with the checkpoint (and step 4, still in the first pass, adds to it)
    assert int(resumed[0][3]) >= int(steps[2][4])
