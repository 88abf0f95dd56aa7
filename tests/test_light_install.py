"""The light install: the drop-in module needs torch, torchvision (lower bounds) and NumPy only; the engine's
exact pins and its other packages are the `engine` extra, which README's setup command and CI install."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO

ENGINE_ONLY = ("yaml", "pycocotools", "tqdm", "tensorboard", "matplotlib", "nvidia", "faster_coco_eval")

SCRIPT = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` raises ImportError, as where the package is not installed
import torch
from acrst_fast.augment import ACRST, PasteConfig
acrst = ACRST(num_classes=3, capacity=8, crop_size=32, paste=PasteConfig(n_min=2, n_max=2), device="cpu",
              label_offset=0, box_format="xywh")
images = [torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8), torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)]
boxes = [torch.tensor([[4., 4., 30., 30.]]), torch.zeros((0, 4))]
labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.int64)]
acrst.add_ground_truth(images, boxes, labels)
targets = [{{"boxes": b, "labels": l, "scores": torch.ones(len(l))}} for b, l in zip(boxes, labels)]
out, new = acrst.rebalance_targets(images, targets, torch.Generator().manual_seed(0))
import torchvision
from acrst_fast.augment import enable_box_weights
from acrst_fast.augment.adapters import Detectron2ACRST, MMDetACRST
enable_box_weights(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                                   num_classes=4))
Detectron2ACRST(3, capacity=4, crop_size=16), MMDetACRST(3, capacity=4, crop_size=16)
print(json.dumps({{"n": [len(t["boxes"]) for t in new], "src": [t["source_index"].tolist() for t in new],
                  "mods": sorted(m for m in {blocked!r} if sys.modules.get(m) is not None)}}))
"""


@pytest.mark.parametrize("also", [(), ("triton",)], ids=["engine_deps_absent", "triton_absent_too"])
def test_module_runs_without_the_engine_dependencies(also):
    """ACRST fills its bank and pastes, selective supervision switches on a torchvision detector and the adapters
    load, with none of the engine's packages importable (and without Triton)."""
    blocked = ENGINE_ONLY + also
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=blocked)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == [3, 2] and out["mods"] == []  # 2 pasted on each image, the own box kept
    assert out["src"][0].count(-1) == 2 and 0 in out["src"][0] and out["src"][1] == [-1, -1]


def _setup_constants() -> dict:
    """REQUIRES, ENGINE_PINS and EXTRAS of setup.py, evaluated in order without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id in ("REQUIRES", "ENGINE_PINS", "EXTRAS")
                                                for t in node.targets):
            exec(compile(ast.Module([node], []), "setup.py", "exec"), {}, names)
    return names


def test_module_requirements_are_lower_bounds_and_engine_pins_the_tested_set():
    import torch
    import torchvision

    c = _setup_constants()
    names = {r.split(">")[0].split("=")[0] for r in c["REQUIRES"]}
    assert names == {"torch", "torchvision", "numpy"}, c["REQUIRES"]
    assert not any("==" in r for r in c["REQUIRES"])
    assert set(c["ENGINE_PINS"]) <= set(c["EXTRAS"]["engine"])
    pins = dict(p.split("==") for p in c["ENGINE_PINS"])
    # CI installs the pinned set: what runs these tests is what the pins say
    assert torch.__version__.split("+")[0] == pins["torch"] and torchvision.__version__.split("+")[0] == pins["torchvision"]
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    assert '".[engine,' in readme and '".[engine,' in ci
    for tested in c["ENGINE_PINS"]:
        assert tested.replace("==", " ") in readme, f"README does not say that {tested} is the tested set"
