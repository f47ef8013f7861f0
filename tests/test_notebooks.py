"""Every notebook source builds into a valid .ipynb that Kaggle's papermill run accepts, and stays thin."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.py"))
STAGES = [
    "prepare",
    "train",
    "pseudo_label",
    "infer",
    "multiple_choice",
    "data.demo",
    "data.pool",
    "models.demo",
    "api.generate",
    "api.translate",
    "api.fewshot",
    "api.demo_server",
]


def test_one_notebook_per_stage():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_data_prep", "02_pseudo_label", "03_train", "04_inference", "05_side_experiments"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_builds_with_kernelspec_parameters_and_no_outputs(path):
    nb = jupytext.read(path)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# 0")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin(path):
    """Notebooks call into kaggle_utils; they define no functions or classes of their own."""
    nb = jupytext.read(path)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    tree = ast.parse(re.sub(r"^[%!].*$", "", source, flags=re.M))
    defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == []
    assert "kaggle_utils" in source


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_runs_from_a_shell(stage):
    out = subprocess.run(
        [sys.executable, "-m", f"kaggle_utils.{stage}", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.startswith("usage:") and "--" in out


def test_no_developer_paths_or_secrets_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    bad = re.compile(r"(/work/main|/home/\w+|/root/|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|KAGGLE_KEY=\w{20,})")
    hits = []
    for name in files:
        path = ROOT / name
        this_file = path.resolve() == Path(__file__).resolve()
        if path.suffix in {".py", ".md", ".json", ".toml", ".txt", ""} and path.is_file() and not this_file:
            text = path.read_text(errors="ignore")
            hits += [f"{name}: {m.group(0)}" for m in bad.finditer(text)]
    assert hits == []
