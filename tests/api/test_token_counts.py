"""kaggle_utils.api.tokens: exact token counts where tiktoken loads, else chars / 4 with its error measured."""

from __future__ import annotations

from kaggle_utils.api.tokens import TokenCounter, approximation_error, approximation_table, reference_encoding

BASE = "gpt-4o-mini-2024-07-18"


def test_token_counts_are_exact_where_tiktoken_loads_else_chars_over_four():
    counter = TokenCounter(BASE)
    if counter.exact:  # tiktoken's files are cached on this machine
        assert counter.method.startswith("tiktoken:")
    else:  # no download here: the stated approximation, and why
        assert counter.method == "approx:chars/4" and counter.unavailable
        assert counter.count("x" * 9) == 3
        # two messages of 8 characters: 2 + 3 framing each, 3 for the reply's priming
        assert counter.messages([{"role": "user", "content": "y" * 8}] * 2) == 13


class HalfCharEncoding:
    """A tokenizer with one token per two characters: chars/4 is then exactly half of it."""

    def encode(self, text: str, disallowed_special=()):
        return [0] * (len(text) // 2)


def test_the_approximation_error_is_measured_against_a_tokenizer():
    err = approximation_error(["ab" * 8, "cd" * 40], HalfCharEncoding())
    assert err == {"n": 2, "mean_abs_pct": 50.0, "total_pct": -50.0}
    table = approximation_table(["ab" * 8, "cd" * 40, "e" * 8], ["en", "en", "ru"], HalfCharEncoding())
    assert table["language"].tolist() == ["all", "en", "ru"] and table["n"].tolist() == [3, 2, 1]
    real = approximation_error(["Hello, world! This is a sentence in English.", "Привет, мир! Это предложение."])
    if reference_encoding() is not None:  # the offline Qwen2.5 tokenizer
        assert real["n"] == 2 and 0 <= real["mean_abs_pct"] < 200
