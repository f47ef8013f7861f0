"""Shared by the inputs tests: a formatter per setting (built once per module), and rows as a competition frame."""

from __future__ import annotations

import pandas as pd

from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter


def cached_formatter(cache: dict, tok, **kw) -> PromptFormatter:
    """The formatter for these InputConfig settings, built once per ``cache`` (a module-scoped dict fixture)."""
    key = tuple(sorted(kw.items()))
    if key not in cache:
        cache[key] = PromptFormatter(tok, InputConfig(**kw))
    return cache[key]


def frame_of(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """(prompt, response_a, response_b) triples as a training frame (A wins every row)."""
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(len(rows))],
            "prompt": [r[0] for r in rows],
            "response_a": [r[1] for r in rows],
            "response_b": [r[2] for r in rows],
            "winner": "model_a",
            "model_a": "m1",
            "model_b": "m2",
        }
    )
