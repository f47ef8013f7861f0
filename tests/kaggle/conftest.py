"""Fixtures shared by the Kaggle tests: fake credentials in a HOME of their own, and the loopback fake Kaggle that the
real ``kaggle`` CLI reaches through ``HTTP_PROXY`` (docs/facts.md §5: ``KAGGLE_API_ENVIRONMENT=LOCALHOST``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kaggle_utils.kaggle.loopback import FakeKaggle, fake_credentials

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def creds(tmp_path, monkeypatch) -> Path:
    """Fake credentials in the environment and a HOME of their own (no real kaggle.json can be read)."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    for name, value in fake_credentials(home).items():
        monkeypatch.setenv(name, value)
    return home


@pytest.fixture
def kaggle(creds, monkeypatch):
    """The fake api.kaggle.com; the real CLI reaches it through HTTP_PROXY."""
    with FakeKaggle() as server:
        for name, value in server.routing().items():
            monkeypatch.setenv(name, value)
        yield server


@pytest.fixture
def make() -> Callable[..., subprocess.CompletedProcess]:
    """``make(target, "VAR=value", ...)`` run in the repository as a user would; the venv is not rebuilt from inside a
    test (its stamp is marked up to date)."""
    installed = b"".join((ROOT / name).read_bytes() for name in ("pyproject.toml", "constraints.txt"))
    stamp = ".venv/.installed-" + hashlib.sha1(installed).hexdigest()[:12]

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = ["make", "--no-print-directory", "-o", stamp, *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture(scope="module")
def built_notebooks(tmp_path_factory) -> Path:
    """The .ipynb files as `make notebooks` builds them (jupytext, with kernelspec, no outputs)."""
    import jupytext

    out = tmp_path_factory.mktemp("notebooks")
    for path in sorted((ROOT / "notebooks").glob("0*.py")):
        jupytext.write(jupytext.read(path), out / f"{path.stem}.ipynb")
    return out


# the adapter datasets the Kaggle inference recipe loads (infer-cascade-2xt4), and the recipe each was trained by
STUDENTS = {"wsdm-qwen2-5-14b-student": "student-qwen2.5-14b", "wsdm-gemma2-9b-student": "student-gemma2-9b"}


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """What `make upload-model` leaves in build/kaggle/models/: each student's train_config.json, as trained."""
    import json

    from kaggle_utils.kaggle import staging

    root = tmp_path / "models"
    for slug, recipe in STUDENTS.items():
        (root / slug).mkdir(parents=True)
        (root / slug / "train_config.json").write_text(json.dumps(staging.resolve(recipe)[1]))
    return root
