"""Competition files: the schema, loading with validation, and labels.

Every loader checks the file against the competition schema and raises :class:`DataError` naming the
file, the column and the first bad row, instead of letting a bad value surface deep inside training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

TEXT_COLUMNS = ("prompt", "response_a", "response_b")
WINNERS = ("model_a", "model_b")
# ``winner`` of a human tie kept as a training row (the pool's ``keep_ties``): its target is p_a = p_b = 0.5, which
# the file carries; the competition's own files never hold it
TIE = "tie"
# Columns each kind of file must have (extra columns are kept).
SCHEMAS: dict[str, tuple[str, ...]] = {
    "train": ("id", *TEXT_COLUMNS, "winner", "model_a", "model_b", "language"),
    "test": ("id", *TEXT_COLUMNS),
    "unlabeled": ("id", *TEXT_COLUMNS),
    # an extra training file: pseudo-labelled rows (the teacher's ``p_a, p_b`` and/or ``logit_a, logit_b``) and/or
    # hard-labelled rows (a human ``winner``, e.g. the pool's extra_labelled.parquet); every row needs one target
    "soft": ("id", *TEXT_COLUMNS),
}


class DataError(ValueError):
    """A competition file does not match the expected schema; the message names file, column and row."""


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a parquet or CSV file, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # pyarrow and the csv parser raise many types; name the file for all of them
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(exc).__name__}: {exc})") from exc
    raise DataError(f"{path}: expected a .parquet or .csv file")


def validate(df: pd.DataFrame, kind: str, source: str = "<frame>") -> pd.DataFrame:
    """Check ``df`` against the schema of ``kind`` (a key of :data:`SCHEMAS`); return it unchanged."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(SCHEMAS)}")
    missing = [c for c in SCHEMAS[kind] if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")
    for col in TEXT_COLUMNS:
        bad = ~df[col].map(lambda v: isinstance(v, str))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{source}: column {col!r} row {row} (id={df['id'].iloc[row]!r}) must be text, "
                f"got {type(df[col].iloc[row]).__name__}: {df[col].iloc[row]!r}"
            )
    dup = df["id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataError(f"{source}: column 'id' row {row}: id {df['id'].iloc[row]!r} appears more than once")
    if kind == "train":
        bad = ~df["winner"].isin(WINNERS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{source}: column 'winner' row {row} (id={df['id'].iloc[row]!r}) is {df['winner'].iloc[row]!r}; "
                f"expected one of {list(WINNERS)}"
            )
    if kind == "soft":
        _validate_targets(df, source)
    return df


def _validate_targets(df: pd.DataFrame, source: str) -> None:
    """Every row of an extra training file has a target: teacher probabilities or logits, or a human winner.

    ``p_a, p_b`` where a row has them must be two probabilities summing to 1; a row may leave both empty when it has
    finite ``logit_a, logit_b`` or a ``winner`` (model_a / model_b) instead. A ``tie`` winner needs its p = 0.5 pair.
    """
    n = len(df)
    has_probs = "p_a" in df.columns and "p_b" in df.columns
    probs = df[["p_a", "p_b"]].to_numpy(dtype=float) if has_probs else np.full((n, 2), np.nan)
    empty = np.isnan(probs).all(1)
    winner = df["winner"].to_numpy(dtype=object) if "winner" in df.columns else np.full(n, None, dtype=object)
    decided = np.isin(winner, WINNERS)
    if all(c in df.columns for c in LOGIT_COLUMNS):
        logits = np.isfinite(df[list(LOGIT_COLUMNS)].to_numpy(dtype=float)).all(1)
    else:
        logits = np.zeros(n, dtype=bool)
    given = ~pd.isna(winner)
    bad = given & ~decided & (winner != TIE)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: column 'winner' row {row} (id={df['id'].iloc[row]!r}) is {winner[row]!r}; expected one of "
            f"{[*WINNERS, TIE]} or empty (a pseudo-labelled row)"
        )
    bad = (winner == TIE) & empty
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: row {row} (id={df['id'].iloc[row]!r}) is a tie without 'p_a','p_b': a kept tie's target is "
            "p_a = p_b = 0.5, written by the pool stage; write it, or drop the row"
        )
    valid = np.isfinite(probs).all(1) & (probs >= 0).all(1) & (np.abs(probs.sum(1) - 1) < 1e-3)
    bad = ~valid & (~empty | ~(logits | decided))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        if not has_probs:
            raise DataError(
                f"{source}: row {row} (id={df['id'].iloc[row]!r}) has no target: no 'p_a','p_b', no finite "
                "'logit_a','logit_b' and no 'winner' (model_a / model_b); pseudo-label it or drop it"
            )
        raise DataError(
            f"{source}: columns 'p_a','p_b' row {row} (id={df['id'].iloc[row]!r}) are {probs[row].tolist()}; "
            "expected two probabilities summing to 1 (or both empty on a row with logits or a winner)"
        )


def read_test(path: Path | str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The test file for inference, repaired rather than refused: a hidden test set must still get a submission.

    Refused (:class:`DataError`, before any model loads) only when it cannot be a test file at all: unreadable,
    or without an ``id`` column or a text column. Otherwise every row is kept in order and ids stay exactly as
    read (CSV ids as text, so ``007`` keeps its zeros; ``null`` or ``N/A`` in a text field stays text); a
    missing or non-text field becomes empty text. Returns the frame and the repairs made, as counts by kind.
    """
    path = Path(path)
    if path.suffix == ".csv" and path.is_file():
        try:  # every column as text: pandas would turn "007" into 7 and "N/A" into NaN
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read as csv ({type(exc).__name__}: {exc})") from exc
    else:
        df = read_table(path)
    missing = [c for c in SCHEMAS["test"] if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a test file: missing column(s) {missing}; found {list(df.columns)}")
    df = df.reset_index(drop=True)
    repairs: dict[str, int] = {}
    for col in TEXT_COLUMNS:
        values = df[col].to_numpy(dtype=object)
        absent = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values], dtype=bool)
        other = np.array([not isinstance(v, str) for v in values], dtype=bool) & ~absent
        if absent.any() or other.any():
            repairs[f"{col}: missing -> empty text"] = int(absent.sum())
            repairs[f"{col}: not text -> empty text"] = int(other.sum())
            df[col] = np.where(absent | other, "", values)
    ids = df["id"]
    repairs["id: missing (kept)"] = int(ids.isna().sum())
    repairs["id: repeated (kept)"] = int(ids.duplicated().sum())
    return df, {k: v for k, v in repairs.items() if v}


def load(path: Path | str, kind: str) -> pd.DataFrame:
    """Read and validate one competition-format file."""
    return validate(read_table(path), kind, source=str(path))


def labels(df: pd.DataFrame) -> np.ndarray:
    """Hard labels as class indices: 0 = response A preferred, 1 = response B. Shape (N,)."""
    return (df["winner"].to_numpy() == "model_b").astype(np.int64)


def soft_targets(df: pd.DataFrame) -> np.ndarray:
    """Target distribution per row, shape (N, 2): the teacher's ``p_a, p_b`` where given, else one-hot."""
    if "p_a" in df.columns:
        probs = df[["p_a", "p_b"]].to_numpy(dtype=np.float32, copy=True)
        if "winner" not in df.columns:
            return probs
        # rows with a human label but no teacher probability fall back to the one-hot label
        missing = np.isnan(probs).any(1)
        if not missing.any():
            return probs
        probs[missing] = np.eye(2, dtype=np.float32)[labels(df[missing])]
        return probs
    return np.eye(2, dtype=np.float32)[labels(df)]


# a teacher's raw classifier logits per row, in the row's A/B orientation (pseudo-label files may carry them)
LOGIT_COLUMNS = ("logit_a", "logit_b")
# probabilities are clipped here before their log is taken: p = 0 would be an infinite logit
PROB_FLOOR = 1e-6


def teacher_logits(df: pd.DataFrame) -> np.ndarray:
    """The teacher's logits per row, shape (N, 2) float32; NaN rows where the row has no teacher.

    ``logit_a``/``logit_b`` where the file has them and they are finite; else ``log(p_a), log(p_b)`` (clipped at
    :data:`PROB_FLOOR`). For two classes ``log softmax(z) = z - logsumexp(z)`` differs from the raw logits ``z``
    only by a per-row constant, which every softmax ignores: ``softmax(log p / T) = softmax(z / T)`` at every T
    when ``p = softmax(z)``. So probability-only rows (older files) are distilled at the run's temperature like
    logit rows, and at T=1 exactly as before (the target is ``p``).
    """
    out = np.full((len(df), 2), np.nan, dtype=np.float32)
    if "p_a" in df.columns and "p_b" in df.columns:
        probs = df[["p_a", "p_b"]].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            out[:] = np.log(np.clip(probs, PROB_FLOOR, 1.0))  # NaN stays NaN
    if all(c in df.columns for c in LOGIT_COLUMNS):
        logits = df[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float32)
        given = np.isfinite(logits).all(1)
        out[given] = logits[given]
    out[~np.isfinite(out).all(1)] = np.nan
    return out


def average_teachers(frames: list[pd.DataFrame], sources: list[str] | None = None) -> pd.DataFrame:
    """Rows labelled by several teachers (one frame each) merged into one row per id, logits averaged.

    Averaging in logit space (a geometric mean of the probabilities, renormalised) keeps a confident teacher's
    margin where a probability average would flatten it. Every frame must show a shared id in the same A/B
    orientation (the same response A); ``logit_a/logit_b`` and ``p_a/p_b`` of the result are the average and its
    softmax. Rows found in one frame only are kept as they are.
    """
    if len(frames) <= 1:
        return frames[0].copy() if frames else pd.DataFrame()
    sources = sources or [f"frame {i}" for i in range(len(frames))]
    tagged = [f.assign(_logit_a=(lg := teacher_logits(f))[:, 0], _logit_b=lg[:, 1]) for f in frames]
    first = tagged[0].drop_duplicates("id")
    for frame, source in zip(tagged[1:], sources[1:], strict=True):
        joined = frame.merge(first[["id", "response_a"]], on="id", suffixes=("", "_first"))
        flipped = joined["response_a"] != joined["response_a_first"]
        if flipped.any():
            row = joined[flipped].iloc[0]
            raise DataError(
                f"{source}: id {row['id']!r} has another response A than in {sources[0]}; the teachers must label "
                "the same rows in the same A/B orientation (pseudo-label one pool file with each teacher)"
            )
    stacked = pd.concat(tagged, ignore_index=True)
    mean = stacked.groupby("id", sort=False)[["_logit_a", "_logit_b"]].mean()
    out = stacked.drop_duplicates("id").drop(columns=["_logit_a", "_logit_b"]).set_index("id")
    out["logit_a"], out["logit_b"] = mean["_logit_a"], mean["_logit_b"]
    margin = (out["logit_a"] - out["logit_b"]).to_numpy(dtype=np.float64)
    out["p_a"] = 1.0 / (1.0 + np.exp(-margin))
    out["p_b"] = 1.0 - out["p_a"]
    return out.reset_index()


def swap_ab(df: pd.DataFrame) -> pd.DataFrame:
    """Exchange responses A and B: texts, model names, the winner and soft labels (probabilities and logits).

    The one place where the A/B permutation is defined; training augmentation, pseudo-labelling and
    test-time augmentation all call it.
    """
    out = df.copy()
    for a, b in (("response_a", "response_b"), ("model_a", "model_b"), ("p_a", "p_b"), LOGIT_COLUMNS):
        if a in out.columns and b in out.columns:
            out[a], out[b] = df[b].to_numpy(), df[a].to_numpy()
    if "winner" in out.columns:  # a tie (or an empty winner) stays as it is
        w = df["winner"].to_numpy(dtype=object)
        out["winner"] = np.where(w == "model_a", "model_b", np.where(w == "model_b", "model_a", w)).astype(object)
    return out


def swap_probs(probs: np.ndarray) -> np.ndarray:
    """Map probabilities predicted on swapped rows back to the original A/B order. Shape (N, 2)."""
    return probs[:, ::-1]
