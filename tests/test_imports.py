"""Imports point down the pipeline: a module imports only modules of lower layers.

The layers follow the data: errors and config at the bottom, then the stages
(corpus -> instances -> masking -> model -> checkpoint -> ... -> evaluation),
the training primitives, the Trainer, the objectives, the entry scripts, and
the study on top. Every ``import`` counts, including those inside functions,
so a lazy import cannot hide an upward edge. A new module must be given a
layer here, which is where a reviewer sees where it sits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "further_pt"

LAYERS: list[set[str]] = [
    {"errors", "faults", "schemas"},
    {"config"},
    {"hardware"},
    {"corpus"},
    {"instances"},
    {"masking"},
    {"model", "objective", "vocab", "dropout"},
    {"checkpoint"},
    {"schedules", "layerwise"},
    {"classification_data"},
    {"heads"},
    {"evaluation"},
    {"linear_baseline", "selection"},
    {"training", "step"},
    {"trainer"},
    {"pretraining", "finetuning"},
    {"pretrain", "finetune"},
    {"paired"},
    {"report"},
    {"experiment", "doctor"},
    {"sweep"},
    {"cli"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def imported_modules(source: str) -> set[str]:
    """The further_pt modules a source file imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "further_pt":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("further_pt."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("further_pt.")}
    return found


def violations(module: str, source: str) -> list[str]:
    """``module`` importing a module of its own or a higher layer, as readable lines."""
    return [f"{module} (layer {LAYER[module]}) imports {dep} (layer {LAYER.get(dep, '?')})"
            for dep in sorted(imported_modules(source))
            if dep in LAYER and LAYER[dep] >= LAYER[module] and dep != module]


def package_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer() -> None:
    assert [m for m in package_modules() if m not in LAYER] == []
    assert [m for m in LAYER if m not in package_modules()] == []


@pytest.mark.parametrize("module", package_modules())
def test_imports_point_down(module: str) -> None:
    assert violations(module, (PACKAGE / f"{module}.py").read_text()) == []


def test_the_check_fails_on_an_upward_import() -> None:
    """Config importing the experiment (as it once did, inside a function) is caught."""
    source = "def load():\n    from further_pt.study.experiment import validate\n    return validate\n"
    assert violations("config", source) == [
        f"config (layer 1) imports experiment (layer {LAYER['experiment']})"]
    assert violations("masking", "from further_pt import vocab\n") == [
        "masking (layer 5) imports vocab (layer 6)"]
    assert violations("model", "import further_pt.objectives.mlm_loss\n") == [
        "model (layer 6) imports objective (layer 6)"]  # peers are independent stages
