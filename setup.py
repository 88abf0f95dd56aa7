"""Install acrst_fast; build acrst_fast._C by running CMake on CMakeLists.txt.

`kernels/` (Triton kernels) is installed as the subpackage `acrst_fast.kernels`.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the `_C` target of CMakeLists.txt into the extension's output path."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_executable()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DACRST_OUTPUT_DIR={out_dir}",
            "-DACRST_BUILD_TESTS=OFF",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


def _cmake_executable() -> str:
    try:  # the `cmake` wheel from build-system.requires, when present
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


# The drop-in module (acrst_fast.augment, acrst_fast._C) needs only these: torch and torchvision by lower bound
# (tv_tensors: torchvision 0.16), so it installs beside another framework's torch. The engine (trainer, data,
# evaluation, reports) is the `engine` extra, with the exact torch/torchvision that CI tests.
REQUIRES = ["torch>=2.1", "torchvision>=0.16", "numpy"]
ENGINE_PINS = ["torch==2.14.1", "torchvision==0.29.1"]  # the tested set (README: Installing)
EXTRAS = {
    "engine": ENGINE_PINS + ["pillow", "pycocotools>=2.0.7", "pyyaml>=6", "tqdm>=4.60", "tensorboard>=2.14",
                             "matplotlib>=3.7"],
    "fast_eval": ["faster-coco-eval>=1.6"],  # eval.backend: faster_coco_eval
    "dali": ["nvidia-dali-cuda130>=2.4"],
    # faster-coco-eval: the eval backend's test; mmengine: the mmdet adapter's tests (its real InstanceData)
    "test": ["pytest>=7", "pybind11>=2.12", "cmake>=3.18", "faster-coco-eval>=1.6", "mmengine>=0.10"],
}


setup(
    name="acrst_fast",
    version="0.1.0",
    description="Adaptive Class-Rebalancing Self-Training for semi-supervised object detection, fast",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "acrst_fast", "acrst_fast.augment", "acrst_fast.augment.adapters", "acrst_fast.data", "acrst_fast.models",
        "acrst_fast.engine", "acrst_fast.evaluation", "acrst_fast.ops", "acrst_fast.ssmll", "acrst_fast.kernels",
    ],
    package_dir={"acrst_fast.kernels": "kernels"},
    package_data={"acrst_fast.data": ["coco_folds/*"]},
    ext_modules=[CMakeExtension("acrst_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["acrst-train=acrst_fast.train:main"]},
)
