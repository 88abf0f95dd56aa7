"""The README's drop-in example runs as written."""
import re

from conftest import REPO


def test_readme_augment_example_runs(capsys):
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- example: tests/test_readme.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert m, "README example block not found"
    namespace: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert namespace["acrst"].bank.fill().sum() == 3  # one ground truth + two pseudo-labels
    assert all(len(b) == len(p) == len(w) for b, p, w in zip(namespace["boxes"], namespace["pasted"],
                                                              namespace["reg_weight"]))
    assert "tensor" in capsys.readouterr().out
