"""Stage 1, data preparation: validate the competition files and assign cross-validation folds.

With ``clean=True`` the training file also goes through the data layer first (``kaggle_utils.data.sources``
normalises it, ``kaggle_utils.data.clean`` filters, deduplicates and drops rows whose prompt leaks from the test
file) and the counts of every step are written to ``clean_report.csv``.

``python -m kaggle_utils.prepare --data-dir demo/data --out-dir demo/work/prepared``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import clean as cleaning
from kaggle_utils.data import schema, sources


@dataclass
class PrepareConfig:
    """Validate train/test/unlabelled files and write train with a ``fold`` column."""

    # the stage its recipes name (``stage = "prepare"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "prepare"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("data_dir", "unlabeled_file", "out_dir", "n_folds", "clean"),
    }

    # folder holding the competition files (train.parquet, test.parquet); found by search on Kaggle
    data_dir: Path = Path("demo/data")
    # folder that receives train.parquet (with folds), unlabeled.parquet and the resolved config
    out_dir: Path = Path("demo/work/prepared")
    # number of cross-validation folds; rows sharing a prompt always share a fold
    n_folds: int = 5
    # name of the unlabelled pool file inside data_dir (pseudo-labelling input); skipped when absent
    unlabeled_file: str = "unlabeled.parquet"
    # run the data layer on train before folding: quality filters, pair dedup, test-prompt leakage control
    # (exact and near-duplicate); writes clean_report.csv. Off: train is written as given, plus folds
    clean: bool = False

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out_dir = Path(self.out_dir)
        if self.n_folds < 2:
            raise ValueError(f"n_folds={self.n_folds} must be at least 2")


def assign_folds(df: pd.DataFrame, n_folds: int) -> np.ndarray:
    """Fold per row, grouped by prompt (a prompt never spans two folds) and balanced within each language.

    A group is one *normalised* prompt (``clean.prompt_keys``: case and spacing ignored), so near-identical
    copies of a prompt cannot sit on both sides of a split. Each group takes the smallest language label
    among its rows; groups are ordered by their stable hash inside each language and dealt round-robin, so
    the assignment depends neither on row order nor on Python's per-process hash seed.
    """
    keys = df["prompt_key"].to_numpy() if "prompt_key" in df.columns else cleaning.prompt_keys(df["prompt"])
    lang = df["language"] if "language" in df.columns else pd.Series("unknown", index=df.index)
    lang = lang.astype(object).where(lang.notna(), "unknown").astype(str).to_numpy()
    groups = pd.DataFrame({"key": keys, "lang": lang}).groupby("key", sort=False)["lang"].min().reset_index()
    groups = groups.sort_values(["lang", "key"])
    groups["fold"] = groups.groupby("lang").cumcount() % n_folds
    fold_of = pd.Series(groups["fold"].to_numpy(), index=groups["key"].to_numpy())
    return fold_of.reindex(keys).to_numpy(dtype=np.int64)


def clean_train(train: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.DataFrame, sources.Report]:
    """The data layer on the competition train file: normalise, filter, dedup, drop test-prompt leaks.

    Returns rows in the competition's train schema (``source``/``source_id`` dropped, ``id`` as given).
    """
    norm, report = sources.competition(train, source="competition")
    cleaned, rep = cleaning.clean(norm, test["prompt"], cleaning.CleanConfig(fill_language=False))
    report.extend(rep)
    out = cleaned.assign(id=cleaned["source_id"]).drop(columns=["source", "source_id"])
    extra = [c for c in train.columns if c not in out.columns]
    if extra:  # columns beyond the schema come back by id
        out = out.merge(train[["id", *extra]].astype({"id": str}), on="id", how="left")
    return out, report


def prepare(cfg: PrepareConfig) -> dict[str, pd.DataFrame]:
    """Run the stage; returns the prepared frames by name (``train``, ``test`` and ``unlabeled`` if present)."""
    train = schema.load(cfg.data_dir / "train.parquet", "train")
    test = schema.load(cfg.data_dir / "test.parquet", "test")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.clean:
        train, report = clean_train(train, test)
        report.table().to_csv(cfg.out_dir / "clean_report.csv", index=False)
    train = train.assign(fold=assign_folds(train, cfg.n_folds))
    train.to_parquet(cfg.out_dir / "train.parquet", index=False)
    frames = {"train": train, "test": test}
    pool_path = cfg.data_dir / cfg.unlabeled_file
    if pool_path.is_file():
        frames["unlabeled"] = schema.load(pool_path, "unlabeled")
        frames["unlabeled"].to_parquet(cfg.out_dir / "unlabeled.parquet", index=False)
    save_config(cfg, cfg.out_dir / "prepare_config.json")
    return frames


def summary(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows, label balance and median characters per field, one line per file."""
    out = []
    for name, df in frames.items():
        row = {"file": name, "rows": len(df)}
        if "winner" in df.columns:
            row["share_model_a"] = round(float((df["winner"] == "model_a").mean()), 3)
        for col in schema.TEXT_COLUMNS:
            row[f"median_chars_{col}"] = int(df[col].str.len().median())
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PrepareConfig, argv)
    print(summary(prepare(cfg)).to_string(index=False))


if __name__ == "__main__":
    main()
