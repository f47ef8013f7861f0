"""One scoring pass of one model over many rows: a model copy per device, a shared queue of batches, guards.

The Kaggle shape is two T4s: each GPU loads its own copy (one after the other) and its thread takes the next
batch from one queue, so a fast GPU does more, and when a GPU's thread dies (a load failure, an error in a
forward) the other finishes the queue; the batch it held goes back once. Nothing here raises for a model
problem: the pass returns what was scored, the errors as text, and leaves the rest NaN for the caller.

Resumable: with ``parts_dir``, finished batches are flushed to parquet parts (atomically, every
``flush_seconds``) under a key of the pass's inputs; a rerun of the same pass restores them and scores only
the rest. Batches are planned from all rows, so a resumed pass forms the same batches and gives the same
probabilities as an uninterrupted one.
"""

from __future__ import annotations

import gc
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kaggle_utils.models.loading import model_device
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.planner import CostModel
from kaggle_utils.scoring.predict import score_batch
from kaggle_utils.store import write_atomic


@dataclass
class PassResult:
    """``probs`` (N, 2), NaN where unscored; what stopped the pass and what went wrong, for the report."""

    probs: np.ndarray
    seconds: float
    stopped_by_deadline: bool
    # one line per failure: which device, what happened; empty when all went well
    errors: list[str] = field(default_factory=list)
    # seconds each device took to load its copy
    load_seconds: dict[str, float] = field(default_factory=dict)
    # out-of-memory batches split and rows that did not fit even alone
    oom: dict[str, int] = field(default_factory=dict)
    # batches restored from an earlier run's parts
    resumed_batches: int = 0
    # (row lengths, device-seconds) of every batch measured, for the planner and a rehearsal's projection
    batch_log: list[tuple[np.ndarray, float]] = field(default_factory=list)

    @property
    def scored(self) -> np.ndarray:
        return np.isfinite(self.probs).all(1)


class Parts:
    """Finished batches of one pass on disk: ``part-NNNNN.parquet`` files of (batch, row, p_a, p_b)."""

    def __init__(self, folder: Path | None, flush_seconds: float):
        self.folder, self.flush_seconds = folder, flush_seconds
        self.pending: list[pd.DataFrame] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def restore(self) -> pd.DataFrame:
        """The batches an earlier run of this pass finished (empty when none)."""
        files = sorted(self.folder.glob("part-*.parquet")) if self.folder is not None else []
        if not files:
            return pd.DataFrame({"batch": [], "row": [], "p_a": [], "p_b": []}).astype({"batch": int, "row": int})
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)

    def add(self, batch: int, idx: np.ndarray, probs: np.ndarray) -> None:
        if self.folder is None:
            return
        part = pd.DataFrame({"batch": batch, "row": idx, "p_a": probs[:, 0], "p_b": probs[:, 1]})
        with self.lock:
            self.pending.append(part)
            if time.monotonic() - self.last_flush >= self.flush_seconds:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        number = len(list(self.folder.glob("part-*.parquet")))
        rows = pd.concat(self.pending, ignore_index=True)
        # a part exists only once complete
        write_atomic(self.folder / f"part-{number:05d}.parquet", lambda tmp: rows.to_parquet(tmp, index=False))
        self.pending, self.last_flush = [], time.monotonic()


def pass_key(*parts: object) -> str:
    """A short hash of everything that decides a pass's output (model, adapter, settings, rows, batches)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class DeviceCopies:
    """One copy of a model per device, loaded one after the other on a background thread.

    Loading in order (never two at once) is what transformers needs (it swaps a process-wide default dtype while
    loading) and what host memory needs (each copy passes through it). A device's worker starts scoring as soon as
    its own copy is ready, so the first GPU works while the second loads. The copies stay loaded across passes
    (the primary's swap-TTA runs on the copies its first pass used) until :meth:`close`. A load still running at
    the deadline is left behind: :meth:`wait` stops waiting, and a copy that arrives after :meth:`close` is dropped.
    """

    def __init__(self, load: Callable[[str], object], devices: Sequence[str], clock: Callable[[], float]):
        # copies are numbered: "cpu,cpu" (two copies on one device) is a valid rehearsal of two GPUs
        self.devices = list(devices)
        self.models: dict[int, object] = {}
        self.errors: dict[int, str] = {}
        self.load_seconds: dict[str, float] = {}
        self.ready = [threading.Event() for _ in self.devices]
        self.closed = False
        self.started = clock()
        # wall seconds from the start until every copy was loaded (or failed); None while loading
        self.total_load_seconds: float | None = None
        self._thread = threading.Thread(target=self._load_all, args=(load, clock), name="loader", daemon=True)
        self._thread.start()

    def name(self, copy: int) -> str:
        return self.devices[copy] if self.devices.count(self.devices[copy]) == 1 else f"{self.devices[copy]}#{copy}"

    def _load_all(self, load: Callable[[str], object], clock: Callable[[], float]) -> None:
        for copy, device in enumerate(self.devices):
            t0 = clock()
            try:
                model = None if self.closed else load(device)
            except Exception as err:  # a broken copy must not take the other devices down with it
                self.errors[copy] = f"{self.name(copy)}: loading failed: {type(err).__name__}: {err}"
                model = None
            self.load_seconds[self.name(copy)] = round(clock() - t0, 1)
            if model is not None and not self.closed:
                self.models[copy] = model
            self.ready[copy].set()
        self.total_load_seconds = clock() - self.started

    def wait(self, copy: int, deadline: Deadline) -> object | None:
        """Copy number ``copy`` once loaded; None when its load failed or did not end before the deadline."""
        remaining = deadline.remaining()
        self.ready[copy].wait(timeout=None if remaining == float("inf") else max(0.0, remaining))
        return self.models.get(copy)

    def close(self) -> None:
        """Free every copy (and any still loading, when it arrives)."""
        self.closed = True
        self.models.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class _Shared:
    """State the worker threads share; numpy writes go to disjoint rows, lists are appended under the GIL."""

    rows: list[list[int]]
    lengths: np.ndarray
    batches: list[np.ndarray]
    todo: queue.Queue
    probs: np.ndarray
    parts: Parts
    deadline: Deadline
    cost: CostModel
    result: PassResult
    attempts: dict[int, int] = field(default_factory=dict)
    bar: tqdm | None = None
    # set when the caller stops waiting (the deadline): workers take no further batch
    stop: bool = False
    # guards appending cut batches (two device threads may cut at once)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # model copies (one per device): each one's first batch is a warm-up
    copies: int = 1


def _worker(copy: int, copies: DeviceCopies, pad_id: int, shared: _Shared) -> None:
    result, deadline, device = shared.result, shared.deadline, copies.name(copy)
    model = copies.wait(copy, deadline)
    if model is None:
        if copy in copies.errors:
            result.errors.append(copies.errors[copy])
        else:
            result.stopped_by_deadline = True
            result.errors.append(f"{device}: still loading at the deadline; left behind")
        return
    while not shared.stop:
        try:
            b = shared.todo.get_nowait()
        except queue.Empty:
            break
        idx = _fitting_rows(shared, b)
        if idx is None:
            result.stopped_by_deadline = True
            break
        if len(idx) < len(shared.batches[b]):  # cut to the time left: the rest waits as a batch of its own
            b = _split_batch(shared, b, len(idx))
        lengths = shared.lengths[idx]  # (B,)
        tb = deadline.clock()  # the deadline's clock: measured times and the deadline must agree
        try:
            probs = score_batch(model, shared.rows, idx, pad_id, model_device(model), result.oom)
        except Exception as err:
            result.errors.append(f"{device}: batch {b} failed, device stopped: {type(err).__name__}: {err}")
            shared.attempts[b] = shared.attempts.get(b, 0) + 1
            if shared.attempts[b] < 2:  # once more on another device; twice is the batch's fault
                shared.todo.put(b)
            break
        seconds = deadline.clock() - tb
        shared.probs[idx] = probs
        shared.parts.add(b, idx, probs)
        shared.cost.add(lengths, seconds)
        result.batch_log.append((lengths, seconds))
        bar = shared.bar
        if bar is not None:
            bar.update(len(idx))


def _fitting_rows(shared: _Shared, b: int) -> np.ndarray | None:
    """Rows of batch ``b`` to score now: all of them when the projection fits the time left; None when none fit.

    While the model's speed is not yet fitted (the prior, or a few batches of which the first may be a warm-up),
    a batch that does not fit is cut to its longest prefix that does, so that a pessimistic prior or one slow
    first forward does not end the pass while rows could still be scored: each scored piece measures the speed.
    """
    idx, cost, deadline = shared.batches[b], shared.cost, shared.deadline
    if deadline.allows(cost.predict([shared.lengths[idx]])[0]):
        return idx
    if cost.fitted:
        return None
    # a piece costs at least the quickest batch measured after each copy's first (a forward's fixed costs do not
    # shrink with its rows; a first forward's warm-up is no measure of the rest)
    steady = [seconds for _, seconds in shared.result.batch_log[shared.copies :]]
    floor = min(steady) * cost.prior_safety if steady else 0.0

    def fits(k: int) -> bool:
        return deadline.allows(max(cost.predict([shared.lengths[idx[:k]]])[0], floor))

    lo, hi = 0, len(idx) - 1  # the largest k with prefix k fitting (cost grows with k)
    while lo < hi:
        k = (lo + hi + 1) // 2
        lo, hi = (k, hi) if fits(k) else (lo, k - 1)
    return idx[:lo] if lo else None


def _split_batch(shared: _Shared, b: int, k: int) -> int:
    """Batch ``b`` split after its ``k`` first rows, both parts numbered past the planned batches (their parts are
    not restored by a rerun, which scores batch ``b`` whole); returns the first part's number."""
    idx = shared.batches[b]
    with shared.lock:
        first = len(shared.batches)
        shared.batches.extend([idx[:k], idx[k:]])
    shared.todo.put(first + 1)
    return first


def run_pass(
    copies: DeviceCopies,
    rows: list[list[int]],
    batches: list[np.ndarray],
    pad_id: int,
    deadline: Deadline,
    cost: CostModel,
    parts_dir: Path | None = None,
    flush_seconds: float = 60.0,
    desc: str = "scoring",
) -> PassResult:
    """Score ``batches`` (row indices into ``rows``, in priority order) on every device of ``copies``.

    A batch starts only when ``cost`` (learnt from this pass's batches as they end) projects it to end before the
    deadline. ``batches`` may be a prefix of a pass planned whole: parts are numbered by batch, so a rerun with a
    longer or shorter prefix of the same pass reuses what was scored.
    """
    t0 = deadline.clock()
    probs = np.full((len(rows), 2), np.nan, dtype=np.float32)
    result = PassResult(probs, 0.0, False)
    parts = Parts(parts_dir, flush_seconds)
    done = parts.restore()
    done = done[done["batch"] < len(batches)]
    if len(done):
        probs[done["row"].to_numpy()] = done[["p_a", "p_b"]].to_numpy(dtype=np.float32)
    finished = set(done["batch"].astype(int))
    result.resumed_batches = len(finished)
    todo: queue.Queue = queue.Queue()
    for b in range(len(batches)):
        if b not in finished:
            todo.put(b)
    if todo.empty():
        return result
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bar = tqdm(total=sum(len(batches[b]) for b in list(todo.queue)), desc=desc, unit="row", leave=False)
    # a copy: batches cut to the time left are appended to it (_split_batch)
    shared = _Shared(rows, lengths, list(batches), todo, probs, parts, deadline, cost, result, bar=bar)
    shared.copies = len(copies.devices)
    threads = [
        threading.Thread(target=_worker, args=(c, copies, pad_id, shared), name=copies.name(c), daemon=True)
        for c in range(len(copies.devices))
    ]
    try:
        for t in threads:
            t.start()
        _join_until(threads, deadline, result)
    finally:
        shared.stop, shared.bar = True, None
        parts.flush()  # even on a KeyboardInterrupt: what was scored survives the kill
        bar.close()
    result.seconds = deadline.clock() - t0
    result.load_seconds = dict(copies.load_seconds)
    if any(t.is_alive() for t in threads):
        # a device still in a forward at the deadline is left behind (daemon threads): what it writes from now on
        # goes to the old array, never into the result handed back
        result.probs = probs.copy()
    return result


def _join_until(threads: list[threading.Thread], deadline: Deadline, result: PassResult) -> None:
    """Wait for the workers, but never past the deadline: a slow load or a slow batch cannot overrun it."""
    for t in threads:
        remaining = deadline.remaining()
        t.join(timeout=None if remaining == float("inf") else max(0.0, remaining))
        if t.is_alive():
            result.stopped_by_deadline = True
            result.errors.append(f"{t.name}: still scoring at the deadline; left behind")
