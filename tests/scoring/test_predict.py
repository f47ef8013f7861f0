"""kaggle_utils.scoring.predict: probabilities in row order, priority order, the deadline, fp16 overflow."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kaggle_utils.inputs.batching import pad
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.predict import predict_proba, score_batch


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


# --- fp16 overflow: rows with non-finite logits are rescored alone in fp32 compute ---------------------------------

HOT = 150_000  # a token id that the test texts do not contain; its rows are made to overflow fp16
HOT_ROWS = [2, 5, 7]


def outlier_channel(model) -> None:
    """Qwen2: a massive activation in one channel, as real LLMs have: the MLP output of the hot token > 65,504.

    Only the hot token writes channel 0 (its embedding; attention's output row 0 is zeroed), and layer 0's MLP
    amplifies that channel: gate and up ~ 20 x 7.9 each, summed over 128 units by down_proj -> ~3e6, inf in fp16.
    """
    layer = model.model.layers[0]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 0
        emb[HOT, 0] = 1.0
        layer.self_attn.o_proj.weight[0] = 0
        layer.mlp.gate_proj.weight[:, 0] = 20
        layer.mlp.up_proj.weight[:, 0] = 20
        layer.mlp.down_proj.weight[0] = 1


def huge_embedding(model) -> None:
    """Gemma2: the embedding times sqrt(hidden) (8 here) is computed in the weights' dtype: 1e4 x 8 > 65,504."""
    with torch.no_grad():
        model.get_input_embeddings().weight[HOT] = 1e4


@pytest.fixture()
def hot_rows(rows) -> list[list[int]]:
    assert not any(HOT in r for r in rows)
    out = [list(r) for r in rows[:10]]
    for i in HOT_ROWS:
        out[i].insert(len(out[i]) // 2, HOT)
    return out


def overflowing(path, tokenizer, make):
    cfg = ModelConfig(model_path=path, load_in_4bit=False, device="cpu", dtype="fp16")
    model = load_classifier(cfg, tokenizer.pad_token_id)
    make(model)
    return model


def one_by_one(model, rows, pad_id) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.softmax(model(**pad([r], pad_id)).logits.float(), -1).numpy() for r in rows])


def state(model) -> dict:
    return {n: (p.dtype, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}


def assert_restored(before: dict, model) -> None:
    for n, p in model.named_parameters():
        dtype, ptr, value = before[n]
        assert p.dtype == dtype and p.data_ptr() == ptr and torch.equal(p.detach(), value), n


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_overflowing_rows_are_rescored_in_fp32(arch, qwen_path, gemma_path, tokenizer, hot_rows) -> None:
    pad_id = tokenizer.pad_token_id
    make = outlier_channel if arch == "qwen2" else huge_embedding
    model = overflowing(qwen_path if arch == "qwen2" else gemma_path, tokenizer, make)
    reference = one_by_one(copy.deepcopy(model).float(), hot_rows, pad_id)  # the same weights, fp32 arithmetic
    assert np.isfinite(reference).all()
    with torch.no_grad():
        fp16 = torch.softmax(model(**pad(hot_rows, pad_id)).logits.float(), -1).numpy()
    overflowed = np.flatnonzero(~np.isfinite(fp16).all(1))
    assert list(overflowed) == HOT_ROWS  # a genuine overflow, in fp16 only
    before = state(model)

    stats: dict = {}
    probs = score_batch(model, hot_rows, np.arange(len(hot_rows)), pad_id, "cpu", stats)

    assert stats == {"overflow_rows": 3, "overflow_rescored": 3}
    np.testing.assert_allclose(probs[HOT_ROWS], reference[HOT_ROWS], rtol=0, atol=1e-6)
    others = np.setdiff1d(np.arange(len(hot_rows)), HOT_ROWS)
    np.testing.assert_array_equal(probs[others], fp16[others])  # the fp16 batch's own numbers, untouched
    assert_restored(before, model)


def test_rows_that_overflow_in_fp32_too_stay_nan(qwen_path, tokenizer, hot_rows) -> None:
    def inf_embedding(model) -> None:
        with torch.no_grad():
            model.get_input_embeddings().weight[HOT] = float("inf")

    model = overflowing(qwen_path, tokenizer, inf_embedding)
    stats: dict = {}
    probs = score_batch(model, hot_rows, np.arange(len(hot_rows)), tokenizer.pad_token_id, "cpu", stats)
    assert stats == {"overflow_rows": 3}  # tried, none rescored: NaN for the next model or the fallback
    assert np.isnan(probs[HOT_ROWS]).all() and np.isfinite(np.delete(probs, HOT_ROWS, 0)).all()


def test_out_of_memory_in_the_safe_path_leaves_the_row_nan(qwen_path, tokenizer, hot_rows) -> None:
    model = overflowing(qwen_path, tokenizer, outlier_channel)
    before = state(model)

    def oom_in_fp32(module, args, output):
        if output.dtype == torch.float32:  # only the safe path's hidden states are fp32
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.model.layers[0].register_forward_hook(oom_in_fp32)
    stats: dict = {}
    probs = score_batch(model, hot_rows, np.arange(len(hot_rows)), tokenizer.pad_token_id, "cpu", stats)
    assert stats == {"overflow_rows": 3, "overflow_oom": 3}
    assert np.isnan(probs[HOT_ROWS]).all() and np.isfinite(np.delete(probs, HOT_ROWS, 0)).all()
    assert_restored(before, model)


def test_batch_splitting_and_the_safe_path_together(qwen_path, tokenizer, hot_rows) -> None:
    pad_id = tokenizer.pad_token_id
    model = overflowing(qwen_path, tokenizer, outlier_channel)
    reference = one_by_one(copy.deepcopy(model).float(), hot_rows, pad_id)

    def oom_above_4_rows(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.register_forward_pre_hook(oom_above_4_rows, with_kwargs=True)
    stats: dict = {}
    probs = score_batch(model, hot_rows, np.arange(len(hot_rows)), pad_id, "cpu", stats)
    # 10 rows -> 5 + 5 -> 2 + 3 + 2 + 3 (3 splits); the hot rows 2, 5, 7 land in three of the four parts
    assert stats == {"oom_splits": 3, "overflow_rows": 3, "overflow_rescored": 3}
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[HOT_ROWS], reference[HOT_ROWS], rtol=0, atol=1e-6)


def test_an_error_in_the_safe_path_warns_and_leaves_nan(qwen_path, tokenizer, hot_rows) -> None:
    model = overflowing(qwen_path, tokenizer, outlier_channel)
    before = state(model)

    def broken_in_fp32(module, args, output):
        if output.dtype == torch.float32:
            raise ValueError("an unexpected layer")

    model.model.layers[1].register_forward_hook(broken_in_fp32)
    stats: dict = {}
    with pytest.warns(RuntimeWarning, match="fp32 rescoring of 3 overflowing row.*3 left NaN.*an unexpected layer"):
        probs = score_batch(model, hot_rows, np.arange(len(hot_rows)), tokenizer.pad_token_id, "cpu", stats)
    assert stats == {"overflow_rows": 3, "overflow_errors": 3}
    assert np.isnan(probs[HOT_ROWS]).all()
    assert_restored(before, model)
