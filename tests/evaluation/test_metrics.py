"""kaggle_utils.evaluation.metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.evaluation.metrics import (
    accuracy,
    by_language,
    evaluate,
    evaluate_pairs,
    log_loss,
    position_bias,
    swap_consistency,
)

PROBS = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
LABELS = np.array([0, 1, 1, 0])


def test_accuracy() -> None:
    assert accuracy(PROBS, LABELS) == 0.5
    assert accuracy(PROBS, np.array([0, 1, 0, 1])) == 1.0
    assert accuracy(PROBS, np.array([1, 0, 1, 0])) == 0.0


def test_log_loss() -> None:
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.3) + math.log(0.2)) / 4
    assert log_loss(PROBS, LABELS) == pytest.approx(expected)
    assert log_loss(np.full((3, 2), 0.5), np.array([0, 1, 0])) == pytest.approx(math.log(2))


def test_log_loss_clips_zero_probability() -> None:
    probs = np.array([[1.0, 0.0]])
    assert log_loss(probs, np.array([1])) == pytest.approx(-math.log(1e-7))
    assert log_loss(probs, np.array([0])) == pytest.approx(0.0)


def test_evaluate() -> None:
    out = evaluate(PROBS, LABELS)
    # issue 10 added nan_rows
    assert out == {"accuracy": 0.5, "log_loss": pytest.approx(log_loss(PROBS, LABELS)), "rows": 4, "nan_rows": 0}
    assert isinstance(out["accuracy"], float) and isinstance(out["rows"], int)


def test_nan_predictions_count_as_wrong() -> None:
    """A dead model (all NaN) once reported the share of A wins as its accuracy: argmax of NaN is 0."""
    dead = np.full((4, 2), np.nan)
    assert accuracy(dead, np.array([0, 0, 0, 1])) == 0.0
    out = evaluate(dead, np.array([0, 0, 0, 1]))
    assert out["nan_rows"] == 4 and out["accuracy"] == 0.0
    assert out["log_loss"] == pytest.approx(-math.log(1e-7))
    partly = PROBS.copy()
    partly[0] = np.nan  # the one right row becomes NaN: wrong, at the clipped worst log loss
    out = evaluate(partly, np.array([0, 1, 0, 1]))
    assert out["accuracy"] == 0.75 and out["nan_rows"] == 1
    expected = -(math.log(1e-7) + math.log(0.6) + math.log(0.7) + math.log(0.8)) / 4
    assert out["log_loss"] == pytest.approx(expected)


def test_swap_consistency_and_position_bias() -> None:
    # the model's probabilities on the swapped rows, in the swapped order: column 1 is p(original A wins)
    swapped = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [np.nan, np.nan]])
    # |0.9 - 0.8|, |0.4 - 0.4|, |0.7 - 0.7|; the NaN row is left out
    assert swap_consistency(PROBS, swapped) == pytest.approx(0.1 / 3)
    assert swap_consistency(PROBS, PROBS[:, ::-1]) == 0.0
    assert position_bias(PROBS) == 0.5  # A predicted on rows 0 and 2
    assert position_bias(np.vstack([PROBS, [[np.nan, np.nan]]])) == 0.5  # NaN rows are not predictions
    out = evaluate_pairs(PROBS, swapped, LABELS)
    assert out["swap_consistency"] == pytest.approx(0.1 / 3) and out["position_bias"] == 0.5
    assert out["accuracy"] == 0.5 and out["rows"] == 4


def test_by_language_top_and_other() -> None:
    probs = np.array([[0.9, 0.1]] * 6)
    labels = np.array([0, 0, 1, 0, 1, 1])
    langs = pd.Series(["English", "English", "English", "Russian", "Russian", None])
    table = by_language(probs, labels, langs, top=1)
    assert table["language"].tolist() == ["English", "other"]
    assert table["rows"].tolist() == [3, 3]
    np.testing.assert_allclose(table["accuracy"], [2 / 3, 1 / 3])
    full = by_language(probs, labels, langs, top=8)
    assert full["language"].tolist() == ["English", "Russian", "missing"]
    assert full["rows"].sum() == 6
