"""The benchmark scripts' imports of prefixcap (and of each other) still resolve: the scripts run rarely
(minutes to hours each), so a moved or renamed function would otherwise surface only in the next
benchmark run (as `to_rgb`'s move to prefixcap.data.images did in bench/reference.py)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def package_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) for every `from prefixcap... / bench... import name` in bench/*.py, at any depth."""
    out = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("prefixcap", "bench")):
                out += [(path.name, node.module, alias.name) for alias in node.names]
    return out


IMPORTS = package_imports()


def test_the_benchmarks_import_prefixcap():
    assert len(IMPORTS) > 50  # the scan found the scripts' imports (a wrong folder would find none)


def importable(module: str, name: str) -> bool:
    """What `from module import name` needs: an attribute of the module, or a submodule of that name."""
    if hasattr(importlib.import_module(module), name):
        return True
    try:
        importlib.import_module(f"{module}.{name}")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("module", sorted({m for _, m, _ in IMPORTS}))
def test_bench_imports_resolve(module):
    missing = [f"{file}: from {module} import {name}" for file, m, name in IMPORTS
               if m == module and not importable(module, name)]
    assert not missing, missing
