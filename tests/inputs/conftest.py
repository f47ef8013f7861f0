"""Fixtures of the inputs tests: the real Qwen2.5 tokenizer built offline once, and a formatter cache per module."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok():
    from kaggle_utils.models.demo import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def formatters() -> dict:
    """Filled by ``formatting.cached_formatter``: one PromptFormatter per setting within a test module."""
    return {}
