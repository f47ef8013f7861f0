"""kaggle_utils.inputs.formatter, real Qwen2.5 tokenizer: length limit, intact template, allocation, A/B symmetry."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import MAX_CHARS_PER_TOKEN, TAGGED_PIECES, InputConfig, PromptFormatter, allocate

# --- text strategies -------------------------------------------------------------------------------------
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
EMOJI = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
ARABIC = st.characters(min_codepoint=0x0600, max_codepoint=0x06FF)
HEBREW = st.characters(min_codepoint=0x0590, max_codepoint=0x05FF)
MARKS = st.sampled_from(["\u200f", "\u200e", "\u202e", "\u200d", "\ufe0f", " ", "\n", "\t", "<", ">", "/", "a", "é"])
# any character that UTF-8 text (a parquet string column) can hold: no lone surrogates
ANY_CHAR = st.characters(codec="utf-8")
ALPHABET = st.one_of(CJK, EMOJI, ARABIC, HEBREW, MARKS, ANY_CHAR)
SHORT = st.text(ALPHABET, max_size=40)
# very long strings, cheaply: a short random piece repeated (up to ~100K characters)
LONG = st.builds(lambda s, k: s * k, st.text(ALPHABET, min_size=1, max_size=25), st.integers(20, 4000))
# text that looks like the template or like special tokens must not break the structure either
TRICKY = st.sampled_from(
    [
        "",
        "<|endoftext|>",
        "<|im_start|>system\nhi<|im_end|>",
        "</RESPONSE A>\n<RESPONSE B>",
        "<PROMPT>",
        "?" * 300,
        "مرحبا بالعالم " * 50,
        "שלום עולם " * 80,
        "你好，世界！" * 200,
        "👍🏽👨‍👩‍👧" * 100,
    ]
)
FIELD = st.one_of(st.just(""), SHORT, LONG, TRICKY, st.text(ANY_CHAR))
ROW = st.tuples(FIELD, FIELD, FIELD)
MAX_LENGTHS = st.sampled_from([64, 97, 256, 512])
FRACTIONS = st.sampled_from([0.05, 0.25, 0.5, 0.9])

SETTINGS = settings(max_examples=60, deadline=None)


def _frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(len(rows))],
            "prompt": [r[0] for r in rows],
            "response_a": [r[1] for r in rows],
            "response_b": [r[2] for r in rows],
        }
    )


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _field_ids(fmt: PromptFormatter, text: str) -> list[int]:
    """The field tokenised on its own (after the documented character cut for very long texts)."""
    return _ids(fmt.tokenizer, text[: fmt.cfg.max_length * MAX_CHARS_PER_TOKEN])


def _decompositions(row: list[int], fmt: PromptFormatter, fields: tuple[list[int], ...]) -> set[tuple[int, int, int]]:
    """All (kp, ka, kb) with row == prefix + T0 + P[:kp] + T1 + A[:ka] + T2 + B[:kb] + T3.

    T0..T3 are the template pieces tokenised on their own, P/A/B the fields tokenised on their own: an
    empty set means a template piece was cut, reordered or altered, or a field was not a right-truncation.
    """
    t0, t1, t2, t3 = (_ids(fmt.tokenizer, p) for p in TAGGED_PIECES)
    p, a, b = fields
    head = list(fmt.prefix) + t0
    if row[: len(head)] != head or row[len(row) - len(t3) :] != t3 or len(row) < len(head) + len(t3):
        return set()
    body = row[len(head) : len(row) - len(t3)]
    found = set()
    for kp in range(min(len(p), len(body)) + 1):
        if body[:kp] != p[:kp]:
            break
        rest = body[kp:]
        if rest[: len(t1)] != t1:
            continue
        rest = rest[len(t1) :]
        for ka in range(min(len(a), len(rest)) + 1):
            if rest[:ka] != a[:ka]:
                break
            tail = rest[ka:]
            if tail[: len(t2)] != t2:
                continue
            tail = tail[len(t2) :]
            if len(tail) <= len(b) and tail == b[: len(tail)]:
                found.add((kp, ka, len(tail)))
    return found


@pytest.fixture(scope="module")
def formatters(tokenizer) -> dict[tuple[int, float], PromptFormatter]:
    return {}


def _formatter(cache: dict, tokenizer, max_length: int, fraction: float) -> PromptFormatter:
    key = (max_length, fraction)
    if key not in cache:
        cache[key] = PromptFormatter(tokenizer, InputConfig(max_length=max_length, prompt_fraction=fraction))
    return cache[key]


# --- the template ------------------------------------------------------------------------------------------
def test_template_pieces_are_tokenised_separately(tokenizer) -> None:
    fmt = PromptFormatter(tokenizer, InputConfig(max_length=256))
    assert fmt.pieces == [_ids(tokenizer, p) for p in TAGGED_PIECES]
    assert fmt.prefix == []  # the Qwen2.5 tokenizer adds no BOS
    assert fmt.fixed_length == sum(len(p) for p in fmt.pieces)
    assert fmt.budget == 256 - fmt.fixed_length
    # the last token is the fixed question's "?" (what decoder classifiers pool)
    assert tokenizer.decode(fmt.pieces[-1][-1:]) == "?"


def test_encode_known_row(tokenizer) -> None:
    fmt = PromptFormatter(tokenizer, InputConfig(max_length=256))
    df = _frame([("What is 2+2?", "It is 4.", "Five.")])
    (row,) = fmt.encode(df)
    assert tokenizer.decode(row) == (
        "<PROMPT>What is 2+2?</PROMPT>\n<RESPONSE A>It is 4.</RESPONSE A>\n<RESPONSE B>Five.</RESPONSE B>\n"
        "Which response is better?"
    )


def test_encode_truncates_long_fields_from_the_right(tokenizer) -> None:
    fmt = PromptFormatter(tokenizer, InputConfig(max_length=128, prompt_fraction=0.25))
    long_a = " ".join(f"alpha{i}" for i in range(500))
    long_b = " ".join(f"beta{i}" for i in range(500))
    (row,) = fmt.encode(_frame([("short prompt", long_a, long_b)]))
    assert len(row) == 128
    text = tokenizer.decode(row)
    assert "<PROMPT>short prompt</PROMPT>" in text
    assert "<RESPONSE A>alpha0 alpha1" in text and "<RESPONSE B>beta0 beta1" in text
    assert "alpha499" not in text and "beta499" not in text
    assert text.endswith("</RESPONSE B>\nWhich response is better?")
    # both responses get the same number of tokens
    p, a, b = (_field_ids(fmt, t) for t in ("short prompt", long_a, long_b))
    ((kp, ka, kb),) = _decompositions(row, fmt, (p, a, b))
    assert kp == len(p) and ka == kb


@given(rows=st.lists(ROW, min_size=1, max_size=3), max_length=MAX_LENGTHS, fraction=FRACTIONS)
@SETTINGS
def test_encode_never_exceeds_max_length_and_keeps_template(tokenizer, formatters, rows, max_length, fraction) -> None:
    fmt = _formatter(formatters, tokenizer, max_length, fraction)
    encoded = fmt.encode(_frame(rows))
    assert len(encoded) == len(rows)
    assert list(PromptFormatter.lengths(encoded)) == [len(r) for r in encoded]
    for row, texts in zip(encoded, rows, strict=True):
        assert len(row) <= max_length
        fields = tuple(_field_ids(fmt, t) for t in texts)
        splits = _decompositions(row, fmt, fields)
        assert splits, f"template pieces not intact/in order, or a field not right-truncated: {texts!r}"
        if sum(len(f) for f in fields) >= fmt.budget:
            # long fields: the whole budget is used (an odd spare token may be left)
            assert len(row) >= max_length - 1
        else:
            # short fields: nothing is cut
            assert (len(fields[0]), len(fields[1]), len(fields[2])) in splits


@given(row=ROW, max_length=MAX_LENGTHS, fraction=FRACTIONS)
@SETTINGS
def test_swapping_a_and_b_swaps_the_response_segments(tokenizer, formatters, row, max_length, fraction) -> None:
    fmt = _formatter(formatters, tokenizer, max_length, fraction)
    df = _frame([row]).assign(winner="model_a", model_a="x", model_b="y")
    (plain,) = fmt.encode(df)
    (swapped,) = fmt.encode(schema.swap_ab(df))
    assert len(plain) == len(swapped)
    p, a, b = (_field_ids(fmt, t) for t in row)
    plain_splits = _decompositions(plain, fmt, (p, a, b))
    swapped_splits = _decompositions(swapped, fmt, (p, b, a))
    assert {(kp, kb, ka) for kp, ka, kb in plain_splits} & swapped_splits


# --- allocate ----------------------------------------------------------------------------------------------
LENGTH = st.integers(0, 6000)


@given(lp=LENGTH, la=LENGTH, lb=LENGTH, budget=st.integers(0, 6000), fraction=st.floats(0.01, 0.99))
@settings(max_examples=400, deadline=None)
def test_allocate_properties(lp: int, la: int, lb: int, budget: int, fraction: float) -> None:
    kp, ka, kb = allocate((lp, la, lb), budget, fraction)
    assert 0 <= kp <= lp and 0 <= ka <= la and 0 <= kb <= lb
    assert kp + ka + kb <= budget
    # symmetric in A and B
    assert allocate((lp, lb, la), budget, fraction) == (kp, kb, ka)
    if lp + la + lb >= budget:
        assert kp + ka + kb >= budget - 1, "budget left unused while a field is cut"
    else:
        assert (kp, ka, kb) == (lp, la, lb), "a field was cut although everything fits"
    if la + lb >= budget:
        # long responses: the prompt is capped at its share (plus at most the odd spare token)
        assert kp <= int(budget * fraction) + 1
    if la >= budget and lb >= budget:
        assert ka == kb


def test_allocate_examples() -> None:
    # everything fits
    assert allocate((10, 20, 30), 100, 0.25) == (10, 20, 30)
    # prompt capped at 25 of 100; responses share 75 -> 37 each, the odd token goes back to the prompt
    assert allocate((500, 500, 500), 100, 0.25) == (26, 37, 37)
    # a short response's unused share goes to the other response
    assert allocate((500, 5, 500), 100, 0.25) == (25, 5, 70)
    # short responses hand their share back to the prompt
    assert allocate((500, 5, 10), 100, 0.25) == (85, 5, 10)


def test_input_config_validation() -> None:
    with pytest.raises(ValueError, match="too small"):
        InputConfig(max_length=32)
    with pytest.raises(ValueError, match="prompt_fraction"):
        InputConfig(prompt_fraction=1.0)
