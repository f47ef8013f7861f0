"""A planner for the whole Kaggle run: what each batch costs, how the cascade's time is shared, and a projection.

A notebook that runs past 12 hours scores nothing, so every piece of optional work (the secondary model on the
least certain rows, the primary on their swapped A/B view) is planned against the time left, and re-planned
after every measured batch. Three parts:

* :class:`CostModel`: seconds of one batch on one device = ``a * padded tokens + b * sum(row length^2) + c``.
  The linear term is the weights (every padded position goes through every layer); the quadratic term is
  attention, which a tokens-only rate hides: fitted on a mix of lengths, a linear rate under-projects long rows
  (``tests/scoring/test_planner.py`` shows by how much). Fitted by non-negative least squares on the batches
  measured so far; a prior (a tokens/s figure), rescaled by the first measurements, before that.
* :func:`plan_cascade`: the batches of each pass that fit in the remaining time minus a reserve, taken greedily
  in one priority order (the primary's rest first, then optional work by the caller's keys) and stopping at the
  first that does not fit. Stopping, rather than skipping to cheaper work, is what makes plans monotone (more
  time never plans fewer rows of any pass). Batching is done once per pass (:meth:`PassWork.build`); a re-plan
  is a few vector operations over the batches left.
* :func:`project_run` / :func:`rehearsal_report`: before a 12-hour submission, the hours the primary needs on
  a synthetic test set (docs/facts.md §1's length profile) and how many secondary / swap-TTA rows would fit.

Times are wall seconds; with several devices (one model copy per T4, one shared queue of batches,
:mod:`kaggle_utils.scoring.pool`) a pass of batches costing ``c_i`` device-seconds ends within
``sum(c_i) / d + (1 - 1/d) * max(c_i)`` (list scheduling's bound), which is what the plan charges.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from kaggle_utils.scoring.predict import plan_batches

# The roles a cascade plans, in the order that breaks ties between equal priority keys: the second model gains
# more than the primary's own swapped view, so it wins a tie.
ROLES = ("primary", "secondary", "tta")

# Kaggle stops a notebook at 12 hours; the winners capped inference at 690 minutes (docs/facts.md §1).
KAGGLE_BUDGET_SECONDS = 690 * 60

# Per-T4 priors (one model copy per GPU) for the project's two models: tokens/s, attention ratio b/a, load seconds.
# Gemma2-9B nf4: the public LMSYS notebook scored ~25k rows of ~1.2k tokens in ~4 h on two T4s, ~1.0k tokens/s per
# T4. Qwen2.5-14B: that scaled by FLOP per token (18.5 / 29.4 G, docs/facts.md §8), ~0.6k, which also matches the
# WSDM 3rd place's vLLM 1.17k tokens/s over two T4s. b/a is attention's FLOP per token per unit of length over the
# weights': 4 * layers * attention width / FLOP per token (Qwen 4*48*5120 / 29.4e9, Gemma 4*42*4096 / 18.5e9). Load
# seconds are guesses (bf16 weights read from the input dataset and quantised, two copies): replace them with a
# measurement.
T4_PRIORS = {
    "qwen2.5-14b": (600.0, 3.3e-5, 600.0),
    "gemma2-9b": (1000.0, 3.7e-5, 400.0),
}


@dataclass(eq=False)
class CostModel:
    """Projected seconds of a batch on one device, ``a * padded + b * sum(len^2) + c``, learnt as batches finish.

    Until ``min_fit`` batches are measured the prior ``(per_token, per_token2, per_batch)`` is used, rescaled so
    that it matches the measured seconds in total, with ``prior_safety``; then a non-negative least-squares fit
    with ``safety``. The first ``warmup`` batches are kept out: each copy's first forward picks kernels and grows
    the allocator's pool, and on a GPU it can take many times a steady batch.
    """

    # prior a: seconds per padded token (1 / tokens per second of one device)
    per_token: float
    # prior b: seconds per squared row length (attention); 0 when unknown
    per_token2: float = 0.0
    # prior c: seconds per batch (padding, copies, Python)
    per_batch: float = 0.0
    # load time estimate of the model, wall seconds until every device holds its copy
    load_seconds: float = 0.0
    # multiplier on projections from the prior: a figure from other hardware, other code, other lengths
    prior_safety: float = 1.5
    # multiplier on projections from the fit: covers noise and drift (a T4 slows down as it heats)
    safety: float = 1.1
    # multiplier on the load estimate: the same load varies with the page cache and the disk
    load_safety: float = 1.5
    # measured batches (after the warm-up) before the fit replaces the prior; the fit has 3 unknowns
    min_fit: int = 8
    # first batches kept out of the fit (their seconds are kept in ``warmup_seconds``): one per model copy, and
    # the Kaggle shape runs a copy on each of two T4s
    warmup: int = 2
    # fit the per-batch constant c; token-budget batches all have about the same padded size, which makes c hard
    # to tell from a, but predictions for such batches stay right either way
    fit_per_batch: bool = True
    # X^T X (3, 3), X^T y (3,), sum of X (3,), sum of y over the fitted batches: the fit is O(1) per update
    _xtx: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)), init=False, repr=False)
    _xty: np.ndarray = field(default_factory=lambda: np.zeros(3), init=False, repr=False)
    _sum_x: np.ndarray = field(default_factory=lambda: np.zeros(3), init=False, repr=False)
    _sum_y: float = field(default=0.0, init=False, repr=False)
    # batches in the fit
    n_fit: int = field(default=0, init=False)
    # seconds of the warm-up batches (kept out of the fit)
    warmup_seconds: list[float] = field(default_factory=list, init=False)
    # measured load, wall seconds; None until recorded
    load_measured: float | None = field(default=None, init=False)
    # coefficients (3,) without safety, recomputed after each add
    _coef: np.ndarray | None = field(default=None, init=False, repr=False)
    # the pool's device threads add measurements concurrently
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.per_token > 0:
            raise ValueError(f"per_token={self.per_token}: the prior needs seconds per token > 0 (1 / tokens/s)")
        if min(self.per_token2, self.per_batch, self.load_seconds) < 0:
            raise ValueError("per_token2, per_batch and load_seconds must be >= 0")
        if min(self.prior_safety, self.safety, self.load_safety) < 1:
            raise ValueError("safety factors below 1 would plan past the deadline: use >= 1")
        if self.min_fit < 3 or self.warmup < 0:
            raise ValueError(f"min_fit={self.min_fit} must be >= 3 (three unknowns), warmup={self.warmup} >= 0")

    @classmethod
    def from_rate(cls, tokens_per_s: float, attention_ratio: float = 0.0, **kw) -> CostModel:
        """A prior from a tokens/s figure; ``attention_ratio`` b/a (seconds per len^2 over seconds per token)."""
        return cls(per_token=1.0 / tokens_per_s, per_token2=attention_ratio / tokens_per_s, **kw)

    def add(self, lengths: Sequence[int] | np.ndarray, seconds: float) -> None:
        """One measured batch: its rows' token lengths and the device-seconds it took."""
        x = batch_features(np.asarray(lengths, dtype=np.int64), [np.arange(len(lengths))])[0]  # (3,)
        with self._lock:
            if len(self.warmup_seconds) < self.warmup:
                self.warmup_seconds.append(float(seconds))
                return
            self._xtx += np.outer(x, x)
            self._xty += x * seconds
            self._sum_x += x
            self._sum_y += seconds
            self.n_fit += 1
            self._coef = None

    def record_load(self, seconds: float) -> None:
        """The measured wall seconds of loading the model (all device copies)."""
        self.load_measured = float(seconds)

    @property
    def fitted(self) -> bool:
        return self.n_fit >= self.min_fit

    def coefficients(self) -> np.ndarray:
        """(a, b, c) without safety: the fit, or the prior rescaled to the measured seconds."""
        with self._lock:
            if self._coef is None:
                self._coef = self._solve()
            return self._coef

    def _solve(self) -> np.ndarray:
        prior = np.array([self.per_token, self.per_token2, self.per_batch])
        if self.fitted:
            k = 3 if self.fit_per_batch else 2
            coef = np.zeros(3)
            coef[:k] = nnls_normal(self._xtx[:k, :k], self._xty[:k])
            if coef.any():
                return coef
        if self.n_fit == 0:
            return prior
        # few batches: keep the prior's shape, scale it to what was measured
        return prior * (self._sum_y / float(prior @ self._sum_x))

    def per_feature(self) -> np.ndarray:
        """(3,) projected seconds per (padded token, squared length, batch), safety included."""
        return self.coefficients() * (self.safety if self.fitted else self.prior_safety)

    def predict(self, batches_lengths: Sequence[Sequence[int] | np.ndarray]) -> np.ndarray:
        """Projected device-seconds (B,) of each batch (a list of row lengths each), safety included."""
        if len(batches_lengths) == 0:
            return np.zeros(0)
        arrays = [np.asarray(b, dtype=np.int64) for b in batches_lengths]
        offsets = np.cumsum([0] + [len(a) for a in arrays[:-1]])
        batches = [o + np.arange(len(a)) for o, a in zip(offsets, arrays, strict=True)]
        return batch_features(np.concatenate(arrays), batches) @ self.per_feature()

    def load_estimate(self) -> float:
        """Projected wall seconds of a load: the measured one if any, else the estimate; with ``load_safety``."""
        seconds = self.load_seconds if self.load_measured is None else self.load_measured
        return self.load_safety * seconds

    def describe(self, max_length: int = 2048) -> str:
        """One line: where the projection comes from, the rate, attention's share at ``max_length``."""
        a, b, c = self.coefficients()
        source = f"fit on {self.n_fit} batches" if self.fitted else f"prior ({self.n_fit} batches measured)"
        attention = b * max_length / (a + b * max_length) if a + b > 0 else 0.0
        factor = self.safety if self.fitted else self.prior_safety
        return (
            f"{source}: {1 / a if a > 0 else math.inf:,.0f} tokens/s before attention, attention "
            f"{attention:.0%} of a {max_length:,}-token row, {c:.3f} s per batch, projections x{factor}, "
            f"load {self.load_estimate():.0f} s"
        )


def t4_prior(model: str, **kw) -> CostModel:
    """The prior cost model of one of :data:`T4_PRIORS`' models on one T4."""
    if model not in T4_PRIORS:
        raise KeyError(f"no T4 prior for {model!r}; known: {sorted(T4_PRIORS)}; or use CostModel.from_rate")
    tokens_per_s, ratio, load = T4_PRIORS[model]
    return CostModel.from_rate(tokens_per_s, ratio, load_seconds=load, **kw)


def nnls_normal(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """``argmin |X w - y|^2`` over ``w >= 0`` from ``X^T X`` (K, K) and ``X^T y`` (K,), for small K.

    The optimum is the unconstrained solution on its own support, so trying every support is exact: 2^K - 1
    small solves (7 for the cost model), cheaper than any iterative method at this size.
    """
    k = len(xty)
    scale = np.sqrt(np.diag(xtx))
    scale[scale == 0] = 1.0
    a = xtx / np.outer(scale, scale)  # (K, K): columns brought to one scale (tokens ~1e4, squares ~1e7)
    v = xty / scale
    best, best_obj = np.zeros(k), 0.0  # objective |Xw - y|^2 - |y|^2 = w'Aw - 2 v'w; w = 0 gives 0
    for support in itertools.product((False, True), repeat=k):
        s = np.flatnonzero(support)
        if len(s) == 0:
            continue
        try:
            ws = np.linalg.solve(a[np.ix_(s, s)], v[s])
        except np.linalg.LinAlgError:  # columns that are exactly collinear on the measured batches
            continue
        if (ws < 0).any():
            continue
        w = np.zeros(k)
        w[s] = ws
        obj = float(w @ a @ w - 2 * v @ w)
        if obj < best_obj:
            best, best_obj = w, obj
    return best / scale


def batch_features(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> np.ndarray:
    """(B, 3) per batch: padded tokens (rows x longest), sum of squared row lengths, 1.

    Attention is counted per row (sum of len^2) rather than per padded row (rows x longest^2): batches hold rows of
    near-equal length, so the two differ by a few percent, and the per-row form also fits packed kernels.
    """
    if len(batches) == 0:
        return np.zeros((0, 3))
    sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))  # (B,)
    flat = np.asarray(lengths, dtype=np.float64)[np.concatenate(batches)]  # (sum of sizes,)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (B,)
    padded = sizes * np.maximum.reduceat(flat, starts)  # (B,)
    squares = np.add.reduceat(flat**2, starts)  # (B,)
    return np.stack([padded, squares, np.ones(len(batches))], axis=1)


@dataclass(eq=False)
class PassWork:
    """One pass's work left: the batches its executor will run, in run order, with what the plan needs of them."""

    # token length per candidate row (N,), in the caller's order; batches index into it
    lengths: np.ndarray
    # row positions per batch, in run order: exactly :func:`plan_batches`' batches, so plan and run agree
    batches: list[np.ndarray]
    # (B, 3) cost features per batch (see :func:`batch_features`)
    features: np.ndarray
    # (B,) rows per batch
    sizes: np.ndarray
    # (B,) priority key per batch, non-decreasing: lower keys are planned first when passes are merged
    keys: np.ndarray
    # the model's cost model (the primary and its swapped view share one)
    cost: CostModel
    # whether the model must be loaded before this pass's first batch
    needs_load: bool = False

    @classmethod
    def build(
        cls,
        lengths: Sequence[int] | np.ndarray,
        cost: CostModel,
        batch_tokens: int,
        max_rows: int,
        *,
        prioritized: bool = True,
        keys: Sequence[float] | np.ndarray | None = None,
        needs_load: bool = False,
    ) -> PassWork:
        """Batch a pass once. ``lengths`` of the candidates in priority order (``prioritized``: least certain first,
        batched in windows as :func:`plan_batches` does with an ``order``), or all rows by length (the primary).

        ``keys`` (N,), non-decreasing: the priority on a scale shared with the other optional pass (e.g. the
        primary's margin |p_a - 0.5|), so that secondary and swap-TTA rows interleave; none: key 0 for all rows,
        and the secondary's candidates all come before the swap-TTA's.
        """
        lengths = np.asarray(lengths, dtype=np.int64)  # (N,)
        if lengths.ndim != 1 or (len(lengths) and lengths.min() < 1):
            raise ValueError(f"lengths must be a 1-D array of token counts >= 1, got shape {lengths.shape}")
        row_keys = np.zeros(len(lengths)) if keys is None else np.asarray(keys, dtype=np.float64)  # (N,)
        if row_keys.shape != lengths.shape or not np.isfinite(row_keys).all():
            raise ValueError(f"keys: {row_keys.shape} finite values expected, one per row of lengths {lengths.shape}")
        if (np.diff(row_keys) < 0).any():
            raise ValueError("keys must be non-decreasing: pass the candidates sorted by their key (priority order)")
        order = np.arange(len(lengths)) if prioritized else None
        batches = plan_batches(lengths, batch_tokens, max_rows, order) if len(lengths) else []
        first = np.array([b.min() for b in batches], dtype=np.int64)  # (B,)
        # a batch's key is its most urgent row's; the running max keeps run order = key order inside the pass
        batch_keys = np.maximum.accumulate(row_keys[first]) if len(batches) else np.zeros(0)
        sizes = np.array([len(b) for b in batches], dtype=np.int64)
        return cls(lengths, batches, batch_features(lengths, batches), sizes, batch_keys, cost, needs_load)

    def __len__(self) -> int:
        return len(self.batches)

    def rest(self, start: int, loaded: bool = False) -> PassWork:
        """The work left once batches ``[0, start)`` have been started; ``loaded``: the model is in memory now."""
        return replace(
            self,
            batches=self.batches[start:],
            features=self.features[start:],
            sizes=self.sizes[start:],
            keys=self.keys[start:],
            needs_load=self.needs_load and not loaded,
        )


@dataclass
class Plan:
    """How much of each pass fits; every figure is projected with the cost models' safety factors."""

    # seconds the plan may use: remaining - reserve
    available: float
    # projected wall seconds from now to the end of the planned work (in-flight batches included)
    projected: float
    # batches planned per role: a prefix of that pass's batches
    batches: dict[str, int]
    # rows in those batches per role
    rows: dict[str, int]
    # projected wall seconds per role, its load included
    seconds: dict[str, float]
    # whether the role's whole remaining work is planned
    complete: dict[str, bool]

    @property
    def slack(self) -> float:
        return self.available - self.projected

    def describe(self) -> str:
        parts = [f"{r} {self.rows[r]:,} rows ({self.seconds[r] / 60:.1f} min)" for r in self.rows]
        return (
            f"plan: {', '.join(parts) or 'nothing'}; projected {self.projected / 60:.1f} of "
            f"{self.available / 60:.1f} min available"
        )


def plan_cascade(
    remaining_seconds: float,
    reserve_seconds: float,
    primary: PassWork | None = None,
    secondary: PassWork | None = None,
    tta: PassWork | None = None,
    *,
    devices: int = 1,
    in_flight: Sequence[float] = (),
) -> Plan:
    """The batches of each pass that fit in ``remaining_seconds - reserve_seconds``.

    Work is taken in one priority order: all of the primary's rest (its rows are the submission), then the
    secondary's and the swap-TTA's batches merged by key; a pass's load is charged with its first batch. The plan
    stops at the first batch whose projected end passes the time available, so its projection never does, and
    more time never plans fewer batches of any pass. ``in_flight``: the projected seconds still to run of each batch
    already started on another device. Call it again after each measurement: it does not re-batch.
    """
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1")
    passes = [(role, w) for role, w in zip(ROLES, (primary, secondary, tta), strict=True) if w is not None]
    available = remaining_seconds - reserve_seconds
    busy = np.asarray(in_flight, dtype=np.float64)  # (running batches,)
    cum, which, unit_wall = _merged_schedule(passes, devices, busy)
    k = int(np.searchsorted(cum, available, side="right")) if available >= 0 else 0
    counts = np.bincount(which[:k], minlength=len(passes))
    batches, rows, seconds, complete = {}, {}, {}, {}
    for i, (role, w) in enumerate(passes):
        n = int(counts[i])
        batches[role], rows[role], complete[role] = n, int(w.sizes[:n].sum()), n == len(w)
        seconds[role] = float(unit_wall[:k][which[:k] == i].sum()) + _tail(w, n, devices)
    projected = float(cum[k - 1]) if k else float(busy.max(initial=0.0))
    return Plan(available, projected, batches, rows, seconds, complete)


def _merged_schedule(
    passes: list[tuple[str, PassWork]], devices: int, busy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over every pass's batches in plan order (U units): projected wall seconds to the end of each unit (U,),
    the pass index of each unit (U,), and each unit's own wall seconds, its pass's load included (U,).
    ``busy``: seconds left of the batches running now; no unit ends before the longest of them."""
    if not passes:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0)
    costs = [w.features @ w.cost.per_feature() for _, w in passes]  # (B_p,) device-seconds, safety included
    # the primary's rest is not optional: it goes before any key
    keys = np.concatenate([np.full(len(w), -np.inf) if r == "primary" else w.keys for r, w in passes])  # (U,)
    which = np.concatenate([np.full(len(w), i) for i, (_, w) in enumerate(passes)])  # (U,)
    index = np.concatenate([np.arange(len(w)) for _, w in passes])  # (U,)
    order = np.lexsort((index, which, keys))  # by key, then role, then run order
    c, which, index = np.concatenate(costs)[order], which[order], index[order]
    loads = np.array([w.cost.load_estimate() if w.needs_load else 0.0 for _, w in passes])
    unit_wall = c / devices + np.where(index == 0, loads[which], 0.0)  # (U,)
    # list scheduling on `devices` workers ends a pass at most (1 - 1/d) x its largest batch after the mean
    tails = sum(np.maximum.accumulate(np.where(which == i, c, 0.0)) for i in range(len(passes)))  # (U,)
    cum = busy.sum() / devices + np.cumsum(unit_wall) + (1 - 1 / devices) * tails  # (U,) non-decreasing
    return np.maximum(cum, busy.max(initial=0.0)), which, unit_wall


def _tail(work: PassWork, n: int, devices: int) -> float:
    """The end-of-pass allowance of ``n`` planned batches: (1 - 1/d) x the largest of them."""
    if n == 0 or devices == 1:
        return 0.0
    return (1 - 1 / devices) * float((work.features[:n] @ work.cost.per_feature()).max())


def synthetic_lengths(n: int, max_length: int, seed: int = 0, template_tokens: int = 32) -> np.ndarray:
    """Token lengths (n,) of synthetic test rows: docs/facts.md §1's profile, prompt ~ lognormal(ln 39, 1.93) plus two
    responses ~ lognormal(ln 452, 0.60) plus the template's tokens, capped at ``max_length`` (middle truncation)."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(39), 1.93, n)  # (n,)
    responses = rng.lognormal(np.log(452), 0.60, (n, 2)).sum(axis=1)  # (n,)
    return np.minimum(np.ceil(prompt + responses) + template_tokens, max_length).astype(np.int64)


# Common English words that BPE tokenizers (Qwen2.5, Gemma2) keep as one token after a space: a synthetic row of k
# words is about k tokens, so the rehearsal's rows follow the length profile in tokens, not just in words.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an had they"
    " you were their one all we can her has there been if more when will would who so no"
).split()


def synthetic_test(n: int, seed: int = 0, max_words: int = 12_000) -> pd.DataFrame:
    """A test file of ``n`` rows (id, prompt, response_a, response_b) whose word counts follow docs/facts.md §1's token
    profile (prompt ~ lognormal(ln 39, 1.93), responses ~ lognormal(ln 452, 0.60)), for rehearsing a run's speed:
    the texts mean nothing, only their lengths matter."""
    rng = np.random.default_rng(seed)
    counts = np.stack(
        [rng.lognormal(np.log(39), 1.93, n), rng.lognormal(np.log(452), 0.60, n), rng.lognormal(np.log(452), 0.60, n)],
        axis=1,
    )  # (n, 3) words of prompt, response_a, response_b
    counts = np.clip(np.ceil(counts), 1, max_words).astype(np.int64)
    vocab = np.array(_WORDS)
    texts = [[" ".join(vocab[rng.integers(0, len(vocab), k)]) for k in row] for row in counts]
    prompt, a, b = zip(*texts, strict=True)
    return pd.DataFrame({"id": np.arange(n), "prompt": prompt, "response_a": a, "response_b": b})


@dataclass
class RunProjection:
    """What a full run would do: the primary's hours on every row, and the optional rows that fit."""

    # rows in the projected test set
    n_rows: int
    # devices (model copies) per pass
    devices: int
    # the run's budget and the reserve kept back, seconds
    budget: float
    reserve: float
    # candidate rows per role
    candidates: dict[str, int]
    # every candidate of every pass, no deadline: the hours each pass would need
    full: Plan
    # what fits in budget - reserve
    plan: Plan

    @property
    def primary_hours(self) -> float:
        return self.full.seconds["primary"] / 3600

    def table(self) -> str:
        head = (
            f"projection: {self.n_rows:,} rows on {self.devices} device(s), budget {self.budget / 60:.0f} min "
            f"- reserve {self.reserve / 60:.0f} min = {self.plan.available / 3600:.2f} h (safety factors included)"
        )
        lines = [head, f"{'pass':<10} {'candidates':>10} {'all rows (h)':>12} {'planned rows':>12} {'planned (h)':>11}"]
        for role, n in self.candidates.items():
            lines.append(
                f"{role:<10} {n:>10,} {self.full.seconds[role] / 3600:>12.2f} {self.plan.rows[role]:>12,} "
                f"{self.plan.seconds[role] / 3600:>11.2f}"
            )
        verdict = "" if self.plan.complete.get("primary", True) else "  PRIMARY DOES NOT FINISH"
        lines.append(f"{'total':<10} {'':>10} {'':>12} {'':>12} {self.plan.projected / 3600:>11.2f}{verdict}")
        return "\n".join(lines)


def project_run(
    lengths: Sequence[int] | np.ndarray,
    primary: CostModel,
    secondary: CostModel | None = None,
    *,
    budget_seconds: float = KAGGLE_BUDGET_SECONDS,
    reserve_seconds: float = 30 * 60,
    devices: int = 2,
    batch_tokens: int = 8192,
    max_rows: int = 32,
    tta_fraction: float = 0.0,
    seed: int = 0,
) -> RunProjection:
    """Project a full run on rows of ``lengths`` (N,): both models' loads, the primary on every row, then the
    secondary on rows in a random priority (the real one, the primary's uncertainty, is unknown beforehand) and
    the primary's swapped view on the first ``tta_fraction`` of them, interleaved row by row.

    Defaults are the ``infer-cascade-2xt4`` recipe's batching and two T4s, one model copy each.
    """
    if not 0 <= tta_fraction <= 1:
        raise ValueError(f"tta_fraction={tta_fraction} must be in [0, 1]")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    priority = np.random.default_rng(seed).permutation(n)  # (N,) stand-in for least-certain-first
    build = dict(batch_tokens=batch_tokens, max_rows=max_rows)
    first = PassWork.build(lengths, primary, prioritized=False, needs_load=True, **build)
    second = tta = None
    if secondary is not None:
        second = PassWork.build(lengths[priority], secondary, keys=np.arange(n), needs_load=True, **build)
    m = int(round(tta_fraction * n))
    if m:
        tta = PassWork.build(lengths[priority[:m]], primary, keys=np.arange(m), **build)
    candidates = {"primary": n} | ({"secondary": n} if second else {}) | ({"tta": m} if tta else {})
    full = plan_cascade(math.inf, 0.0, first, second, tta, devices=devices)
    plan = plan_cascade(budget_seconds, reserve_seconds, first, second, tta, devices=devices)
    return RunProjection(n, devices, budget_seconds, reserve_seconds, candidates, full, plan)


def rehearsal_report(
    measured: dict[str, Sequence[tuple[Sequence[int], float]]],
    loads: dict[str, float] | None = None,
    priors: dict[str, CostModel] | None = None,
    *,
    n_rows: int = 25_000,
    max_length: int = 2500,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
    **project_kw,
) -> RunProjection:
    """Turn a rehearsal's measured batches into a printed projection of the full run.

    ``measured``: ``{"primary": [(row lengths, device-seconds), ...], "secondary": [...]}`` per batch, as the
    ``--rehearse N`` run records them; ``loads``: measured load seconds per role; ``priors``: each role's prior
    (default: :data:`T4_PRIORS` for Qwen2.5-14B and Gemma2-9B). A secondary with no measurements is projected from
    its prior. The projection holds for the hardware the batches were measured on: rehearse on the Kaggle T4s.
    """
    unknown = set(measured) - {"primary", "secondary"}
    if unknown:
        raise ValueError(f"measured: unknown roles {sorted(unknown)}; expected 'primary' and/or 'secondary'")
    priors = {"primary": t4_prior("qwen2.5-14b"), "secondary": t4_prior("gemma2-9b")} | (priors or {})
    models = {role: replace(priors[role]) for role in ("primary", "secondary")}  # fresh copies: no state shared
    for role, batches in measured.items():
        for lengths, seconds in batches:
            models[role].add(lengths, seconds)
    for role, seconds in (loads or {}).items():
        models[role].record_load(seconds)
    lengths = synthetic_lengths(n_rows, max_length, seed)
    projection = project_run(lengths, models["primary"], models["secondary"], seed=seed, **project_kw)
    for role, model in models.items():
        print_fn(f"{role}: {model.describe(max_length)}")
    print_fn(projection.table())
    return projection
