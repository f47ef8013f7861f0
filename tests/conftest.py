"""Shared, session-scoped fixtures: one small synthetic dataset, the tiny demo models, one trained adapter.

Everything expensive is built once per test run and reused; under pytest-xdist (``make test`` runs two workers)
the first worker to need one builds it in a folder all workers share and the others read it back:

* ``demo_files``: synthetic competition files (600 train / 120 test / 120 unlabelled rows, short texts);
* ``models``: tiny random-weight Qwen2 and Gemma2 sequence classifiers with the real Qwen2.5 tokenizer;
* ``tokenizer``: that tokenizer, loaded the way every stage loads it;
* ``prepared``: the prepare stage's output (train with folds, unlabelled pool);
* ``trained``: one LoRA adapter trained on the 4-bit Qwen2 tiny model, reused by the modeling,
  pseudo-labelling and inference tests.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pytest
import torch
from filelock import FileLock

from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.models.loading import load_tokenizer
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, TrainResult, train

# One intra-op thread: the models are tiny, and on a 2-core machine shared with other processes two spinning
# OpenMP threads per process make training many times slower (measured: 37 steps in 5 s with 1, 34 s with 2).
torch.set_num_threads(1)

# Inputs are kept short so that every model run stays CPU-sized.
MAX_LENGTH = 256
N_TRAIN, N_TEST, N_UNLABELED = 600, 120, 120


T = TypeVar("T")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This worker's own folder (tests that write files of their own there never meet another worker's)."""
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every pytest-xdist worker of this run (the parent of their base folders), else this run's."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"


def built_once(folder: Path, build: Callable[[], T]) -> T:
    """``build()``, which writes under ``folder``: run by the first worker that gets here, read back by the rest."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    value = folder.with_name(folder.name + ".pickle")
    with FileLock(f"{folder}.lock"):
        if not value.exists():
            value.write_bytes(pickle.dumps(build()))
        return pickle.loads(value.read_bytes())


@pytest.fixture(scope="session")
def demo_files(shared_dir: Path) -> dict[str, Path]:
    cfg = DemoDataConfig(
        out_dir=shared_dir / "data", n_train=N_TRAIN, n_test=N_TEST, n_unlabeled=N_UNLABELED, length_scale=0.05
    )
    return built_once(cfg.out_dir, lambda: generate_demo_data(cfg))


@pytest.fixture(scope="session")
def models(shared_dir: Path) -> dict[str, Path]:
    cfg = DemoModelsConfig(out_dir=shared_dir / "models")
    return built_once(cfg.out_dir, lambda: build_demo_models(cfg))


@pytest.fixture(scope="session")
def qwen_path(models: dict[str, Path]) -> Path:
    return models["qwen2-tiny"]


@pytest.fixture(scope="session")
def gemma_path(models: dict[str, Path]) -> Path:
    return models["gemma2-tiny"]


@pytest.fixture(scope="session")
def tokenizer(qwen_path: Path):
    """The real Qwen2.5 tokenizer, as saved beside the tiny model and loaded by every stage."""
    return load_tokenizer(qwen_path)


@pytest.fixture(scope="session")
def prepared(shared_dir: Path, demo_files: dict[str, Path]) -> dict[str, Path]:
    out = shared_dir / "prepared"

    def run() -> None:
        prepare(PrepareConfig(data_dir=demo_files["train"].parent, out_dir=out, n_folds=5))

    built_once(out, run)
    return {"train": out / "train.parquet", "unlabeled": out / "unlabeled.parquet", "dir": out}


@pytest.fixture(scope="session")
def competition_test(demo_files: dict[str, Path]) -> pd.DataFrame:
    return pd.read_parquet(demo_files["test"])


@dataclass
class Trained:
    cfg: TrainConfig
    result: TrainResult
    stdout: str


@pytest.fixture(scope="session")
def trained(shared_dir: Path, prepared: dict[str, Path], qwen_path: Path) -> Trained:
    """LoRA on the 4-bit nf4 Qwen2 tiny model, fold 0 held out: 3 epochs of ~30 steps at 4,096 tokens."""
    import contextlib
    import io

    cfg = TrainConfig.flat(
        model_path=qwen_path,
        load_in_4bit=True,
        train_file=prepared["train"],
        out_dir=shared_dir / "trained",
        val_fold=0,
        max_length=MAX_LENGTH,
        lr=2e-3,
        epochs=3,
        batch_tokens=4096,
        max_rows=16,
        save_every=30,
    )

    def run() -> tuple[TrainResult, str]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = train(cfg)
        return result, buf.getvalue()

    return Trained(cfg, *built_once(cfg.data.out_dir, run))


# Fixtures that train or run make: a test that uses one is slow wherever it lives (modules that run stages
# throughout say so themselves with ``pytestmark``).
SLOW_FIXTURES = {"trained", "make"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
