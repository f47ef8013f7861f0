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


@torch.no_grad()
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

    Batches are formed by length under ``batch_tokens`` (rows x longest). When ``order`` is given, batches
    are taken in that priority instead (e.g. the most uncertain rows first). Before each batch the
    ``deadline`` is asked whether the batch's projected time (from ``rate``, measured as we go) still fits;
    when it does not, scoring stops and the remaining rows stay NaN.
    """
    n = len(rows)
    probs = np.full((n, 2), np.nan, dtype=np.float32)
    scored = np.zeros(n, dtype=bool)
    if n == 0:
        return Scores(probs, scored, 0.0, False)
    deadline = deadline or Deadline(None)
    rate = rate or RateMeter()
    device = model_device(model)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
    if order is None:
        batches = token_budget_batches(lengths, batch_tokens, max_rows)
    else:
        # keep the priority order, but batch neighbours of similar length: sort within windows
        batches = []
        window = max(1, 8 * max_rows)
        for start in range(0, n, window):
            chunk = np.asarray(order[start : start + window])
            batches += [chunk[b] for b in token_budget_batches(lengths[chunk], batch_tokens, max_rows)]
    t0 = time.monotonic()
    stopped = False
    bar = tqdm(total=n, desc=desc, unit="row", leave=False)
    for idx in batches:
        padded_tokens = len(idx) * int(lengths[idx].max())
        if not deadline.allows(rate.estimate(padded_tokens)):
            stopped = True
            break
        tb = time.monotonic()
        enc = pad([rows[i] for i in idx], pad_id)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, 2)
        p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        if not np.isfinite(p).all():
            # fp16 overflow on long inputs (Gemma2) shows up as inf/NaN logits: leave those rows unscored
            p[~np.isfinite(p).all(1)] = np.nan
        probs[idx] = p
        scored[idx] = np.isfinite(p).all(1)
        rate.add(padded_tokens, time.monotonic() - tb)
        bar.update(len(idx))
    bar.close()
    return Scores(probs, scored, time.monotonic() - t0, stopped)
