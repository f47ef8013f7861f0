"""kaggle_utils.inputs.cache: a second encode with the same key loads from disk; any change of key misses."""

from __future__ import annotations

import pandas as pd
import pytest

from kaggle_utils.inputs import cache as tokenize_cache
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter


def _frame(n: int = 30, salt: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "prompt": [f"question {i}{salt} 你好" for i in range(n)],
            "response_a": ["answer a " * (i * 7) for i in range(n)],
            "response_b": [f"réponse b {i} 🙂" * 3 for i in range(n)],
        }
    )


def test_second_call_loads_from_disk(tok, tmp_path, monkeypatch) -> None:
    cfg = InputConfig(max_length=128, cache_dir=tmp_path / "cache")
    df = _frame()
    first = PromptFormatter(tok, cfg).encode(df)
    entries = list((tmp_path / "cache").glob("*.parquet"))
    assert len(entries) == 1
    assert not list((tmp_path / "cache").glob(".*tmp")), "a temporary file was left behind"
    assert first == PromptFormatter(tok, InputConfig(max_length=128)).encode(df)  # the cache changes nothing

    def refuse(self, frame):
        raise AssertionError("tokenised again although the cache holds the entry")

    monkeypatch.setattr(PromptFormatter, "_encode_uncached", refuse)
    second = PromptFormatter(tok, cfg).encode(df)
    assert second == first
    assert all(type(t) is int for row in second for t in row)
    key = tokenize_cache.load_key(entries[0])
    assert key["template"] == "tagged" and key["max_length"] == 128 and key["truncation"] == "right"


@pytest.mark.parametrize(
    "change",
    [
        {"template": "plain"},
        {"template": "chat", "max_length": 256},
        {"truncation": "head_tail"},
        {"truncation": "proportional"},
        {"max_length": 129},
        {"prompt_fraction": 0.3},
        {"split_special_tokens": True},
    ],
)
def test_settings_change_the_key(tok, tmp_path, change) -> None:
    base = PromptFormatter(tok, InputConfig(max_length=128))
    other = PromptFormatter(tok, InputConfig(**{"max_length": 128, **change}))
    df = _frame(5)
    assert tokenize_cache.entry_path(tmp_path, base.cache_key(df)) != tokenize_cache.entry_path(
        tmp_path, other.cache_key(df)
    )


def test_rows_and_tokenizer_change_the_key(tok, tmp_path) -> None:
    fmt = PromptFormatter(tok, InputConfig(max_length=128))
    path = tokenize_cache.entry_path(tmp_path, fmt.cache_key(_frame(5)))
    assert path == tokenize_cache.entry_path(tmp_path, fmt.cache_key(_frame(5)))  # deterministic
    assert path != tokenize_cache.entry_path(tmp_path, fmt.cache_key(_frame(5, salt="!")))
    assert path != tokenize_cache.entry_path(tmp_path, fmt.cache_key(_frame(6)))
    assert path != tokenize_cache.entry_path(tmp_path, fmt.cache_key(_frame(5).iloc[::-1]))  # row order matters
    # a tokenizer with one more token is a different tokenizer
    from kaggle_utils.models.demo import build_qwen_tokenizer

    other = build_qwen_tokenizer()
    assert tokenize_cache.tokenizer_fingerprint(other) == tokenize_cache.tokenizer_fingerprint(tok)
    other.add_tokens(["<NEW_TOKEN>"])
    assert tokenize_cache.tokenizer_fingerprint(other) != tokenize_cache.tokenizer_fingerprint(tok)


def test_save_load_round_trip(tmp_path) -> None:
    rows = [[1, 2, 3], [], [151645], list(range(2500))]
    path = tokenize_cache.save_rows(tmp_path / "x" / "e.parquet", rows, {"k": 1})
    assert tokenize_cache.load_rows(path) == rows
    assert tokenize_cache.load_key(path) == {"k": 1}
    empty = tokenize_cache.save_rows(tmp_path / "empty.parquet", [], {"k": 2})
    assert tokenize_cache.load_rows(empty) == []
