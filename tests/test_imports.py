"""Imports point down the pipeline: a module imports only its own package and those below.

The packages are the stages, bottom to top: the foundations (errors, atomic files), the
recipes (config), data, objectives, the training loop (train), the entry scripts that plug
an objective into the Trainer (pretrain, finetune), the study, and the command line. Every
``import`` counts, including those inside functions and under ``TYPE_CHECKING``, so a lazy
import cannot hide an upward edge. Inside a package, modules may import each other but
never in a cycle. A new package or root module must be given a place here, which is where
a reviewer sees where it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "further_pt"

#: Bottom to top. A unit is a package (a folder) or a module at the root; units in one
#: set are peers, independent of each other.
ORDER: list[set[str]] = [
    {"errors", "files"},
    {"config"},
    {"data"},
    {"objectives"},
    {"train"},
    {"pretrain", "finetune"},
    {"study"},
    {"cli"},
]
LEVEL = {unit: i for i, units in enumerate(ORDER) for unit in units}


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name below ``further_pt`` (``data.corpus``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "objectives" and "metric_modules" in rel.parts:
            continue  # `evaluate` metric scripts, loaded by path, never imported
        name = ".".join(rel.with_suffix("").parts)
        if name != "__init__":
            found[name.removesuffix(".__init__")] = path
    return found


def unit(module: str) -> str:
    return module.split(".")[0]


def imported(source: str) -> set[str]:
    """The further_pt modules (dotted below further_pt) a source imports, at any depth."""
    known = modules()
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "further_pt" or node.module.startswith("further_pt."):
                base = node.module.removeprefix("further_pt").lstrip(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}".lstrip(".")
                    found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("further_pt.") for a in node.names
                      if a.name.startswith("further_pt.")}
    return {m for m in found if m}


def violations(module: str, source: str) -> list[str]:
    """Upward imports, or imports of a peer unit, as readable lines."""
    own = unit(module)
    out = []
    for dep in sorted(imported(source)):
        target = unit(dep)
        if target == own:
            continue
        if LEVEL[target] > LEVEL[own] or LEVEL[target] == LEVEL[own]:
            out.append(f"{module} ({own}, level {LEVEL[own]}) imports {dep} "
                       f"({target}, level {LEVEL[target]})")
    return out


def test_every_package_and_root_module_has_a_place() -> None:
    units = {unit(m) for m in modules()}
    assert sorted(units - set(LEVEL)) == []
    assert sorted(set(LEVEL) - units) == []


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down(module: str) -> None:
    assert violations(module, modules()[module].read_text()) == []


def test_no_cycle_inside_a_package() -> None:
    """Modules of one package may import each other, never round in a circle."""
    graph = {m: {d for d in imported(p.read_text()) if unit(d) == unit(m) and d != m}
             for m, p in modules().items()}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif len(path) < len(graph):
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert cycles == []


def test_no_two_modules_differ_by_a_suffix() -> None:
    """``pretrain`` beside ``pretraining`` made a reader guess which is which."""
    names = sorted({m.split(".")[-1] for m, p in modules().items() if p.name != "__init__.py"})
    assert [(a, b) for a in names for b in names if a != b and b.startswith(a)] == []


def test_the_check_fails_on_an_upward_import() -> None:
    """Config importing the experiment (as it once did, inside a function) is caught."""
    source = "def load():\n    from further_pt.study.experiment import validate\n"
    assert violations("config.recipes", source) == [
        "config.recipes (config, level 1) imports study.experiment (study, level 6)"]
    assert violations("data.masking", "from further_pt.objectives import encoder\n") == [
        "data.masking (data, level 2) imports objectives.encoder (objectives, level 3)"]
    assert violations("pretrain", "import further_pt.finetune\n") == [
        "pretrain (pretrain, level 5) imports finetune (finetune, level 5)"]  # peers
    assert violations("train.trainer", "from further_pt.objectives.base import Stream\n") == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_over_400_lines(name: str) -> None:
    """A module a reader can hold in mind; a longer one is two steps wearing one name."""
    assert len(modules()[name].read_text().splitlines()) <= 400


def test_no_class_over_300_lines() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
