"""Tests for kaggle_utils.data.demo: schema, determinism, language mix and the documented signal."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kaggle_utils.data import demo as demo_data
from kaggle_utils.data.demo import FLAW_MARKERS, DemoDataConfig

TRAIN_COLUMNS = ["id", "prompt", "response_a", "response_b", "winner", "model_a", "model_b", "language"]
TEST_COLUMNS = ["id", "prompt", "response_a", "response_b", "scored"]
UNLABELED_COLUMNS = ["id", "prompt", "response_a", "response_b", "model_a", "model_b", "language"]


def _generate(tmp_path: Path, name: str = "data", **kwargs) -> dict[str, Path]:
    params = {"n_train": 60, "n_test": 30, "n_unlabeled": 20, "seed": 0}
    params.update(kwargs)
    return demo_data.generate_demo_data(DemoDataConfig(out_dir=tmp_path / name, **params))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _generate(tmp_path_factory.mktemp("demo"))


ALL_MARKERS = sorted({m for markers in FLAW_MARKERS.values() for m in markers})


def _flaw_rule_accuracy(df: pd.DataFrame) -> float:
    """Accuracy of "the response that contains a flaw marker loses" (row's language if known, else any)."""
    correct = 0
    for row in df.itertuples(index=False):
        markers = FLAW_MARKERS[row.language] if "language" in df.columns else ALL_MARKERS
        a_flawed = any(m in row.response_a for m in markers)
        b_flawed = any(m in row.response_b for m in markers)
        assert a_flawed != b_flawed, "exactly one response per pair must carry a flaw marker"
        predicted = "model_b" if a_flawed else "model_a"
        correct += predicted == row.winner
    return correct / len(df)


def test_returns_all_paths(small: dict[str, Path]) -> None:
    assert set(small) == {"train", "test", "unlabeled", "sample_submission", "test_labels", "readme"}
    for path in small.values():
        assert path.is_file()
    assert small["train"].name == "train.parquet"
    assert small["readme"].name == "README.md"


def test_train_schema(small: dict[str, Path]) -> None:
    df = pd.read_parquet(small["train"])
    assert list(df.columns) == TRAIN_COLUMNS
    assert len(df) == 60
    for col in TRAIN_COLUMNS:
        assert pd.api.types.is_string_dtype(df[col]), col
    assert df["id"].str.startswith("syn-").all()
    assert df["id"].is_unique
    assert set(df["winner"]) <= {"model_a", "model_b"}
    assert (df["model_a"] != df["model_b"]).all()
    assert df[TRAIN_COLUMNS].notna().all().all()
    assert (df["prompt"].str.len() > 0).all()


def test_test_schema(small: dict[str, Path]) -> None:
    df = pd.read_parquet(small["test"])
    assert list(df.columns) == TEST_COLUMNS
    assert len(df) == 30
    assert df["id"].dtype == "int64"
    assert df["scored"].dtype == bool
    assert df["scored"].all()
    for col in ("prompt", "response_a", "response_b"):
        assert pd.api.types.is_string_dtype(df[col]), col


def test_unlabeled_schema(small: dict[str, Path]) -> None:
    df = pd.read_parquet(small["unlabeled"])
    assert list(df.columns) == UNLABELED_COLUMNS
    assert len(df) == 20
    for col in UNLABELED_COLUMNS:
        assert pd.api.types.is_string_dtype(df[col]), col
    assert df["id"].str.startswith("syn-").all()
    train_ids = set(pd.read_parquet(small["train"])["id"])
    assert not train_ids & set(df["id"]), "train and unlabeled ids must not overlap"


def test_test_ids_in_submission_and_labels(small: dict[str, Path]) -> None:
    test_ids = pd.read_parquet(small["test"])["id"]
    assert test_ids.is_unique
    sub = pd.read_csv(small["sample_submission"])
    labels = pd.read_csv(small["test_labels"])
    assert list(sub.columns) == ["id", "winner"]
    assert list(labels.columns) == ["id", "winner"]
    assert (sub["winner"] == "model_a").all()
    assert set(labels["winner"]) <= {"model_a", "model_b"}
    for frame in (sub, labels):
        assert pd.api.types.is_integer_dtype(frame["id"])
        assert frame["id"].is_unique
        assert sorted(frame["id"]) == sorted(test_ids)


def test_parquet_files_are_marked_synthetic(small: dict[str, Path]) -> None:
    for name in ("train", "test", "unlabeled"):
        meta = pq.read_schema(small[name]).metadata
        assert meta[b"synthetic"] == b"true", name
        assert meta[b"generator"] == b"kaggle_utils.data.demo", name
        assert b"pandas" in meta, "existing pandas metadata must be kept"


def test_readme_says_synthetic(small: dict[str, Path]) -> None:
    text = small["readme"].read_text(encoding="utf-8")
    assert "SYNTHETIC" in text
    assert "kaggle_utils.data.demo" in text
    assert "seed 0" in text
    assert "| train.parquet | 60 |" in text
    assert "| test.parquet | 30 |" in text


def test_same_seed_is_identical(tmp_path: Path) -> None:
    first = _generate(tmp_path, "a", seed=7)
    second = _generate(tmp_path, "b", seed=7)
    for name in ("train", "test", "unlabeled"):
        pd.testing.assert_frame_equal(pd.read_parquet(first[name]), pd.read_parquet(second[name]))
    for name in ("sample_submission", "test_labels", "readme"):
        assert first[name].read_bytes() == second[name].read_bytes()


def test_different_seed_differs(tmp_path: Path) -> None:
    first = pd.read_parquet(_generate(tmp_path, "a", seed=1)["train"])
    second = pd.read_parquet(_generate(tmp_path, "b", seed=2)["train"])
    assert not first.equals(second)
    assert (first["response_a"] != second["response_a"]).mean() > 0.9


def test_languages_and_balance(tmp_path: Path) -> None:
    df = pd.read_parquet(_generate(tmp_path, n_train=300)["train"])
    languages = set(df["language"])
    assert len(languages) >= 8, languages
    assert languages <= set(FLAW_MARKERS)
    assert 0.35 <= (df["language"] == "English").mean() <= 0.7
    share_a = (df["winner"] == "model_a").mean()
    assert 0.35 <= share_a <= 0.65, share_a
    assert df["model_a"].nunique() >= 8


def test_signal_is_exact_without_noise(tmp_path: Path) -> None:
    df = pd.read_parquet(_generate(tmp_path, n_train=300, label_noise=0.0)["train"])
    assert _flaw_rule_accuracy(df) == 1.0


def test_signal_with_noise(tmp_path: Path) -> None:
    paths = _generate(tmp_path, n_train=600, n_test=200, label_noise=0.1)
    accuracy = _flaw_rule_accuracy(pd.read_parquet(paths["train"]))
    assert 0.85 <= accuracy <= 0.95, accuracy
    # the test answer key follows the same rule
    test = pd.read_parquet(paths["test"]).merge(pd.read_csv(paths["test_labels"]), on="id")
    assert len(test) == 200
    assert 0.82 <= _flaw_rule_accuracy(test) <= 0.98


def test_flaw_marker_opens_the_flawed_response(tmp_path: Path) -> None:
    df = pd.read_parquet(_generate(tmp_path, n_train=200, label_noise=0.0)["train"])
    for row in df.itertuples(index=False):
        loser = row.response_b if row.winner == "model_a" else row.response_a
        winner = row.response_a if row.winner == "model_a" else row.response_b
        assert any(loser.startswith(m) for m in FLAW_MARKERS[row.language])
        assert winner.startswith(("## ", "**", "1. "))


def test_lengths(tmp_path: Path) -> None:
    df = pd.read_parquet(_generate(tmp_path, n_train=300)["train"])
    prompt_words = df["prompt"].str.split().str.len()
    response_words = pd.concat([df["response_a"], df["response_b"]]).str.split().str.len()
    assert response_words.median() > prompt_words.median()
    assert prompt_words.max() <= 450  # cap 400 words (+ markdown / emoji tokens)
    assert response_words.max() <= 330  # cap 300 words (+ lead / marker)


def test_generation_is_fast(tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    _generate(tmp_path, n_train=1200, n_test=300, n_unlabeled=600)
    assert time.perf_counter() - start < 10


def test_string_out_dir_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DemoDataConfig(out_dir=str(tmp_path / "s"), n_train=5, n_test=5, n_unlabeled=5)
    assert isinstance(cfg.out_dir, Path)
    out = tmp_path / "cli"
    demo_data.main(["--out-dir", str(out), "--n-train", "10", "--n-test", "4", "--n-unlabeled", "3", "--seed", "3"])
    printed = capsys.readouterr().out
    assert f"train: {out / 'train.parquet'}" in printed
    assert len(pd.read_parquet(out / "test.parquet")) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": 0},
        {"n_train": -5},
        {"n_test": 0},
        {"n_unlabeled": 0},
        {"label_noise": -0.1},
        {"label_noise": 0.5},
        {"label_noise": 0.9},
        {"length_scale": 0.0},
    ],
)
def test_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DemoDataConfig(**kwargs)
