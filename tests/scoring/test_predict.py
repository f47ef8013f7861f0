"""kaggle_utils.scoring.predict: probabilities in row order, priority order and the deadline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_utils.inputs.batching import pad
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.predict import predict_proba


@pytest.fixture(scope="module")
def model(qwen_path, tokenizer):
    return load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=False), tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def rows(tokenizer, competition_test) -> list[list[int]]:
    return PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(competition_test.iloc[:40])


class SteppingClock:
    """Returns the given times in turn (then the last one forever)."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def test_probabilities_in_input_order(model, rows, tokenizer) -> None:
    pad_id = tokenizer.pad_token_id
    scores = predict_proba(model, rows, pad_id, batch_tokens=1024, max_rows=8)
    assert scores.probs.shape == (40, 2) and scores.scored.all() and not scores.stopped_by_deadline
    with torch.no_grad():
        one_by_one = np.concatenate([torch.softmax(model(**pad([r], pad_id)).logits, -1).numpy() for r in rows[:10]])
    np.testing.assert_allclose(scores.probs[:10], one_by_one, atol=1e-5)
    np.testing.assert_allclose(scores.probs.sum(1), 1.0, atol=1e-6)
    # the same rows in priority order give the same probabilities
    order = np.random.default_rng(0).permutation(40)
    again = predict_proba(model, rows, pad_id, batch_tokens=1024, max_rows=8, order=order)
    np.testing.assert_allclose(again.probs, scores.probs, atol=1e-5)


def test_no_rows(model, tokenizer) -> None:
    scores = predict_proba(model, [], tokenizer.pad_token_id, batch_tokens=1024)
    assert scores.probs.shape == (0, 2) and scores.scored.shape == (0,) and not scores.stopped_by_deadline


def test_deadline_stops_before_the_next_batch(model, rows, tokenizer) -> None:
    # the clock reads 0 before the first batch, then 100 s: past the 10 s deadline
    deadline = Deadline(10, start=0.0, clock=SteppingClock(0.0, 100.0))
    order = np.arange(40)[::-1].copy()  # priority: the last rows first
    scores = predict_proba(
        model, rows, tokenizer.pad_token_id, batch_tokens=1024, max_rows=2, deadline=deadline, order=order
    )
    assert scores.stopped_by_deadline
    scored = np.flatnonzero(scores.scored)
    assert 1 <= len(scored) <= 2  # exactly one batch
    # taken from the first priority window (8 x max_rows rows)
    assert set(scored) <= set(order[:16])
    assert np.isnan(scores.probs[~scores.scored]).all()
    assert np.isfinite(scores.probs[scores.scored]).all()


def test_exhausted_deadline_scores_nothing(model, rows, tokenizer) -> None:
    deadline = Deadline(60, start=0.0, clock=lambda: 3600.0)
    scores = predict_proba(model, rows, tokenizer.pad_token_id, batch_tokens=1024, deadline=deadline)
    assert scores.stopped_by_deadline and not scores.scored.any() and np.isnan(scores.probs).all()
