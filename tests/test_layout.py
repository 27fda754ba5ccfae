"""The package layout stays readable: no import cycle, small modules, one package per stage.

The import graph is read with `ast` from every import statement in src/prefixcap, function-level
and `if TYPE_CHECKING:` imports included, so a cycle hidden inside a function still fails here.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "prefixcap"
STAGES = ("preprocess", "train", "caption", "evaluate", "serve", "demo", "retrieval")
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 450, 300, 80
MAX_TOP_LEVEL_MODULES = 12


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under src/prefixcap (packages by __init__)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The prefixcap modules `name` imports anywhere in its file (deepest known module of each import)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    deps = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            deps.add(target)
    return deps


def import_graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    # The checker itself must be able to fail: a cycle hidden in a function body.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    known = {"pkg.x": tmp_path / "x.py", "pkg.y": tmp_path / "y.py"}
    known["pkg.x"].write_text("def f():\n    from pkg.y import thing\n")
    known["pkg.y"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import x\n")
    graph = {n: imported_modules(n, p, known) for n, p in known.items()}
    assert graph == {"pkg.x": {"pkg.y"}, "pkg.y": {"pkg.x"}}
    assert find_cycle(graph) == ["pkg.x", "pkg.y", "pkg.x"]


def test_no_import_cycle_in_src():
    graph = import_graph()
    assert len(graph) > 50  # the walk really saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_modules_classes_and_functions_stay_small():
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(SRC)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_big.append(f"{where}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, "\n".join(too_big)


def test_only_cross_cutting_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_a_package_with_a_cli_module(stage):
    assert (PACKAGE / stage / "__init__.py").is_file()
    cli = importlib.import_module(f"prefixcap.{stage}.cli")
    assert callable(cli.main)


def test_each_stage_has_a_typed_library_entry():
    from prefixcap.caption import CaptionJob, run_caption_job  # noqa: F401
    from prefixcap.evaluate import EvaluateConfig, evaluate  # noqa: F401
    from prefixcap.preprocess import PreprocessConfig, run_preprocess  # noqa: F401
    from prefixcap.train import TrainConfig, TrainResult, train  # noqa: F401

    for entry in (run_caption_job, evaluate, run_preprocess, train):
        hints = entry.__annotations__
        assert "return" in hints and hints["return"] not in (None, "None"), entry


def test_public_names_keep_working():
    import prefixcap

    for name in ("Captioner", "CaptionModel", "CaptionConfig", "load_preprocessed", "PreprocessedDataset"):
        assert getattr(prefixcap, name).__name__ == name


def test_every_module_states_its_purpose():
    missing = [str(p.relative_to(SRC)) for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
