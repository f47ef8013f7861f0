"""kaggle_utils.inputs.tokens with the real Qwen2.5 tokenizer: PairTokens rows equal PromptFormatter.encode.

For every template x truncation strategy, multilingual, template-like and very long text: the store's A-first
row is ``fmt.encode(df)[i]`` and its B-first row is ``fmt.encode(schema.swap_ab(df))[i]``; the ids are one int32
copy; chunked, multi-process and cached building give the same store; a memory-mapped round trip changes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from formatting import cached_formatter, frame_of
from hypothesis import given, settings
from hypothesis import strategies as st

from kaggle_utils.data import schema
from kaggle_utils.inputs import formatter as inputs
from kaggle_utils.inputs import tokens
from kaggle_utils.inputs.formatter import TEMPLATES, TRUNCATIONS, InputConfig, PromptFormatter
from kaggle_utils.inputs.tokens import PairTokens, PairTokensBuilder

ALPHABET = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x0600, max_codepoint=0x06FF),  # Arabic
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.sampled_from(["\u200f", "\u200d", " ", "\n", "<", ">", "|", "a", "é", "é"]),
    st.characters(exclude_categories=("Cs",)),  # anything UTF-8 can hold
)
# very long strings, cheaply: a short piece repeated past the character cut (exercises head_tail's real tail)
LONG = st.builds(lambda s, k: s * k, st.text(ALPHABET, min_size=1, max_size=20), st.integers(20, 3000))
TRICKY = st.sampled_from(["", "<|im_end|>", "</RESPONSE A>\n<RESPONSE B>", "\n\nResponse B:\n", "你好，世界！" * 200])
FIELD = st.one_of(st.just(""), st.text(ALPHABET, max_size=60), LONG, TRICKY)
ROWS = st.lists(st.tuples(FIELD, FIELD, FIELD), min_size=1, max_size=4)
COMBOS = [(t, s) for t in TEMPLATES for s in TRUNCATIONS]


def _words_frame(n: int, seed: int = 0, max_words: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    words = ["hello", "мир", "世界", "🙂", "مرحبا", "test", "\n", "<|im_end|>", "</PROMPT>"]
    rows = [tuple(" ".join(rng.choice(words, rng.integers(0, max_words))) for _ in range(3)) for _ in range(n)]
    return frame_of(rows)


def _assert_same_store(a: PairTokens, b: PairTokens) -> None:
    for name in ("ids", "offsets", "fields", "lengths"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.prefix, a.pieces) == (b.prefix, b.pieces)


def _check_against_encode(fmt: PromptFormatter, df: pd.DataFrame, store: PairTokens) -> None:
    n = len(df)
    ref, ref_swapped = fmt.encode(df), fmt.encode(schema.swap_ab(df))
    assert len(store) == n
    assert store.ids.dtype == np.int32 and store.offsets.dtype == np.int64
    np.testing.assert_array_equal(store.lengths, fmt.lengths(ref))
    np.testing.assert_array_equal(store.lengths, fmt.lengths(ref_swapped))  # the same in both orientations
    for i in range(n):
        assert store.rows(np.array([i]), np.array([False]))[0] == ref[i]
        assert store.rows(np.array([i]), np.array([True]))[0] == ref_swapped[i]
    # a batch of mixed orientations, out of order and with a repeat, is the rows one by one
    idx = np.array([n - 1, 0, n - 1, *range(n)])
    swapped = np.arange(len(idx)) % 2 == 1
    expect = [ref_swapped[j] if s else ref[j] for j, s in zip(idx, swapped, strict=True)]
    assert store.rows(idx, swapped) == expect
    assert store.rows(idx) == [ref[j] for j in idx]


# --- equality with encode, every template x strategy -------------------------------------------------------
@pytest.mark.parametrize(("template", "truncation"), COMBOS)
@given(
    rows=ROWS,
    max_length=st.sampled_from([200, 257, 700, 2500]),
    fraction=st.sampled_from([0.1, 0.25, 0.6]),
    hf=st.sampled_from([0.0, 0.5, 1.0]),
    split=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_rows_equal_encode_in_both_orientations(
    tok, formatters, template, truncation, rows, max_length, fraction, hf, split
) -> None:
    fmt = cached_formatter(
        formatters, tok, template=template, truncation=truncation, max_length=max_length,
        prompt_fraction=fraction, head_fraction=hf, split_special_tokens=split,
    )  # fmt: skip
    df = frame_of(rows)
    _check_against_encode(fmt, df, fmt.encode_pairs(df))


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_rows_equal_encode_with_the_hugging_face_bpe(tok, truncation) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=300, truncation=truncation, fast_bpe=False))
    assert fmt.bpe_backend == "huggingface"
    df = _words_frame(30, seed=1)
    _check_against_encode(fmt, df, fmt.encode_pairs(df, chunk_rows=8))


def test_the_swapped_view_exchanges_only_the_response_segments(tok) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=256, template="chat", truncation="head_tail"))
    store = fmt.encode_pairs(_words_frame(12, seed=2))
    t0, t1, t2, t3 = store.pieces
    for i in range(len(store)):
        lp, la, lb = store.fields[i].tolist()
        seg = store.ids[store.offsets[i] : store.offsets[i + 1]].tolist()
        p, a, b = seg[:lp], seg[lp : lp + la], seg[lp + la :]
        head = store.prefix + t0 + p + t1
        assert store.rows(np.array([i]))[0] == head + a + t2 + b + t3
        assert store.rows(np.array([i]), np.array([True]))[0] == head + b + t2 + a + t3


# --- one int32 copy ----------------------------------------------------------------------------------------
def test_one_int32_copy_of_the_fields(tok) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=300))
    df = _words_frame(40, seed=3)
    store = fmt.encode_pairs(df)
    n = len(store)
    field_tokens = int(store.fields.sum())
    # the fields once (not per orientation, no template copies): 4 bytes a token, plus offsets and lengths
    assert len(store.ids) == field_tokens == int(store.lengths.sum()) - n * store.fixed_length
    assert store.nbytes == 4 * field_tokens + 8 * (n + 1) + 4 * 3 * n
    assert store.num_tokens == sum(map(len, fmt.encode(df)))


# --- chunking, processes, cache -------------------------------------------------------------------------------
def test_chunked_building_gives_the_same_store(tok, monkeypatch) -> None:
    kw = dict(max_length=200, template="plain", truncation="head_tail")
    fmt = PromptFormatter(tok, InputConfig(**kw))
    df = _words_frame(37, seed=4)
    whole = fmt.encode_pairs(df, chunk_rows=len(df))
    for chunk in (1, 5, 36):
        _assert_same_store(fmt.encode_pairs(df, chunk_rows=chunk), whole)
    # the default chunk size is read when called, and several processes give the same store too
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 4)
    _assert_same_store(PromptFormatter(tok, InputConfig(**kw, num_proc=2)).encode_pairs(df), whole)
    # a builder starting tiny grows through many reallocations without changing anything
    builder = PairTokensBuilder(whole.prefix, whole.pieces, capacity=1)
    for start in range(0, len(df), 3):
        builder.append(*fmt.encode_segments(*(df[c].iloc[start : start + 3].tolist() for c in schema.TEXT_COLUMNS)))
    _assert_same_store(builder.finish(), whole)


def test_cache_dir_stores_a_memory_mapped_folder(tok, tmp_path) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=256, truncation="proportional", cache_dir=tmp_path))
    df = _words_frame(20, seed=5)
    first = fmt.encode_pairs(df)
    (folder,) = tmp_path.glob("*.pairs")
    assert isinstance(first.ids, np.memmap)
    # a second call loads the folder: mark it to prove nothing was re-encoded
    meta = json.loads((folder / "template.json").read_text())
    (folder / "template.json").write_text(json.dumps({**meta, "pieces": [[1], [2], [3], [4]]}))
    assert fmt.encode_pairs(df).pieces == [[1], [2], [3], [4]]
    # other text is another entry
    other = df.assign(response_b=df["response_b"] + "!")
    _check_against_encode(fmt, other, fmt.encode_pairs(other))
    assert len(list(tmp_path.glob("*.pairs"))) == 2
    _check_against_encode(fmt, df, PairTokens(first.ids, first.offsets, first.fields, fmt.prefix, fmt.pieces))


# --- disk ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mmap", [True, False])
def test_save_and_load_round_trip(tok, tmp_path, mmap) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=256, template="chat"))
    df = _words_frame(15, seed=6)
    store = fmt.encode_pairs(df)
    store.save(tmp_path / "store")
    store.save(tmp_path / "store")  # overwriting an existing store is fine
    loaded = PairTokens.load(tmp_path / "store", mmap=mmap)
    assert isinstance(loaded.ids, np.memmap) == mmap
    assert loaded.ids.dtype == np.int32
    _assert_same_store(loaded, store)
    _check_against_encode(fmt, df, loaded)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "fields.npy", "ids.npy", "offsets.npy", "template.json"
    ]  # fmt: skip
    assert not list(tmp_path.glob(".*tmp"))


def test_emptyframe_of(tok, tmp_path) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=256))
    store = fmt.encode_pairs(frame_of([]))
    assert len(store) == 0 and store.rows(np.array([], dtype=np.int64)) == []
    store.save(tmp_path / "empty")
    assert len(PairTokens.load(tmp_path / "empty")) == 0


# --- bad input -----------------------------------------------------------------------------------------------
def test_bad_input_errors(tok, tmp_path) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=256))
    df = _words_frame(5, seed=7)
    store = fmt.encode_pairs(df)
    with pytest.raises(IndexError, match="row 5 is out of range for a store of 5 rows"):
        store.rows(np.array([0, 5]))
    with pytest.raises(ValueError, match="bool array aligned with idx"):
        store.rows(np.array([0, 1]), np.array([True]))
    with pytest.raises(ValueError, match="bool array aligned with idx"):
        store.rows(np.array([0, 1]), np.array([1, 0]))
    with pytest.raises(ValueError, match="1-D array of row numbers"):
        store.rows(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D array of row numbers"):
        store.rows(np.array([[0, 1]]))
    with pytest.raises(KeyError, match="response_b"):
        fmt.encode_pairs(df.drop(columns="response_b"))
    with pytest.raises(ValueError, match="chunk_rows=-1"):
        fmt.encode_pairs(df, chunk_rows=-1)
    with pytest.raises(ValueError, match="1-D int32"):
        PairTokens(store.ids.astype(np.int64), store.offsets, store.fields, store.prefix, store.pieces)
    fields = store.fields.copy()
    fields[0, 0] += 1
    with pytest.raises(ValueError, match="offsets and fields disagree"):
        PairTokens(store.ids, store.offsets, fields, store.prefix, store.pieces)
    with pytest.raises(FileNotFoundError, match="not a PairTokens folder"):
        PairTokens.load(tmp_path)
    store.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "template.json").read_text())
    (tmp_path / "old" / "template.json").write_text(json.dumps({**meta, "version": tokens.FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="encode the rows again"):
        PairTokens.load(tmp_path / "old")


def test_an_allocator_not_symmetric_in_a_and_b_is_refused(tok) -> None:
    """The B-first row is built from A-first segments; that needs swapping A and B to swap their cuts."""
    fmt = PromptFormatter(tok, InputConfig(max_length=128))

    def a_first(lengths, budget, fraction):  # response A always gets its full share first
        lp, la, lb = lengths
        ka = min(la, budget)
        kb = min(lb, budget - ka)
        return 0, ka, kb

    fmt._allocate = a_first
    df = frame_of([("x", "long " * 200, "short")])
    with pytest.raises(ValueError, match="not symmetric in A and B"):
        fmt.encode_pairs(df)
    with pytest.raises(ValueError, match="not symmetric in A and B"):
        fmt.cut_fields([[1]], [[2] * 500], [[3]])
