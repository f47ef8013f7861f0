"""Scoring rows with a classifier: token-budget batches, a deadline, predictions in row order."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.models.loading import model_device
from kaggle_utils.models.precision import fp32_compute
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


def _count(stats: dict | None, key: str, n: int = 1) -> None:
    if stats is not None and n:
        stats[key] = stats.get(key, 0) + n


@torch.no_grad()
def score_batch(model, rows: list[list[int]], idx: np.ndarray, pad_id: int, device, stats: dict | None = None):
    """Probabilities for the rows ``idx``, shape (len(idx), 2); NaN for rows that cannot be scored.

    An out-of-memory batch is split in halves and each half retried (a long row next to others can fit alone);
    a single row that still does not fit is left NaN, for the next model or the fallback. Rows whose logits are
    non-finite (fp16 overflow on long inputs; Gemma2 is known for it) are rescored one at a time in fp32 compute
    (:func:`logits_in_fp32`); only rows still non-finite, or out of memory there, stay NaN. ``stats`` counts
    ``oom_splits``, ``oom_rows`` and the ``overflow_*`` counters of :func:`logits_in_fp32`.
    """
    logits = torch.from_numpy(score_logits(model, rows, idx, pad_id, device, stats))  # (B, 2) float32
    p = torch.softmax(logits, dim=-1).numpy()
    p[~np.isfinite(p).all(1)] = np.nan
    return p


@torch.no_grad()
def logits_in_fp32(model, rows: list[list[int]], pad_id: int, device, stats: dict | None = None) -> np.ndarray:
    """Logits (len(rows), 2) of rows whose fp16 logits were non-finite, each row alone in fp32 compute.

    The model is switched to fp32 arithmetic in place (:func:`~kaggle_utils.models.precision.fp32_compute`: no
    reload, no second copy of the weights) and put back afterwards. A row alone in fp32 needs about twice the
    activation memory of the same row in fp16; when it does not fit it stays NaN. A model that already computes
    in fp32 is not run again (same arithmetic, same result). The safe path must never cost more than the NaN it
    replaces: any other error in it is warned about and leaves the rows NaN, the fp16 path carries on.

    ``stats`` counts ``overflow_rows`` (rows sent here), ``overflow_rescored`` (finite now),
    ``overflow_oom`` (out of memory in fp32) and ``overflow_errors`` (rows lost to another error); the rows
    left NaN are ``overflow_rows - overflow_rescored``.
    """
    out = np.full((len(rows), 2), np.nan, dtype=np.float32)
    _count(stats, "overflow_rows", len(rows))
    finished = 0  # rows whose fp32 forward ran or ran out of memory
    try:
        with fp32_compute(model) as switched:
            # a model already in fp32 would repeat the same arithmetic and the same non-finite logits
            todo = rows if switched.changed else []
            for j, row in enumerate(todo):
                try:
                    enc = pad([row], pad_id)
                    out[j] = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu().numpy()[0]
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not _is_oom(err):
                        raise
                    _count(stats, "overflow_oom")
                finished += 1
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # fp32 activations are twice the fp16 ones: give them back at once
    except Exception as err:  # the safe path never stops the fp16 path (see the docstring)
        if _is_oom(err):  # switching to fp32 itself (the small fp32 copies) did not fit
            _count(stats, "overflow_oom", len(rows) - finished)
        else:
            warnings.warn(
                f"fp32 rescoring of {len(rows)} overflowing row(s) failed, {len(rows) - finished} left NaN: "
                f"{type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )
            _count(stats, "overflow_errors", len(rows) - finished)
    out[~np.isfinite(out).all(1)] = np.nan
    _count(stats, "overflow_rescored", int(np.isfinite(out).all(1).sum()))
    return out


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


@torch.no_grad()
def score_logits(model, rows: list[list[int]], idx: np.ndarray, pad_id: int, device, stats: dict | None = None):
    """Raw classifier logits (float32) for the rows ``idx``, shape (len(idx), 2); NaN for rows that cannot be scored.

    The guards :func:`score_batch` documents (it is this, softmaxed): an out-of-memory batch is split in halves;
    rows with non-finite logits are rescored alone in fp32 compute (:func:`logits_in_fp32`). Callers that keep
    logits (distillation at a temperature needs them) call this directly.
    """
    logits = None
    try:
        enc = pad([rows[i] for i in idx], pad_id)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu().numpy()  # (B, 2)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
    if logits is None:  # retried outside the except block: its traceback holds the failed forward's activations
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _count(stats, "oom_rows" if len(idx) == 1 else "oom_splits")
        if len(idx) == 1:
            return np.full((1, 2), np.nan, dtype=np.float32)
        half = len(idx) // 2
        first = score_logits(model, rows, idx[:half], pad_id, device, stats)
        return np.concatenate([first, score_logits(model, rows, idx[half:], pad_id, device, stats)])
    bad = np.flatnonzero(~np.isfinite(logits).all(1))
    if len(bad):
        logits[bad] = logits_in_fp32(model, [rows[i] for i in idx[bad]], pad_id, device, stats)
    return logits


def predict_logits(
    model, rows: list[list[int]], pad_id: int, batch_tokens: int, max_rows: int = 64, desc: str = "scoring"
) -> np.ndarray:
    """Raw logits (N, 2) float32 of ``model`` for each token-id row, in the input order; NaN where unscored.

    Batches by length under ``batch_tokens`` (:func:`plan_batches`); no deadline (a labelling job resumes by parts).
    """
    logits = np.full((len(rows), 2), np.nan, dtype=np.float32)
    if not rows:
        return logits
    device = model_device(model)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    with tqdm(total=len(rows), desc=desc, unit="row", leave=False) as bar:
        for idx in plan_batches(lengths, batch_tokens, max_rows):
            logits[idx] = score_logits(model, rows, idx, pad_id, device)
            bar.update(len(idx))
    return logits
