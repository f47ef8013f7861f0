"""Stage 1, data preparation: validate the competition files and assign cross-validation folds.

``python -m kaggle_utils.prepare --data-dir demo/data --out-dir demo/work/prepared``
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils import data
from kaggle_utils.cli import parse_config, save_config


@dataclass
class PrepareConfig:
    """Validate train/test/unlabelled files and write train with a ``fold`` column."""

    # folder holding the competition files (train.parquet, test.parquet); found by search on Kaggle
    data_dir: Path = Path("demo/data")
    # folder that receives train.parquet (with folds), unlabeled.parquet and the resolved config
    out_dir: Path = Path("demo/work/prepared")
    # number of cross-validation folds; rows sharing a prompt always share a fold
    n_folds: int = 5
    # name of the unlabelled pool file inside data_dir (pseudo-labelling input); skipped when absent
    unlabeled_file: str = "unlabeled.parquet"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out_dir = Path(self.out_dir)
        if self.n_folds < 2:
            raise ValueError(f"n_folds={self.n_folds} must be at least 2")


def assign_folds(df: pd.DataFrame, n_folds: int) -> np.ndarray:
    """Fold per row, grouped by prompt (a prompt never spans two folds) and balanced within each language.

    Prompts are ordered by a stable hash inside each language and dealt round-robin, so the assignment
    does not depend on row order or on Python's per-process hash seed.
    """
    keys = df["prompt"].map(lambda s: hashlib.blake2b(s.encode(), digest_size=8).hexdigest())
    lang = df["language"] if "language" in df.columns else pd.Series("unknown", index=df.index)
    groups = pd.DataFrame({"key": keys, "lang": lang.fillna("unknown")}).drop_duplicates("key")
    groups = groups.sort_values(["lang", "key"])
    groups["fold"] = groups.groupby("lang").cumcount() % n_folds
    return keys.map(dict(zip(groups["key"], groups["fold"], strict=False))).to_numpy(dtype=np.int64)


def prepare(cfg: PrepareConfig) -> dict[str, pd.DataFrame]:
    """Run the stage; returns the prepared frames by name (``train``, ``test`` and ``unlabeled`` if present)."""
    train = data.load(cfg.data_dir / "train.parquet", "train")
    test = data.load(cfg.data_dir / "test.parquet", "test")
    train = train.assign(fold=assign_folds(train, cfg.n_folds))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    train.to_parquet(cfg.out_dir / "train.parquet", index=False)
    frames = {"train": train, "test": test}
    pool_path = cfg.data_dir / cfg.unlabeled_file
    if pool_path.is_file():
        frames["unlabeled"] = data.load(pool_path, "unlabeled")
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
        for col in data.TEXT_COLUMNS:
            row[f"median_chars_{col}"] = int(df[col].str.len().median())
        out.append(row)
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PrepareConfig, argv)
    print(summary(prepare(cfg)).to_string(index=False))


if __name__ == "__main__":
    main()
