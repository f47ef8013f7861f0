"""kaggle_utils.prepare: validated files out, folds grouped by prompt, balanced and deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.data import schema
from kaggle_utils.data.clean import prompt_keys
from kaggle_utils.prepare import PrepareConfig, assign_folds, prepare, summary


@pytest.fixture(scope="module")
def train_df(demo_files) -> pd.DataFrame:
    return pd.read_parquet(demo_files["train"])


def test_prepare_writes_files(prepared, demo_files, train_df) -> None:
    out = prepared["dir"]
    assert sorted(p.name for p in out.iterdir()) == ["prepare_config.json", "train.parquet", "unlabeled.parquet"]
    written = schema.load(out / "train.parquet", "train")
    # the same rows in the same order, plus a fold column
    pd.testing.assert_frame_equal(written.drop(columns="fold"), train_df)
    assert written["fold"].dtype == np.int64
    assert set(written["fold"]) == {0, 1, 2, 3, 4}
    pool = schema.load(out / "unlabeled.parquet", "unlabeled")
    pd.testing.assert_frame_equal(pool, pd.read_parquet(demo_files["unlabeled"]))
    cfg = json.loads((out / "prepare_config.json").read_text())
    assert cfg["n_folds"] == 5 and cfg["out_dir"] == str(out)
    assert PrepareConfig(**cfg) == PrepareConfig(data_dir=demo_files["train"].parent, out_dir=out)


def test_prepare_returns_frames_and_summary(tmp_path: Path, demo_files) -> None:
    frames = prepare(PrepareConfig(data_dir=demo_files["train"].parent, out_dir=tmp_path / "p", n_folds=3))
    assert set(frames) == {"train", "test", "unlabeled"}
    assert set(frames["train"]["fold"]) == {0, 1, 2}
    s = summary(frames).set_index("file")
    assert s.loc["train", "rows"] == 600 and s.loc["test", "rows"] == 120
    share_a = (frames["train"]["winner"] == "model_a").mean()
    assert s.loc["train", "share_model_a"] == pytest.approx(share_a, abs=1e-3)
    assert np.isnan(s.loc["test", "share_model_a"])


def test_prepare_without_unlabeled_pool(tmp_path: Path, demo_files) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("train.parquet", "test.parquet"):
        (src / name).write_bytes((demo_files["train"].parent / name).read_bytes())
    frames = prepare(PrepareConfig(data_dir=src, out_dir=tmp_path / "out"))
    assert set(frames) == {"train", "test"}
    assert not (tmp_path / "out" / "unlabeled.parquet").exists()


def test_prepare_rejects_a_bad_train_file(tmp_path: Path, demo_files, train_df) -> None:
    src = tmp_path / "src"
    src.mkdir()
    bad = train_df.copy()
    bad.loc[7, "winner"] = "tie"
    bad.to_parquet(src / "train.parquet", index=False)
    (src / "test.parquet").write_bytes(demo_files["test"].read_bytes())
    with pytest.raises(schema.DataError, match=r"train\.parquet: column 'winner' row 7"):
        prepare(PrepareConfig(data_dir=src, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_rows_sharing_a_prompt_share_a_fold(train_df) -> None:
    df = train_df.iloc[:200].copy().reset_index(drop=True)
    # 20 prompts, each used by 10 rows (scattered through the frame)
    df["prompt"] = [f"shared prompt {i % 20}" for i in range(len(df))]
    folds = assign_folds(df, 5)
    per_prompt = pd.Series(folds).groupby(df["prompt"]).nunique()
    assert (per_prompt == 1).all()
    assert set(folds) == {0, 1, 2, 3, 4}


def test_every_fold_non_empty_and_balanced_per_language(prepared) -> None:
    df = pd.read_parquet(prepared["train"])
    counts = df["fold"].value_counts()
    assert set(counts.index) == {0, 1, 2, 3, 4}
    assert counts.min() >= 0.6 * len(df) / 5
    # prompts are dealt round-robin inside each language: fold sizes (in prompts) differ by at most one
    prompts = df.drop_duplicates("prompt")
    for lang, group in prompts.groupby("language"):
        sizes = group["fold"].value_counts().reindex(range(5), fill_value=0)
        assert sizes.max() - sizes.min() <= 1, lang


def test_folds_do_not_depend_on_row_order(train_df) -> None:
    folds = pd.Series(assign_folds(train_df, 5), index=train_df["id"])
    shuffled = train_df.sample(frac=1.0, random_state=3).reset_index(drop=True)
    folds_shuffled = pd.Series(assign_folds(shuffled, 5), index=shuffled["id"])
    pd.testing.assert_series_equal(folds_shuffled.loc[folds.index], folds)
    np.testing.assert_array_equal(assign_folds(train_df, 5), assign_folds(train_df, 5))


def test_missing_language_column_is_fine(train_df) -> None:
    folds = assign_folds(train_df.drop(columns="language"), 4)
    assert set(folds) == {0, 1, 2, 3}


def test_n_folds_validated() -> None:
    with pytest.raises(ValueError, match="n_folds=1"):
        PrepareConfig(n_folds=1)


def test_prepare_with_clean_drops_test_prompt_leaks(tmp_path: Path, demo_files, train_df) -> None:
    src = tmp_path / "src"
    src.mkdir()
    test = pd.read_parquet(demo_files["test"])
    train = train_df.copy()
    # a test prompt in another case and spacing, and a swapped duplicate of row 1
    train.loc[0, "prompt"] = "  " + test["prompt"].iloc[0].upper()
    dup = schema.swap_ab(train.iloc[[1]]).assign(id="dup-of-1")
    pd.concat([train, dup], ignore_index=True).to_parquet(src / "train.parquet", index=False)
    (src / "test.parquet").write_bytes(demo_files["test"].read_bytes())
    frames = prepare(PrepareConfig(data_dir=src, out_dir=tmp_path / "out", clean=True))
    out = frames["train"]
    schema.validate(out, "train")
    assert "dup-of-1" not in set(out["id"]) and train.loc[0, "id"] not in set(out["id"])
    assert not set(prompt_keys(out["prompt"])) & set(prompt_keys(test["prompt"]))
    report = pd.read_csv(tmp_path / "out" / "clean_report.csv")
    dropped = report[report["kind"] == "dropped"].groupby("reason")["rows"].sum()
    assert dropped["duplicate_pair_swapped"] == 1 and dropped["leak_exact"] >= 1
    # every row that went in is either written or counted as dropped
    assert len(out) == len(train) + 1 - dropped.drop("tie", errors="ignore").sum()
    written = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert list(written.columns) == [*train_df.columns, "fold"]
