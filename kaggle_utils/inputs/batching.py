"""Batches under a token budget, and padding.

Rows are sorted by length and cut into batches whose padded size (rows x longest row) stays within a
token budget, so short rows travel many to a batch and long rows few: the main speed lever for both
training and inference at 2,500 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD_SIDES = ("right", "left")


def token_budget_batches(
    lengths: np.ndarray, max_tokens: int, max_rows: int = 64, shuffle: bool = False, seed: int = 0
) -> list[np.ndarray]:
    """Index arrays of batches whose padded size ``len(batch) * max(length)`` is at most ``max_tokens``.

    Rows are length-sorted (longest first, so the first batch shows the peak memory at once). A single row
    longer than ``max_tokens`` still forms a batch of one. With ``shuffle`` the batch order is shuffled
    (deterministic for ``seed``); rows inside a batch keep their length order.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        n = max(1, min(max_rows, max_tokens // max(int(longest), 1)))
        batches.append(order[start : start + n])
        start += n
    if shuffle:
        rng = np.random.default_rng(seed)
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def packed_batches(
    lengths: np.ndarray, max_tokens: int, max_rows: int = 64, shuffle: bool = False, seed: int = 0
) -> list[np.ndarray]:
    """Index arrays of batches whose rows' tokens sum to at most ``max_tokens``: packs, no padding.

    Each pack opens with the longest row left and is topped up with the longest rows that still fit (at most
    ``max_rows`` rows), so packs end nearly full; rows of equal length are taken in index order. A row longer than
    ``max_tokens`` forms a pack of one. The first pack holds the longest row; with ``shuffle`` the pack order is
    shuffled (deterministic for ``seed``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    # rows by length: waiting[n] = the rows of n tokens not yet packed (a stack, lowest index on top)
    order = np.argsort(lengths, kind="stable")[::-1]
    waiting: dict[int, list[int]] = {}
    for i in order:
        waiting.setdefault(int(lengths[i]), []).append(int(i))
    left = np.zeros(int(lengths.max(initial=0)) + 1, dtype=np.int64)  # (longest + 1,) rows waiting per length
    np.add.at(left, lengths, 1)
    packs: list[np.ndarray] = []
    while left.any():
        longest = int(np.flatnonzero(left)[-1])
        pack, free = [], max_tokens
        while len(pack) < max_rows:
            fitting = np.flatnonzero(left[: max(free, 0) + 1]) if pack else [longest]
            if len(fitting) == 0:
                break
            n = int(fitting[-1])
            pack.append(waiting[n].pop())
            left[n] -= 1
            free -= n
        packs.append(np.array(pack, dtype=np.int64))
    if shuffle:
        rng = np.random.default_rng(seed)
        packs = [packs[i] for i in rng.permutation(len(packs))]
    return packs


def fixed_size_batches(lengths: np.ndarray, batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Index arrays of ``batch_size`` rows each (the last may be shorter), longest rows first when ``sort``.

    The baseline that token-budget batching is measured against (the public notebooks' fixed batch size).
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Fraction of the padded tokens that are padding."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / padded if padded else 0.0


def pad(rows: list[list[int]], pad_id: int, side: str = "right", multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of shape (B, T), T = longest row (rounded up to ``multiple_of``).

    The sequence classifiers of transformers >= 4.48 pool the rightmost non-pad token, so either side
    works as long as ``config.pad_token_id`` equals ``pad_id``; right padding keeps positions identical
    to unpadded training rows.
    """
    if side not in PAD_SIDES:
        raise ValueError(f"side={side!r}; expected one of {PAD_SIDES}")
    width = max(len(r) for r in rows)
    width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class Collator:
    """Rows of token ids (and optional labels) to one padded batch, padded only to the batch's longest row.

    Decoder ``*ForSequenceClassification`` models in transformers 5 pool the rightmost token that is not
    ``config.pad_token_id``; with ``pad_id`` equal to that id, right and left padding give the same logits
    (right keeps positions identical to unpadded rows, so it is the default). ``multiple_of=8`` rounds the
    width up for tensor-core friendly shapes at the cost of a little padding.
    """

    # the tokenizer's pad id, which must also be the model's ``config.pad_token_id``
    pad_id: int
    # "right" or "left"
    side: str = "right"
    # round the padded width up to a multiple of this
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if self.side not in PAD_SIDES:
            raise ValueError(f"side={self.side!r}; expected one of {PAD_SIDES}")
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of={self.multiple_of} must be at least 1")

    def __call__(self, rows: list[list[int]], labels=None) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` (B, T) and, when given, ``labels`` (B,) or soft labels (B, C)."""
        if not rows:
            raise ValueError("cannot collate an empty batch")
        batch = pad(rows, self.pad_id, self.side, self.multiple_of)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels))
            if labels.shape[0] != len(rows):
                raise ValueError(f"{len(rows)} rows but {labels.shape[0]} labels")
            batch["labels"] = labels
        return batch
