"""The import graph, read from the sources with `ast`: no cycles, and no import from a lower layer up to a
higher one (the kernels import nothing from `augment`; nothing imports the command-line modules)."""
import ast
from pathlib import Path

from conftest import REPO

CLI_MODULES = {"acrst_fast.train", "acrst_fast.train_ssmll"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (REPO / "acrst_fast").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (REPO / "kernels").rglob("*.py"):  # installed as acrst_fast.kernels
        parts = ("acrst_fast", "kernels", *path.relative_to(REPO / "kernels").with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name.startswith("acrst_fast"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    for m in list(graph):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        graph[m] |= {p for d in list(graph[m]) for p in _parents(d) if p in mods} - {m} - set(_parents(m))
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers():
    graph = _graph()
    kernels = {m: deps for m, deps in graph.items() if m.startswith("acrst_fast.kernels")}
    assert kernels and not any(d.startswith("acrst_fast.augment") for deps in kernels.values() for d in deps), kernels
    importers = {m for m, deps in graph.items() if deps & CLI_MODULES}
    assert not importers, f"the command-line modules are imported by {sorted(importers)}"
    augment = {d for m, deps in graph.items() if m.startswith("acrst_fast.augment") for d in deps}
    assert not any(d.startswith(("acrst_fast.engine", "acrst_fast.train", "acrst_fast.data")) for d in augment), \
        "the drop-in augmentation module must not depend on the trainer"


def test_no_function_over_60_lines():
    """Small functions: none in `acrst_fast/` or `kernels/` spans more than 60 lines (decorators excluded)."""
    long = []
    for root in ("acrst_fast", "kernels"):
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


BOTTOM = {"acrst_fast.modes", "acrst_fast.host", "acrst_fast.errors", "acrst_fast.streams", "acrst_fast.timing",
          "acrst_fast.metric_names", "acrst_fast.peer_watch", "acrst_fast._ext"}
BELOW_ENGINE = ("acrst_fast.config", "acrst_fast.data", "acrst_fast.models", "acrst_fast.augment", "acrst_fast.ssmll",
                "acrst_fast.evaluation", "acrst_fast.pseudo_labels", "acrst_fast.dist", "acrst_fast.safe_io")


def test_floors():
    """The bottom floor imports nothing of the package; the config only the bottom floor (its mode lists live
    in `modes.py`); nothing below the engine (data, models, augment, SSMLL, evaluation) imports it."""
    graph = _graph()
    for m in BOTTOM:
        assert not graph[m] - {"acrst_fast"}, f"{m} imports {sorted(graph[m])}"
    assert graph["acrst_fast.config"] - {"acrst_fast"} <= BOTTOM, sorted(graph["acrst_fast.config"])
    upward = sorted((m, d) for m, deps in graph.items() if m.startswith(BELOW_ENGINE)
                    for d in deps if d.startswith(("acrst_fast.engine", "acrst_fast.report")))
    assert not upward, upward
