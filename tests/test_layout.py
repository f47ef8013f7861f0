"""The package is layered: a module imports only from its own layer or the layers below it.

store → config → data → inputs → models → evaluation (metrics, calibration) → api → scoring (the batch engine and
its time planning) → training (the train stage's loop in parts: rows, schedule, precision, step, evaluation,
checkpoints, the memory probe, the multi-process launch) → inference (the infer stage's parts below its recipe) →
stages (prepare, train, pseudo_label, infer, plots, multiple_choice, side_by_side) → kaggle. ``api`` is the
OpenAI-compatible client and what calls it (generation, translation, judges); ``api`` and ``scoring`` do not import
each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_utils"
LAYERS = [
    "store",
    "config",
    "data",
    "inputs",
    "models",
    "evaluation",
    "api",
    "scoring",
    "training",
    "inference",
    "stages",
    "kaggle",
]
STAGES = {"prepare", "train", "pseudo_label", "infer", "plots", "multiple_choice", "side_by_side"}


def layer_of(module: str) -> str:
    """``kaggle_utils.inputs.batching`` → ``inputs``; a top-level stage module → ``stages``."""
    first = module.split(".")[1]
    return "stages" if first in STAGES else first


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imported_modules(path: Path) -> list[str]:
    """Every kaggle_utils module ``path`` imports, at the top or inside a function: ``from kaggle_utils.config
    import recipes`` names ``kaggle_utils.config.recipes``, ``from kaggle_utils.config.cli import x`` the module."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kaggle_utils"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if _is_module(sub) else node.module)
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


def test_no_module_imports_itself_back_through_others():
    """No import circle (a lazy import inside a function counts: it hides the circle, it does not remove it)."""
    graph = {}
    for path in MODULES:
        module = "kaggle_utils." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        graph[module] = set(imported_modules(path))
    circles = []

    def visit(module: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt in trail:
                circles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, trail + [nxt])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert circles == []


def test_api_and_scoring_are_siblings():
    """The API stages and the batch engine do not import each other: what compares their results sits above both."""
    crossing = []
    for path in MODULES:
        module = "kaggle_utils." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        other = {"api": "scoring", "scoring": "api"}.get(layer_of(module))
        crossing += [f"{module} -> {m}" for m in imported_modules(path) if other and layer_of(m) == other]
    assert crossing == []


MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 60


def test_no_module_outgrows_one_role():
    """A module past 700 lines holds more than one role: split it by trade, as ``training/`` splits the loop."""
    long = {
        p.relative_to(PACKAGE).as_posix(): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


def test_every_function_fits_a_screen():
    """No function (or method) runs past 60 lines, its docstring included: a longer one is several named steps."""
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.name} ({lines} lines)")
    assert long == []


def test_one_precision_class_one_fingerprint_one_atomic_writer():
    """The loops share ``training.precision.Precision``; rows are fingerprinted and files written atomically by
    ``store`` alone (a second definition is a copy that will drift)."""
    defined: dict[str, list[str]] = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in SINGLE:
                defined.setdefault(node.name, []).append(path.relative_to(PACKAGE).as_posix())
    assert defined == SINGLE


SINGLE = {
    "Precision": ["training/precision.py"],
    "rows_fingerprint": ["store.py"],
    "write_atomic": ["store.py"],
}
