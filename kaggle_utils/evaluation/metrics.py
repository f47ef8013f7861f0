"""Evaluation: accuracy (the competition metric), log loss, and the checks a pairwise judge needs.

A prediction that is NaN (a row the model could not score, or a dead fp16 model) counts as *wrong* for accuracy
and as the worst clipped log loss, and :func:`evaluate` reports how many there were: ``argmax`` of a NaN row is
0, which once made a model that output only NaN report "accuracy 0.535" (the share of rows won by A).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# metrics a run can select its best checkpoint by, and whether lower is better
SELECTABLE = {"log_loss": True, "accuracy": False, "swap_consistency": True}


def _finite(probs: np.ndarray) -> np.ndarray:
    """(N,) bool: rows whose two probabilities are both finite."""
    return np.isfinite(probs).all(1)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label; NaN rows are wrong. ``probs`` (N, 2), ``labels`` (N,)."""
    if len(labels) == 0:
        return float("nan")
    return float(((probs.argmax(1) == labels) & _finite(probs)).mean())


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log probability of the label, clipped at ``eps``; a NaN row costs ``-log(eps)``."""
    p = probs[np.arange(len(labels)), labels]
    p = np.where(np.isfinite(p), p, 0.0)
    return float(-np.log(np.clip(p, eps, 1.0)).mean())


def swap_consistency(probs: np.ndarray, probs_swapped: np.ndarray) -> float:
    """Mean ``|p(A wins | a, b) - p(B wins | b, a)|`` over rows scored both ways (0: order does not matter).

    ``probs_swapped`` (N, 2) are the model's probabilities on the A/B-swapped rows, in the swapped order.
    """
    gap = np.abs(probs[:, 0] - probs_swapped[:, 1])
    gap = gap[np.isfinite(gap)]
    return float(gap.mean()) if len(gap) else float("nan")


def position_bias(probs: np.ndarray) -> float:
    """Share of scored rows predicted "A wins" (0.5 with balanced labels and no bias for the first position)."""
    ok = _finite(probs)
    return float((probs[ok].argmax(1) == 0).mean()) if ok.any() else float("nan")


def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss (NaN rows wrong), with the row count and how many rows were NaN."""
    return {
        "accuracy": accuracy(probs, labels),
        "log_loss": log_loss(probs, labels),
        "rows": int(len(labels)),
        "nan_rows": int((~_finite(probs)).sum()),
    }


def evaluate_pairs(probs: np.ndarray, probs_swapped: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """:func:`evaluate` plus swap consistency and position bias, from the rows scored in both orientations."""
    return evaluate(probs, labels) | {
        "swap_consistency": swap_consistency(probs, probs_swapped),
        "position_bias": position_bias(probs),
    }


def by_language(probs: np.ndarray, labels: np.ndarray, languages: pd.Series, top: int = 8) -> pd.DataFrame:
    """Rows, accuracy and log loss per language: the ``top`` most frequent, the rest together as "other".

    Returns one row per language (most frequent first, "other" last), columns language, rows, accuracy, log_loss.
    """
    lang = languages.fillna("missing").astype(str).to_numpy()
    kept = pd.Series(lang).value_counts().index[:top]
    group = np.where(np.isin(lang, kept), lang, "other")
    order = [*kept, *(["other"] if (group == "other").any() else [])]
    out = []
    for name in order:
        m = group == name
        out.append(
            {
                "language": name,
                "rows": int(m.sum()),
                "accuracy": accuracy(probs[m], labels[m]),
                "log_loss": log_loss(probs[m], labels[m]),
            }
        )
    return pd.DataFrame(out, columns=["language", "rows", "accuracy", "log_loss"])
