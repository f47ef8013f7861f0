"""Model inputs: one template, one truncation rule, token ids that never exceed the max length.

A row becomes::

    [special prefix] <PROMPT>{prompt}</PROMPT>\\n<RESPONSE A>{a}</RESPONSE A>\\n<RESPONSE B>{b}</RESPONSE B>
    \\nWhich response is better?

Template pieces and fields are tokenised separately and joined as ids, so truncation never decodes text
(no special token can be decoded into the middle of a field) and never cuts a template marker.
The last token is a fixed question: decoder classifiers pool the last real token, and that token then
sees both responses in full context.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kaggle_utils.data import TEXT_COLUMNS

# Template text around the three fields; edit here and nowhere else.
TAGGED_PIECES = (
    "<PROMPT>",
    "</PROMPT>\n<RESPONSE A>",
    "</RESPONSE A>\n<RESPONSE B>",
    "</RESPONSE B>\nWhich response is better?",
)
# Byte-level BPE tokens rarely span more than this many characters; text beyond
# max_length * this is never shown, so it is cut before tokenising (30K-token prompts exist).
MAX_CHARS_PER_TOKEN = 16


@dataclass
class InputConfig:
    """How a row becomes token ids."""

    # total tokens per row, special tokens and template included (the seed trained at 2500)
    max_length: int = 2500
    # share of the field budget the prompt may take before the responses get theirs
    prompt_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.max_length < 64:
            raise ValueError(f"max_length={self.max_length} is too small to hold the template")
        if not 0 < self.prompt_fraction < 1:
            raise ValueError(f"prompt_fraction={self.prompt_fraction} must be in (0, 1)")


def allocate(lengths: tuple[int, int, int], budget: int, prompt_fraction: float) -> tuple[int, int, int]:
    """Token counts kept for (prompt, a, b) within ``budget``.

    The prompt is capped at ``prompt_fraction`` of the budget; the responses share the rest equally, and a
    short field's unused share goes to the other fields. A and B are treated symmetrically, so swapping
    them swaps their allocations (an odd spare token is left unused rather than given to one side).
    """
    lp, la, lb = lengths
    keep_p = min(lp, int(budget * prompt_fraction))
    rest = budget - keep_p
    half = rest // 2
    if la <= half or lb <= half:
        short = min(la, lb)
        long_keep = min(max(la, lb), rest - short)
        keep_a, keep_b = (short, long_keep) if la <= lb else (long_keep, short)
    else:
        keep_a = keep_b = half
    # hand back what the responses did not use to the prompt
    keep_p = min(lp, budget - keep_a - keep_b)
    return keep_p, keep_a, keep_b


class PromptFormatter:
    """Turns rows of (prompt, response_a, response_b) into token ids of at most ``max_length``."""

    def __init__(self, tokenizer, cfg: InputConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.pieces = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in TAGGED_PIECES]
        self.fixed_length = len(self.prefix) + sum(len(p) for p in self.pieces)
        self.budget = cfg.max_length - self.fixed_length

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        limit = self.cfg.max_length * MAX_CHARS_PER_TOKEN
        return self.tokenizer([t[:limit] for t in texts], add_special_tokens=False)["input_ids"]

    def encode(self, df: pd.DataFrame) -> list[list[int]]:
        """Token ids per row, in row order; every list is at most ``max_length`` long."""
        fields = [self._tokenize(df[c].tolist()) for c in TEXT_COLUMNS]
        rows = []
        for p, a, b in zip(*fields, strict=False):
            keep = allocate((len(p), len(a), len(b)), self.budget, self.cfg.prompt_fraction)
            ids = list(self.prefix)
            for piece, field, n in zip(self.pieces, (p, a, b), keep, strict=False):
                ids += piece
                ids += field[:n]
            ids += self.pieces[-1]
            rows.append(ids)
        return rows

    @staticmethod
    def lengths(rows: list[list[int]]) -> np.ndarray:
        return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
