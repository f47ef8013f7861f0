"""The package is layered: a module imports only from its own layer or the layers below it.

store → config → data → inputs → models → api → scoring → stages (prepare, train, pseudo_label, infer, plots,
multiple_choice, and parallel: the train stage's multi-process launch) → kaggle. ``api`` is the OpenAI-compatible
client and what calls it (generation, translation, judges).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_utils"
LAYERS = ["store", "config", "data", "inputs", "models", "api", "scoring", "stages", "kaggle"]
STAGES = {"prepare", "train", "pseudo_label", "infer", "plots", "multiple_choice", "parallel"}


def layer_of(module: str) -> str:
    """``kaggle_utils.inputs.batching`` → ``inputs``; a top-level stage module → ``stages``."""
    first = module.split(".")[1]
    return "stages" if first in STAGES else first


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kaggle_utils"):
            names += [f"{node.module}.{a.name}" if node.module == "kaggle_utils" else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("kaggle_utils.")]
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_sits_in_a_known_layer():
    for path in MODULES:
        module = "kaggle_utils." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        assert layer_of(module) in LAYERS, f"{module} is in no layer; add it to tests/test_layout.py"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_imports_point_down_the_layers(path):
    module = "kaggle_utils." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    mine = LAYERS.index(layer_of(module))
    upward = [m for m in imported_modules(path) if LAYERS.index(layer_of(m)) > mine]
    assert upward == [], f"{module} ({LAYERS[mine]}) imports from a higher layer: {upward}"
