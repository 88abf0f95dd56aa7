"""The README's drop-in example runs as written."""
import re

import torch

from conftest import REPO


def test_readme_augment_example_runs(capsys):
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- example: tests/test_readme.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert m, "README example block not found"
    namespace: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert namespace["acrst"].bank.fill().sum() == 3  # one ground truth + two pseudo-labels
    images, targets = namespace["images"], namespace["targets"]
    assert all((t["source_index"] < 0).any() for t in targets)  # something was pasted on each image
    assert [im.dtype for im in images] == [torch.uint8] * 2  # uint8 in, uint8 out
    for t in targets:
        n = len(t["boxes"])
        assert len(t["labels"]) == len(t["scores"]) == len(t["reg_weight"]) == len(t["source_index"]) == n
        pasted = t["source_index"] < 0
        assert torch.equal(t["reg_weight"], pasted.float())
        assert torch.all(t["scores"][pasted] == 1.0)  # the fill
    assert all(torch.all(t["reg_weight"] == 1) for t in namespace["targets_l"])
    assert all(len(t["iscrowd"]) == len(t["boxes"]) for t in namespace["targets_l"])
    assert "tensor" in capsys.readouterr().out
