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


def tracked_texts() -> dict[str, str]:
    """Every tracked file that is text (no NUL byte), by path relative to the root, as ``git ls-files`` lists them."""
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    texts = {}
    for name in files:
        path = ROOT / name
        if path.is_file() and b"\0" not in (data := path.read_bytes()):
            texts[name] = data.decode("utf-8", errors="ignore")
    return texts


def test_no_developer_paths_or_secrets_in_tracked_files():
    bad = re.compile(r"(/work/main|/home/\w+|/root/|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|KAGGLE_KEY=\w{20,})")
    this_file = Path(__file__).resolve().relative_to(ROOT).as_posix()
    hits = [
        f"{name}: {m.group(0)}"
        for name, text in tracked_texts().items()
        if name != this_file
        for m in bad.finditer(text)
    ]
    assert hits == []


def test_no_citation_points_outside_the_repository():
    """Facts are cited as ``docs/facts.md §N``, a section that exists there; never as the old notes outside the
    repository, which a user cannot open."""
    outside = "FACTS" + " §"  # split, so that this file does not cite it
    facts = (ROOT / "docs" / "facts.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\. ", facts, flags=re.M))
    assert sections, "docs/facts.md has no numbered '## N. Title' sections"
    texts = tracked_texts()
    assert texts, "git ls-files listed no files"
    hits, dangling = [], []
    for name, text in texts.items():
        hits += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for m in re.finditer(re.escape(outside), text)]
        dangling += [
            f"{name}: docs/facts.md §{m.group(1)}"
            for m in re.finditer(r"docs/facts\.md §(\d+)", text)
            if m.group(1) not in sections
        ]
    # docs/facts.md's own cross-references (§N) name its sections too
    dangling += [f"docs/facts.md: §{n}" for n in re.findall(r"§(\d+)", facts) if n not in sections]
    assert hits == [], f"cite docs/facts.md §N instead of {outside}N: {hits}"
    assert dangling == [], f"references to sections docs/facts.md does not have: {dangling}"
