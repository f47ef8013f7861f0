"""kaggle_utils.scoring.metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kaggle_utils.scoring.metrics import accuracy, evaluate, log_loss

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
    assert out == {"accuracy": 0.5, "log_loss": pytest.approx(log_loss(PROBS, LABELS)), "rows": 4}
    assert isinstance(out["accuracy"], float) and isinstance(out["rows"], int)
