"""The package's shape: every module imports, no import circles, `finetune` never imports `serving`, pyflakes is clean."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("finetune", "serving")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, at the top or inside a function (both run sooner or later)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative imports make the layering hard to read; import absolutely"
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {t for t in out if t in known and t != name}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_and_serving_builds_on_finetune_only():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert _circles(graph) == []
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith("finetune")
                    for b in targets if b.startswith("serving"))
    assert upward == [], "finetune must not import serving (serving depends on finetune, one way)"


def test_the_checker_sees_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports(module):
    if module.endswith(".__main__"):
        pytest.skip("runs its command when imported")
    importlib.import_module(module)


def test_pyflakes_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "pyflakes", *PACKAGES, "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docs_layout_names_every_folder_and_module():
    """The source layout lives on the documentation's Development page (docs/development.md)."""
    page = (ROOT / "docs" / "development.md").read_text()
    layout = page.split("## Layout", 1)[1].split("```")[1]
    missing = []
    for name, path in _modules().items():
        if path.name == "__main__.py":
            continue
        shown = f"{path.parent.name}/" if path.name == "__init__.py" else path.name
        if shown not in layout:
            missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"docs/development.md's layout section does not name: {missing}"


def test_every_import_of_ours_in_scripts_and_tests_resolves():
    """bench/ and tests/ import finetune inside functions too; a moved module must not leave them pointing nowhere."""
    missing = []
    for path in [*(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "deploy").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}")
    assert missing == []
