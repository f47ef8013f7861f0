"""The files the inference stage writes in its ``out_dir``.

* ``submission.csv``: ``id,winner``, one row per test row in test order; rewritten atomically after every pass, so a
  kill leaves the previous complete one, never half a file.
* ``predictions.parquet``: id, p_a, p_b, the source of each row (primary / blend / fallback, ``+tta``) and winner.
* ``report.json``: the run's report (:mod:`kaggle_utils.inference.report`).
* ``parts/budget-<role>-<key>.json``: a measured token budget, read back by a rerun so it forms the same batches and
  resumes its parts (the parts themselves are :mod:`kaggle_utils.scoring.pool`'s; ``infer_config.json`` is
  :func:`kaggle_utils.config.cli.save_config`'s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kaggle_utils.data import schema
from kaggle_utils.store import write_atomic


def write_submission(pred: pd.DataFrame, test: pd.DataFrame, path: Path) -> Path:
    """``id,winner`` with exactly one row per test row, ids as given, in test order; written atomically."""
    sub = pred[["id", "winner"]]
    if len(sub) != len(test) or not sub["id"].equals(test["id"]):
        raise RuntimeError("predictions do not cover every test row exactly once, in order; not writing a submission")
    if not sub["winner"].isin(schema.WINNERS).all():
        raise RuntimeError("a prediction is not model_a/model_b; not writing a submission")
    # a kill mid-write leaves the previous complete submission, never a truncated one
    return write_atomic(path, lambda tmp: sub.to_csv(tmp, index=False))


def write_predictions(pred: pd.DataFrame, test: pd.DataFrame, out_dir: Path) -> None:
    """``submission.csv`` and ``predictions.parquet`` in ``out_dir``, each written atomically."""
    write_submission(pred, test, out_dir / "submission.csv")
    write_atomic(out_dir / "predictions.parquet", lambda tmp: pred.to_parquet(tmp, index=False))


def write_report(path: Path, report: dict) -> None:
    """``report.json``: the report as indented JSON (what JSON cannot hold, as its ``str``)."""
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def budget_file(out_dir: Path, role: str, key: str) -> Path:
    """Where ``role``'s measured token budget is kept, ``key``: the model, settings, devices and longest row."""
    return out_dir / "parts" / f"budget-{role}-{key}.json"


def read_budget(path: Path) -> int | None:
    """The padded tokens per batch a previous run measured and saved at ``path``; None when there is none."""
    return json.loads(path.read_text())["tokens"] if path.is_file() else None


def save_budget(path: Path, tokens: int, describe: str) -> None:
    """A measured budget (tokens and how it was found), for a rerun to read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tokens": tokens, "describe": describe}) + "\n")
