"""kaggle_utils.inputs.batching: token-budget batches, padding, and pooling that does not care about padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kaggle_utils.inputs.batching import packed_batches, pad, padding_waste, token_budget_batches
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier

LENGTHS = st.lists(st.integers(1, 3000), min_size=0, max_size=300).map(lambda x: np.array(x, dtype=np.int64))


@given(
    lengths=LENGTHS,
    max_tokens=st.integers(1, 8192),
    max_rows=st.integers(1, 64),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=200, deadline=None)
def test_batches_cover_every_row_once_within_budget(lengths, max_tokens, max_rows, shuffle, seed) -> None:
    batches = token_budget_batches(lengths, max_tokens, max_rows, shuffle=shuffle, seed=seed)
    seen = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= max_rows
        padded = len(b) * int(lengths[b].max())
        # over budget only as a single row longer than the budget
        assert padded <= max_tokens or (len(b) == 1 and lengths[b[0]] > max_tokens)
        # rows inside a batch keep their length order (longest first)
        assert (np.diff(lengths[b]) <= 0).all()


@given(lengths=LENGTHS, max_tokens=st.integers(1, 8192), max_rows=st.integers(1, 64), seed=st.integers(0, 1000))
@settings(max_examples=200, deadline=None)
def test_packs_cover_every_row_once_within_budget(lengths, max_tokens, max_rows, seed) -> None:
    packs = packed_batches(lengths, max_tokens, max_rows, shuffle=True, seed=seed)
    seen = np.concatenate(packs) if packs else np.array([], dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for p in packs:
        assert 1 <= len(p) <= max_rows
        # the rows' own tokens: over budget only as a single row longer than the budget
        assert lengths[p].sum() <= max_tokens or (len(p) == 1 and lengths[p[0]] > max_tokens)


def test_packs_top_long_rows_up_with_short_ones() -> None:
    lengths = np.array([5, 3, 3, 9, 1])
    assert [p.tolist() for p in packed_batches(lengths, max_tokens=10, max_rows=3)] == [[3, 4], [0, 1], [2]]
    # five full packs where padded batches need seven
    lengths = np.array([900, 100, 800, 200, 700, 300, 600, 400, 500, 500])
    assert [int(lengths[p].sum()) for p in packed_batches(lengths, 1000, 16)] == [1000] * 5
    assert len(token_budget_batches(lengths, 1000, 16)) == 7


def test_batches_are_length_sorted_longest_first() -> None:
    lengths = np.array([5, 100, 7, 50, 100, 3])
    batches = token_budget_batches(lengths, max_tokens=200, max_rows=64)
    assert [b.tolist() for b in batches] == [[1, 4], [3, 2, 0, 5]]


def test_over_long_row_is_a_batch_of_one() -> None:
    lengths = np.array([10, 5000, 10])
    batches = token_budget_batches(lengths, max_tokens=1000)
    assert batches[0].tolist() == [1]
    assert sorted(batches[1].tolist()) == [0, 2]


def test_shuffle_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=400)
    plain = token_budget_batches(lengths, 1000, 16)
    a = token_budget_batches(lengths, 1000, 16, shuffle=True, seed=7)
    b = token_budget_batches(lengths, 1000, 16, shuffle=True, seed=7)
    c = token_budget_batches(lengths, 1000, 16, shuffle=True, seed=8)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
    # shuffling reorders whole batches and never changes what is in them
    as_sets = sorted(tuple(x.tolist()) for x in plain)
    assert sorted(tuple(x.tolist()) for x in a) == as_sets == sorted(tuple(x.tolist()) for x in c)
    assert [x.tolist() for x in a] != [x.tolist() for x in plain]


def test_sorted_batches_waste_less_padding_than_fixed_batches() -> None:
    rng = np.random.default_rng(1)
    # the competition's long-tailed length profile
    lengths = np.clip(rng.lognormal(np.log(900), 0.6, size=2000), 30, 2500).astype(np.int64)
    fixed = [np.arange(i, min(i + 8, len(lengths))) for i in range(0, len(lengths), 8)]
    sorted_batches = token_budget_batches(lengths, max_tokens=8 * 2500, max_rows=64)
    waste_fixed, waste_sorted = padding_waste(lengths, fixed), padding_waste(lengths, sorted_batches)
    assert waste_sorted < 0.05 < 0.2 < waste_fixed
    assert waste_sorted < waste_fixed / 5


def test_padding_waste_hand_computed() -> None:
    lengths = np.array([4, 2, 3, 3])
    assert padding_waste(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(1 - 12 / 14)
    assert padding_waste(lengths, [np.array([2, 3])]) == 0.0
    assert padding_waste(lengths, []) == 0.0


def test_pad_right_and_left() -> None:
    rows = [[5, 6, 7], [8], [9, 10]]
    right = pad(rows, pad_id=0, side="right")
    left = pad(rows, pad_id=0, side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    for enc in (right, left):
        assert enc["input_ids"].dtype == torch.long and enc["attention_mask"].dtype == torch.long
        assert enc["attention_mask"].sum(1).tolist() == [3, 1, 2]


@pytest.mark.parametrize("model_name", ["qwen2-tiny", "gemma2-tiny"])
def test_logits_do_not_depend_on_padding(models, tokenizer, competition_test, model_name: str) -> None:
    """The classifier pools the last real token: right, left or no padding give the same logits."""
    model = load_classifier(ModelConfig(model_path=models[model_name], load_in_4bit=False), tokenizer.pad_token_id)
    rows = PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(competition_test.iloc[:4])
    assert len({len(r) for r in rows}) > 1, "rows of different lengths are needed to exercise padding"
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([model(**pad([r], pad_id)).logits for r in rows])
        right = model(**pad(rows, pad_id, side="right")).logits
        left = model(**pad(rows, pad_id, side="left")).logits
    assert alone.shape == (4, 2)
    torch.testing.assert_close(right, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=1e-4)
    # and the logits are not trivially equal across rows (the check would be vacuous otherwise)
    assert (alone[0] - alone[1]).abs().max() > 1e-3
