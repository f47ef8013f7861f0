"""The training and validation rows of a run: the split by fold, the pseudo-labelled extras, targets and weights.

``split`` reads the prepared file (with its rows' teacher logits joined by id) and the extras (without the rows
already there or held out); ``encode_rows`` tokenises the training rows once and keeps their
human labels, teacher logits and row weights beside the tokens (:class:`TrainRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kaggle_utils.data import clean, schema
from kaggle_utils.data.mixing import mix_extras, read_extras
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.inputs.tokens import PairTokens
from kaggle_utils.training.config import ObjectiveConfig, TrainConfig, TrainDataConfig


def _check_val_fold(data: TrainDataConfig, folds: pd.Series) -> None:
    """``val_fold`` selects rows of a numeric ``fold`` column: anything else would train with no validation."""
    found = sorted(pd.unique(folds.dropna()).tolist(), key=str)
    shown = f"{found[:12]!r}{' ...' if len(found) > 12 else ''}"
    if not pd.api.types.is_numeric_dtype(folds):
        # strings "0", "1" never equal the number 0: every row would train and none validate
        raise schema.DataError(
            f"{data.train_file}: the 'fold' column holds {folds.dtype} values {shown}, not numbers; write "
            "the folds as integers (the prepare stage does), or pass --val-fold -1 to train on every row"
        )
    if not (folds == data.val_fold).any():
        raise schema.DataError(
            f"{data.train_file}: --val-fold {data.val_fold} selects no rows; the 'fold' column holds "
            f"{shown}: pass one of them, or --val-fold -1 to train on every row"
        )


def split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (labelled folds with their teachers' logits joined by id, + pseudo-labelled extras that are not
    already among them or in the validation fold) and validation rows."""
    df = join_teachers(cfg.data, schema.load(cfg.data.train_file, "train"))
    if cfg.data.val_fold >= 0:
        if "fold" not in df.columns:
            raise schema.DataError(
                f"{cfg.data.train_file}: no 'fold' column; run the prepare stage or pass --val-fold -1"
            )
        _check_val_fold(cfg.data, df["fold"])
        train_df, val_df = df[df["fold"] != cfg.data.val_fold], df[df["fold"] == cfg.data.val_fold]
    else:
        train_df, val_df = df, df.iloc[:0]
    extras = []
    if cfg.data.extra_files:
        # one file per teacher over the same pool: one row per id, the teachers' logits averaged; rows of the
        # validation fold or the training rows left out; then the mixing settings (confidence, agreement with a
        # human label, per-source caps) choose the rows, and say so
        fresh = drop_seen(read_extras(cfg.data.extra_files), val_df, None if cfg.data.extras_only else train_df)
        extras = [mix_extras(cfg.mix, fresh, cfg.schedule.seed)[0]]
    kept = [] if cfg.data.extras_only else [train_df]  # extras_only: the labelled rows only validate
    train_df = pd.concat([*kept, *extras], ignore_index=True)
    if cfg.data.max_train_rows:
        train_df = train_df.sample(n=min(cfg.data.max_train_rows, len(train_df)), random_state=cfg.schedule.seed)
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


TEACHER_COLUMNS = (*schema.LOGIT_COLUMNS, "p_a", "p_b")


def join_teachers(data: TrainDataConfig, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (the training file) with the logits of ``data.teacher_files`` joined onto its rows by id.

    Several files (one per teacher) are averaged in logit space first. A row the files do not cover keeps no
    teacher; ids of the files that are not in ``df`` are ignored and counted. A file that shows a row in the
    other A/B orientation is refused (its logits would be swapped).
    """
    if not data.teacher_files:
        return df
    frames = [schema.read_table(path) for path in data.teacher_files]
    teachers = schema.average_teachers(frames, data.teacher_files).drop_duplicates("id")
    if "response_a" in teachers.columns:
        both = teachers[["id", "response_a"]].merge(df[["id", "response_a"]], on="id", suffixes=("", "_train"))
        flipped = both[both["response_a"] != both["response_a_train"]]
        if len(flipped):
            raise schema.DataError(
                f"{data.teacher_files}: id {flipped['id'].iloc[0]!r} shows another response A than "
                f"{data.train_file}: label the training file itself (its rows as they are) with the teacher"
            )
    logits = schema.teacher_logits(teachers)
    table = pd.DataFrame({"id": teachers["id"], "logit_a": logits[:, 0], "logit_b": logits[:, 1]})
    table["p_a"] = 1.0 / (1.0 + np.exp(-(table["logit_a"] - table["logit_b"]).to_numpy(dtype=np.float64)))
    table["p_b"] = 1.0 - table["p_a"]
    out = df.drop(columns=[c for c in TEACHER_COLUMNS if c in df.columns]).merge(table, on="id", how="left")
    covered, unknown = int(out["id"].isin(table["id"]).sum()), int((~table["id"].isin(df["id"])).sum())
    print(f"teacher files: logits joined by id onto {covered:,} of {len(df):,} rows ({unknown:,} of their ids unknown)")
    return out


def drop_seen(extras: pd.DataFrame, val_df: pd.DataFrame, train_df: pd.DataFrame | None) -> pd.DataFrame:
    """``extras`` without the rows of the validation fold (and of ``train_df``, unless None): the same id, or the
    same prompt and responses in either A/B order (a copy under another id). Counts are printed."""
    keep, counts = np.ones(len(extras), dtype=bool), {}
    with_text = {"prompt", "response_a", "response_b"}.issubset(extras.columns)
    keys = clean.pair_keys(extras) if with_text and len(extras) else None
    for name, rows in (("the validation fold", val_df), ("the training rows", train_df)):
        if rows is None or not len(rows):
            continue
        hit = extras["id"].isin(rows["id"]).to_numpy()
        if keys is not None and {"prompt", "response_a", "response_b"}.issubset(rows.columns):
            hit = hit | np.isin(keys, clean.pair_keys(rows))
        counts[name] = int((hit & keep).sum())
        keep &= ~hit
    if sum(counts.values()):
        said = ", ".join(f"{n:,} in {name}" for name, n in counts.items() if n)
        print(f"extra rows left out (same id or same texts): {said}; {int(keep.sum()):,} of {len(extras):,} kept")
    return extras[keep].reset_index(drop=True)


def _targets(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Human labels (N,) int64, -1 where a row has none, and teacher logits (N, 2), NaN where it has none."""
    hard = np.full(len(df), -1, dtype=np.int64)
    if "winner" in df.columns:
        known = df["winner"].isin(schema.WINNERS).to_numpy()
        hard[known] = schema.labels(df[known])
    return hard, schema.teacher_logits(df)


def row_weights(objective: ObjectiveConfig, df: pd.DataFrame) -> np.ndarray:
    """(N,) float32: the ``weight`` column where given, else ``source_weights[source]``, else 1."""
    w = np.ones(len(df), dtype=np.float32)
    if objective.source_weights and "source" in df.columns:
        w = df["source"].map(objective.source_weights).fillna(1.0).to_numpy(dtype=np.float32)
    if "weight" in df.columns:
        given = df["weight"].to_numpy(dtype=np.float32)
        w = np.where(np.isfinite(given), given, w)
    if (w < 0).any() or w.sum() <= 0:
        raise schema.DataError(f"row weights must be >= 0 and not all 0; got min {w.min()}, sum {w.sum()}")
    return w


@dataclass
class TrainRows:
    """The training rows, encoded once; each epoch shows every row in one A/B orientation, built per batch."""

    tokens: PairTokens  # token ids of every row in one flat int32 array; ``rows(idx, swapped)`` builds a batch
    hard: np.ndarray  # (N,) int64: 0 if A wins, 1 if B wins, -1 without a human label
    teacher: np.ndarray  # (N, 2) float32: the teacher's logits of A and B winning, NaN without a teacher
    weight: np.ndarray  # (N,) float32: the row's weight in the loss
    row_ids: np.ndarray  # (N,) the rows' ``id`` values, named when a batch's loss is not finite
    lengths: np.ndarray  # (N,) tokens per row (the same in both orientations); batches are formed on these

    def __len__(self) -> int:
        return len(self.tokens)


def encode_rows(cfg: TrainConfig, fmt: PromptFormatter, df: pd.DataFrame) -> TrainRows:
    hard, teacher = _targets(df)
    tokens = fmt.encode_pairs(df)
    return TrainRows(tokens, hard, teacher, row_weights(cfg.objective, df), df["id"].to_numpy(), tokens.lengths)


def training_rows(cfg: TrainConfig, fmt: PromptFormatter) -> tuple[TrainRows, pd.DataFrame]:
    """What the loop trains and validates on: the training rows (the folds not held out, the extras mixed in,
    sampled to ``max_train_rows``, rows of weight 0 left out) encoded with their targets and weights, and the
    held-out rows as a frame (evaluation encodes them in both A/B orientations)."""
    train_df, val_df = split(cfg)
    if cfg.schedule.max_val_rows:
        val_df = stratified_subset(val_df, cfg.schedule.max_val_rows, cfg.schedule.seed)
    weightless = row_weights(cfg.objective, train_df) == 0
    if weightless.any():  # they would add nothing but their forward's cost, and a step of them alone is 0 / 0
        print(f"{int(weightless.sum()):,} training rows weigh 0 (source_weights or a weight column): left out")
        train_df = train_df[~weightless].reset_index(drop=True)
    return encode_rows(cfg, fmt, train_df), val_df


def stratified_subset(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of ``df`` (kept in their order) in which every language x winner group keeps its share.

    Deterministic in ``n`` and ``seed``: rows are shuffled once, ranked inside their group, and the rows with the
    smallest rank over group size are kept (an even spread over the groups, rounding to whole rows).
    """
    if n >= len(df):
        return df
    keys = [c for c in ("language", "winner") if c in df.columns]
    order = np.random.default_rng(seed).permutation(len(df))
    if keys:
        groups = df.iloc[order].groupby(keys, sort=False, dropna=False)
        rank, group = groups.cumcount().to_numpy(), groups.ngroup().to_numpy()
        size = np.bincount(group)[group]
    else:
        rank, size = np.arange(len(df)), np.full(len(df), len(df))
    position = (rank + 0.5) / size
    kept = order[np.argsort(position, kind="stable")[:n]]
    return df.iloc[np.sort(kept)].reset_index(drop=True)
