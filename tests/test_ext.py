"""acrst_fast._C against its reference; its C++ tests through CMake/ctest."""
import random
import shutil
import subprocess
import sys

import pytest
import torch

from acrst_fast import _ext
from acrst_fast.ops import box_iou, box_iou_ref
from conftest import REPO


def _random_boxes(gen, n, size=100.0):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size / 2
    wh[: n // 5] = 0  # degenerate boxes among them
    return torch.cat([xy, xy + wh], dim=1)


def test_extension_is_built():
    assert _ext.HAS_EXT, f"acrst_fast._C failed to import: {_ext._IMPORT_ERROR}"


@pytest.mark.parametrize("n,m", [(0, 0), (0, 5), (7, 0), (1, 1), (33, 17), (200, 150)])
def test_box_iou_matches_float64_reference(n, m):
    seed = random.SystemRandom().randrange(2**31)  # fresh seed each run, reported on failure
    gen = torch.Generator().manual_seed(seed)
    a, b = _random_boxes(gen, n), _random_boxes(gen, m)
    expected = box_iou_ref(a, b)
    got = box_iou(a.float(), b.float())
    assert got.shape == (n, m) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    assert torch.isfinite(got).all()


def test_box_iou_rejects_bad_boxes():
    good = torch.tensor([[0.0, 0, 1, 1]])
    with pytest.raises(ValueError, match="boxes2: box 1 is non-finite or inverted"):
        box_iou(good, torch.tensor([[0.0, 0, 1, 1], [5.0, 5, 4, 9]]))
    with pytest.raises(ValueError, match="boxes1: box 0"):
        box_iou(torch.tensor([[0.0, float("nan"), 1, 1]]), good)


def test_cpp_tests_via_ctest(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        import cmake as cmake_pkg  # the wheel that setup.py builds with

        cmake = f"{cmake_pkg.CMAKE_BIN_DIR}/cmake"
    import pybind11

    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    for target in ("test_box_ops", "test_paste_plan"):
        subprocess.run([cmake, "--build", str(build), "--target", target], check=True, capture_output=True)
    ctest = str(__import__("pathlib").Path(cmake).with_name("ctest"))
    proc = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100% tests passed" in proc.stdout and "paste_plan" in proc.stdout
