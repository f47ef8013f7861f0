"""The side systems (mDeBERTa, the fine-tuned judge, the few-shot judge) beside the students, on the same rows.

Every system is scored on the students' held-out fold, so one table compares them row for row:

* :func:`heldout_rows`: the held-out fold of the prepared training file (the rows the students validated on);
* :func:`judge_on_heldout` / :func:`fewshot_on_heldout`: a judge or few-shot config whose validation rows are exactly
  that fold and whose training rows (or shot pool) are the other folds. The two API stages draw their validation rows
  at random (``judge.split_rows``, ``fewshot.split_eval``); rather than a second copy of their split, the rows are
  laid out so that their own split function picks the held-out ones (:func:`arrange`), and the result is checked by
  calling it again;
* :class:`Verdicts`: one system's decision per row, from a ``val_predictions.parquet`` (probabilities:
  :func:`from_predictions`) or from a judge's answers (letters, both A/B orders: :func:`from_answers`);
* :func:`compare`: accuracy, log loss (where probabilities exist), invalid rate and API cost per system, on the rows
  every system scored.

The API stages (and with them the ``openai`` package, which Kaggle's image lacks) are imported only by the functions
that need them: comparing local models' predictions works without it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from kaggle_utils.data import schema
from kaggle_utils.evaluation import metrics

if TYPE_CHECKING:
    from kaggle_utils.api.fewshot import FewShotConfig
    from kaggle_utils.api.judge import JudgeConfig


def heldout_rows(train_file: Path | str, val_fold: int) -> pd.DataFrame:
    """The rows of fold ``val_fold`` of a prepared training file (with its ``fold`` column)."""
    df = schema.load(train_file, "train")
    if "fold" not in df.columns:
        raise schema.DataError(f"{train_file}: no 'fold' column; run the prepare stage first")
    rows = df[df["fold"] == val_fold].reset_index(drop=True)
    if rows.empty:
        raise schema.DataError(f"{train_file}: no row has fold {val_fold}; its folds are {sorted(df['fold'].unique())}")
    return rows


Pick = Callable[[pd.DataFrame], pd.DataFrame]


def arrange(df: pd.DataFrame, heldout: pd.Series, pick: Pick) -> pd.DataFrame:
    """``df`` reordered so that ``pick`` (a stage's own split: frame -> its validation rows) picks exactly the rows
    where ``heldout`` is true, in their order; ValueError if it does not (the split changed its rule)."""
    heldout = np.asarray(heldout, dtype=bool)
    n = len(df)
    # where the split takes its validation rows from, read off a frame of positions (unique texts: no repeats to drop)
    probe = pd.DataFrame({"_pos": np.arange(n), **{c: [f"{c} {i}" for i in range(n)] for c in schema.TEXT_COLUMNS}})
    slots = pick(probe)["_pos"].to_numpy()
    if len(slots) != heldout.sum():
        raise ValueError(f"the split picks {len(slots)} rows, but {heldout.sum()} are held out: set its row count")
    order = np.empty(n, dtype=np.int64)
    order[slots] = np.flatnonzero(heldout)
    order[np.setdiff1d(np.arange(n), slots)] = np.flatnonzero(~heldout)
    out = df.iloc[order].reset_index(drop=True)
    got = pick(out)["id"].astype(str).tolist()
    if got != df.loc[heldout, "id"].astype(str).tolist():
        raise ValueError("the stage's split did not pick the held-out rows from the arranged file")
    return out


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def judge_on_heldout(cfg: JudgeConfig, train_file: Path | str, val_fold: int) -> JudgeConfig:
    """``cfg`` validating on fold ``val_fold`` and fine-tuning on every other row (``<work_dir>/input.parquet``)."""
    from kaggle_utils.api.judge import split_rows

    df = schema.load(train_file, "train")
    held = df["fold"] == val_fold
    n_valid, n_train = int(held.sum()), int((~held).sum())
    arranged = arrange(df, held, lambda f: split_rows(f, n_train, n_valid, cfg.seed)[1])
    path = _write(arranged, cfg.work_dir / "input.parquet")
    return dataclasses.replace(cfg, input_file=path, n_valid=n_valid, n_train=n_train)


def fewshot_on_heldout(cfg: FewShotConfig, train_file: Path | str, val_fold: int) -> FewShotConfig:
    """``cfg`` evaluating fold ``val_fold``, its shots from the other folds (``<out_dir>/input.parquet``)."""
    from kaggle_utils.api.fewshot import split_eval

    df = schema.load(train_file, "train")
    held = df["fold"] == val_fold
    n_eval = int(held.sum())
    arranged = arrange(df, held, lambda f: split_eval(f, n_eval, cfg.seed)[0])
    path = _write(arranged, cfg.out_dir / "input.parquet")
    return dataclasses.replace(cfg, input_file=path, n_eval=n_eval)


@dataclass
class Verdicts:
    """One system's decisions on validation rows."""

    name: str
    # "local model" (probabilities), "API judge" or "few-shot judge" (letters)
    kind: str
    # one row per validation row: row_id (str), p_a (P(A wins); NaN: the system gives no probability),
    # pick ("A" | "B" | None: no decision, counted wrong)
    rows: pd.DataFrame
    # answers asked (judges: rows x orders) and how many were invalid or failed; models: rows and NaN rows
    answers: int
    invalid: int
    # estimated API spend in USD (local models: 0, their compute is not priced here; NaN: a model had no price)
    cost_usd: float = 0.0


def from_predictions(name: str, path: Path | str) -> Verdicts:
    """A model's ``val_predictions.parquet`` (id, p_a, p_b, winner), as the train and multiple-choice stages write."""
    df = pd.read_parquet(path)
    p_a, p_b = df["p_a"].to_numpy(float), df["p_b"].to_numpy(float)
    finite = np.isfinite(p_a) & np.isfinite(p_b)
    pick = np.where(~finite, None, np.where(p_a >= p_b, "A", "B"))
    rows = pd.DataFrame({"row_id": df["id"].astype(str), "p_a": p_a, "pick": pick})
    return Verdicts(name, "local model", rows, answers=len(df), invalid=int((~finite).sum()))


def from_answers(name: str, answers: pd.DataFrame, prices: dict[str, list[float]], kind: str = "API judge") -> Verdicts:
    """A judge's answers (``judge.answers_frame``: one model, or one k of the few-shot run): per row, the majority of
    its valid answers over both orders; a tie or no valid answer is no decision."""
    from kaggle_utils.api.client import cost_usd
    from kaggle_utils.api.judge import row_votes, with_fine_tuned_prices

    if answers["model"].nunique() > 1:
        raise ValueError(f"{name}: answers of several models {sorted(answers['model'].unique())}: pass one model's")
    votes = row_votes(answers).set_index("row_id")["mean"]
    row_ids = answers["row_id"].astype(str).drop_duplicates()
    share = votes.reindex(row_ids).to_numpy(float)
    pick = np.where(np.isnan(share) | (share == 0.5), None, np.where(share > 0.5, "A", "B"))
    rows = pd.DataFrame({"row_id": row_ids.to_numpy(), "p_a": np.nan, "pick": pick})
    prices = with_fine_tuned_prices(prices, answers["model"].unique())
    costs = [
        cost_usd(m, g["input_tokens"].sum(), g["output_tokens"].sum(), prices) for m, g in answers.groupby("model")
    ]
    cost = math.nan if any(c is None for c in costs) else float(sum(costs))
    invalid = int((answers["status"] != "ok").sum())
    return Verdicts(name, kind, rows, answers=len(answers), invalid=invalid, cost_usd=cost)


def compare(systems: Sequence[Verdicts], truth: pd.DataFrame) -> pd.DataFrame:
    """One row per system on the rows of ``truth`` (id, winner) that every system scored.

    ``accuracy``: a row without a decision (NaN probabilities, invalid or tied answers) is wrong, never dropped;
    ``log_loss``: where the system gives probabilities (NaN for judges, which answer with a letter);
    ``invalid_rate``: invalid or failed answers (judges) or NaN rows (models) over all it was asked;
    ``cost_usd``: estimated API spend (0 for local models).
    """
    if not systems:
        raise ValueError("no system to compare")
    truth = truth.assign(id=truth["id"].astype(str))
    common = set(truth["id"])
    for s in systems:
        common &= set(s.rows["row_id"])
    if not common:
        raise ValueError(f"no row is scored by every system ({', '.join(s.name for s in systems)}) and in truth")
    truth = truth[truth["id"].isin(common)].reset_index(drop=True)
    labels = schema.labels(truth)  # (N,) 0: A wins
    out = []
    for s in systems:
        rows = s.rows.set_index("row_id").loc[truth["id"]]
        if rows["p_a"].notna().any():
            probs = np.stack([rows["p_a"].to_numpy(float), 1 - rows["p_a"].to_numpy(float)], axis=1)  # (N, 2)
            accuracy, log_loss = metrics.accuracy(probs, labels), metrics.log_loss(probs, labels)
        else:
            accuracy, log_loss = float(np.mean(rows["pick"].to_numpy() == np.array(["A", "B"])[labels])), math.nan
        out.append(
            {
                "system": s.name,
                "kind": s.kind,
                "rows": len(truth),
                "accuracy": accuracy,
                "log_loss": log_loss,
                "undecided": int(rows["pick"].isna().sum()),
                "invalid_rate": s.invalid / s.answers if s.answers else math.nan,
                "cost_usd": s.cost_usd,
            }
        )
    return pd.DataFrame(out)
