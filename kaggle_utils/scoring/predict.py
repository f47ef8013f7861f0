"""Scoring rows with a classifier: token-budget batches, a deadline, predictions in row order."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.models.loading import model_device
from kaggle_utils.scoring.budget import Deadline, RateMeter


@dataclass
class Scores:
    """Probabilities per row, shape (N, 2), NaN where the deadline stopped scoring; ``scored`` (N,) bool."""

    probs: np.ndarray
    scored: np.ndarray
    seconds: float
    stopped_by_deadline: bool


def plan_batches(
    lengths: np.ndarray, batch_tokens: int, max_rows: int, order: np.ndarray | None = None
) -> list[np.ndarray]:
    """Row indices per batch: by length under ``batch_tokens`` (rows x longest), or in ``order``'s priority.

    With ``order`` (e.g. the least certain rows first) the priority is kept, but neighbours of similar length
    are batched together: rows are sorted by length within windows of ``8 * max_rows``.
    """
    if order is None:
        return token_budget_batches(lengths, batch_tokens, max_rows)
    batches = []
    window = max(1, 8 * max_rows)
    for start in range(0, len(order), window):
        chunk = np.asarray(order[start : start + window])
        batches += [chunk[b] for b in token_budget_batches(lengths[chunk], batch_tokens, max_rows)]
    return batches


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


@torch.no_grad()
def score_batch(model, rows: list[list[int]], idx: np.ndarray, pad_id: int, device, stats: dict | None = None):
    """Probabilities for the rows ``idx``, shape (len(idx), 2); NaN for rows that cannot be scored.

    An out-of-memory batch is split in halves and each half retried (a long row next to others can fit alone);
    a single row that still does not fit is left NaN, for the next model or the fallback. Non-finite logits
    (fp16 overflow on long inputs, Gemma2) are NaN too. ``stats`` counts ``oom_splits`` and ``oom_rows``.
    """
    try:
        enc = pad([rows[i] for i in idx], pad_id)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, 2)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stats is not None:
            key = "oom_rows" if len(idx) == 1 else "oom_splits"
            stats[key] = stats.get(key, 0) + 1
        if len(idx) == 1:
            return np.full((1, 2), np.nan, dtype=np.float32)
        half = len(idx) // 2
        first = score_batch(model, rows, idx[:half], pad_id, device, stats)
        return np.concatenate([first, score_batch(model, rows, idx[half:], pad_id, device, stats)])
    p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    p[~np.isfinite(p).all(1)] = np.nan
    return p


def predict_proba(
    model,
    rows: list[list[int]],
    pad_id: int,
    batch_tokens: int,
    max_rows: int = 64,
    deadline: Deadline | None = None,
    rate: RateMeter | None = None,
    desc: str = "scoring",
    order: np.ndarray | None = None,
) -> Scores:
    """Softmax probabilities of ``model`` for each token-id row, returned in the input order.

    Batches are formed by length under ``batch_tokens`` (rows x longest), or in ``order``'s priority
    (:func:`plan_batches`). Before each batch the ``deadline`` is asked whether the batch's projected time
    (from ``rate``, measured as we go) still fits; when it does not, scoring stops and the remaining rows stay
    NaN. Out-of-memory batches are split and retried (:func:`score_batch`).
    """
    n = len(rows)
    probs = np.full((n, 2), np.nan, dtype=np.float32)
    if n == 0:
        return Scores(probs, np.zeros(0, dtype=bool), 0.0, False)
    deadline = deadline or Deadline(None)
    rate = rate or RateMeter()
    device = model_device(model)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
    t0 = time.monotonic()
    stopped = False
    bar = tqdm(total=n, desc=desc, unit="row", leave=False)
    for idx in plan_batches(lengths, batch_tokens, max_rows, order):
        padded_tokens = len(idx) * int(lengths[idx].max())
        if not deadline.allows(rate.estimate(padded_tokens)):
            stopped = True
            break
        tb = time.monotonic()
        probs[idx] = score_batch(model, rows, idx, pad_id, device)
        rate.add(padded_tokens, time.monotonic() - tb)
        bar.update(len(idx))
    bar.close()
    return Scores(probs, np.isfinite(probs).all(1), time.monotonic() - t0, stopped)
