"""The token budget of one model on one device, from its free memory and a measured cost per padded token.

A batch's padded size (rows x longest row) is what its activations scale with, so one number per model and
device, ``TokenBudget.tokens``, is all the batcher needs (:func:`kaggle_utils.inputs.batching.token_budget_batches`
takes it as ``max_tokens``). It is measured, never a fixed default: after the model is loaded, the longest row is
forwarded alone and then a few of the longest rows together, through the engine's own
:func:`~kaggle_utils.scoring.predict.score_batch`; the activation bytes per padded token at the longest length
divide the memory left after loading. The chosen budget is then confirmed on the heaviest batches it allows
(the longest rows, and the batch with the most padded tokens), so that a budget that does not fit fails in the
first minute rather than at hour 9; out of memory lowers it.

Measured on an H200 capped at 15 GiB, fp16 nf4 at 2,500 tokens: 8,192-token batches peak at 8.8 GiB
(Qwen2.5-14B) and 8.0 GiB (Gemma2-9B); Gemma2 at 16,384 tokens peaks at 12.8 GiB with sdpa and 16.8 GiB with
eager attention, which does not fit a T4 (docs/facts.md §7).

This probe on an H200 capped at 15 GiB (2026-11-29; random fp16 weights with Qwen2.5-14B / Gemma2-9B widths and
4 layers, padded to 8 GiB held; 400 rows up to 2,500 tokens): the cost per token measured on 4 rows predicted
the confirmation peaks within 0.05 GiB (0.134 MiB per token Qwen2 sdpa, 0.141 Gemma2 sdpa, 0.39 Gemma2 eager).
Budgets above ~40k tokens broke on the caching allocator's fragmentation (reserved up to 1.2 GiB above
allocated) unless ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (then a 44.6k-token budget ran the whole
pass with no split); at the 32,768 ceiling both settings ran it with no split.

Memory is read through a :class:`MemoryGauge` so the logic runs on the CPU in tests; :class:`CudaGauge` is the
real one. On a CPU device there is nothing to measure and the caller's fallback budget is returned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kaggle_utils.inputs.batching import token_budget_batches
from kaggle_utils.scoring.predict import score_batch

GiB = 1024**3
MiB = 1024**2


class MemoryGauge(Protocol):
    """What the probe reads of one device's memory, in bytes."""

    def limit(self) -> int:
        """Bytes this process may hold on the device (allocator cache included)."""

    def allocated(self) -> int:
        """Bytes held by live tensors now."""

    def reserved(self) -> int:
        """Bytes held by the caching allocator now (live tensors and cached free blocks)."""

    def reset_peak(self) -> None:
        """Start a new peak measurement from what is allocated now."""

    def peak(self) -> int:
        """The most bytes held by live tensors since :meth:`reset_peak`."""

    def clear(self) -> None:
        """Give cached free blocks back (after an out-of-memory error, before the next try)."""


class CudaGauge:
    """:class:`MemoryGauge` of one CUDA device, read through ``torch.cuda``.

    The limit is the smaller of two: ``total memory x the per-process fraction`` (what
    ``torch.cuda.set_per_process_memory_fraction`` caps the caching allocator's reserved bytes at; 1.0 when
    never set, or on a torch without ``get_per_process_memory_fraction``), and what the device can still give
    us, ``free + reserved`` (``torch.cuda.mem_get_info`` reports the device-wide free bytes, which do not count
    our allocator's cache but do exclude the CUDA context and other processes).
    """

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaGauge needs a CUDA device, got {device}")
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def fraction(self) -> float:
        get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return 1.0 if get is None else float(get(self.device))

    def limit(self) -> int:
        total = torch.cuda.get_device_properties(self.device).total_memory
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(min(total * self.fraction(), free + self.reserved()))

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        # allocated, not reserved: the cache's fragmentation is left to the headroom, and a budget it breaks
        # is caught by the confirmation (the allocator raises when reserved memory cannot grow)
        return torch.cuda.max_memory_allocated(self.device)

    def clear(self) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.empty_cache()


def expandable_segments() -> bool:
    """Whether the CUDA caching allocator is set to expandable segments (read when CUDA starts, not later).

    They cut the fragmentation that large, variably shaped activations leave in a 15 GiB device; without them
    the headroom has to absorb it.
    """
    conf = ",".join(os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments:true" in conf.lower().replace(" ", "")


class MemoryBudgetError(RuntimeError):
    """Not even one of the longest rows fits on the device: no batch plan can help."""


@dataclass
class TokenBudget:
    """Padded tokens per batch for one model on one device, and how they were found."""

    # e.g. "cuda:0"
    device: str
    # padded tokens (rows x longest row) per batch: ``max_tokens`` / ``batch_tokens`` for the batcher
    tokens: int
    # what set ``tokens``: the binding limit, halvings after out-of-memory, or why the fallback was used
    reason: str
    # activation bytes per padded token at ``longest`` tokens; 0 when nothing was measured (the fallback)
    bytes_per_token: float = 0.0
    # the longest row's tokens: the budget holds for rows up to this length
    longest: int = 0
    # bytes this process may use on the device
    limit: int = 0
    # bytes held outside any batch: weights and adapters after load, plus what the first forward keeps
    static: int = 0
    # the highest allocated bytes seen in a probe that fitted (``static`` included)
    peak: int = 0
    # fraction of ``limit - static`` the budget may fill
    headroom: float = 1.0
    # every forward run: (padded tokens, peak allocated bytes, fitted)
    probes: list[tuple[int, int, bool]] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.bytes_per_token > 0

    def describe(self) -> str:
        """One line for the log."""
        if not self.measured:
            return f"{self.device}: {self.tokens:,} padded tokens per batch ({self.reason})"
        return (
            f"{self.device}: {self.tokens:,} padded tokens per batch: {self.limit / GiB:.1f} GiB limit, "
            f"{self.static / GiB:.1f} GiB weights, {self.bytes_per_token / MiB:.2f} MiB per token at "
            f"{self.longest:,} tokens, x{self.headroom:g} headroom ({self.reason})"
        )


def shared_token_budget(budgets: Sequence[TokenBudget]) -> int:
    """The budget of one batch plan shared by several devices (the pool's single queue): the smallest one."""
    if not budgets:
        raise ValueError("no budgets to share")
    return min(b.tokens for b in budgets)


def probe_token_budget(
    model,
    rows: list[list[int]],
    lengths: np.ndarray,
    pad_id: int,
    device: torch.device | str,
    *,
    gauge: MemoryGauge | None = None,
    headroom: float = 0.85,
    max_rows: int = 64,
    ceiling: int = 32_768,
    fallback: int = 16_384,
    probe_rows: int = 4,
    log: Callable[[str], None] = print,
    run_batch: Callable[[np.ndarray], bool] | None = None,
    reserve: int = 0,
) -> TokenBudget:
    """Padded tokens per batch that fit ``model`` on ``device``, measured on the longest of ``rows``.

    Call it right after loading, before scoring: it runs a few forwards of ``rows`` (their probabilities are
    discarded). Steps, each stated through ``log``:

    1. the longest row alone: it must fit (else :class:`MemoryBudgetError`, naming the length and the limit);
    2. ``min(probe_rows, max_rows)`` of the longest rows, when the first probe says they fit: activation bytes
       per padded token = (peak - static) / padded tokens;
    3. budget = (limit - static) x ``headroom`` / bytes per token, capped at ``ceiling`` (where larger batches
       stop paying, not a memory figure: 16.7k tokens/s at 16,384, 16.9k at 32,768, docs/facts.md §7) and at
       ``max_rows x longest`` (a batch never holds more rows), floored at one longest row;
    4. confirmation: the batches of ``rows`` under that budget that are heaviest in each way are run: the
       longest rows (the most bytes per token), and the batch with the most padded tokens (shorter rows packed
       closer to the budget). On out-of-memory the budget is halved, but not below the largest batch already
       seen to fit, and confirmed again.

    Without ``gauge`` a CUDA device is read by :class:`CudaGauge`; any other device returns ``fallback`` with
    the reason. The budget holds for rows up to the longest probed: probe with the longest rows to be scored.

    ``run_batch(idx)`` runs rows ``idx`` as one batch and says whether it fitted (out of memory: False, its memory
    freed); by default the engine's :func:`~kaggle_utils.scoring.predict.score_batch` of ``model`` on ``rows``.
    Training passes a forward and backward of its own micro-batch (``rows`` is then only counted).
    ``reserve`` bytes are taken off the limit for what no probed batch holds yet (training: the optimiser's state,
    allocated at the first step).
    """
    lengths = _check_probe_inputs(rows, lengths, headroom, max_rows, ceiling, fallback, reserve, probe_rows)
    device = torch.device(device)
    if gauge is None:
        if device.type != "cuda":
            return TokenBudget(str(device), fallback, f"fallback: no GPU memory to measure on {device.type}")
        gauge = CudaGauge(device)
    if len(rows) == 0:
        return TokenBudget(str(device), fallback, "fallback: no rows to probe with")
    if run_batch is None:
        run_batch = _score_batch_runner(model, rows, pad_id, device)

    probe = _Probe(str(device), lengths, gauge, run_batch, log, fallback=fallback, headroom=headroom)
    probe.measure_static(reserve)
    probe.measure_per_token(probe_rows, max_rows)  # steps 1 and 2
    tokens, why = probe.first_budget(ceiling, max_rows)  # step 3
    probe.confirm(tokens, why, max_rows)  # step 4: sets budget.tokens and budget.reason
    log(probe.budget.describe())
    return probe.budget


def _check_probe_inputs(
    rows: list[list[int]],
    lengths: np.ndarray,
    headroom: float,
    max_rows: int,
    ceiling: int,
    fallback: int,
    reserve: int,
    probe_rows: int,
) -> np.ndarray:
    """``lengths`` as int64, one per row; settings no probe can run with are refused, naming their valid range."""
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom={headroom} must be in (0, 1]")
    for name, value in (("max_rows", max_rows), ("ceiling", ceiling), ("fallback", fallback)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if reserve < 0:
        raise ValueError(f"reserve={reserve} must be >= 0")
    if probe_rows < 2:
        raise ValueError(f"probe_rows={probe_rows} must be at least 2 (one row alone is probed first anyway)")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(lengths)} lengths")
    return lengths


def _score_batch_runner(
    model, rows: list[list[int]], pad_id: int, device: torch.device
) -> Callable[[np.ndarray], bool]:
    """The default ``run_batch``: the engine's own :func:`score_batch` of ``model`` on rows ``idx``; did it fit?"""

    def run_batch(idx: np.ndarray) -> bool:
        stats: dict[str, int] = {}
        # score_batch splits a batch that runs out of memory and counts the splits in ``stats``: any count
        # means this batch, as a whole, did not fit. (Its other counters, rows with non-finite fp16 logits
        # rescored alone in fp32, say nothing about the batch's fit; their fp32 peak only makes this one larger.)
        score_batch(model, rows, idx, pad_id, device, stats)
        return not (stats.get("oom_splits") or stats.get("oom_rows"))

    return run_batch


class _Probe:
    """One probe's state: the rows' lengths (longest first), the batch shapes run so far, the budget being filled."""

    def __init__(
        self,
        where: str,
        lengths: np.ndarray,
        gauge: MemoryGauge,
        run_batch: Callable[[np.ndarray], bool],
        log: Callable[[str], None],
        *,
        fallback: int,
        headroom: float,
    ) -> None:
        self.where, self.lengths, self.gauge, self.run_batch, self.log = where, lengths, gauge, run_batch, log
        self.order = np.argsort(-lengths, kind="stable")
        self.longest = int(lengths[self.order[0]])
        self.budget = TokenBudget(where, fallback, "", longest=self.longest, headroom=headroom)
        self.fitted: dict[tuple[int, int], bool] = {}  # (rows, padded width) -> whether that batch shape fitted

    def longest_rows(self, n: int) -> np.ndarray:
        """The ``n`` longest rows (cycled when there are fewer): padded to ``longest``, like the first batch."""
        return self.order[np.arange(n) % len(self.order)]

    def fits(self, idx: np.ndarray, what: str) -> bool:
        """Run ``idx`` as one batch through ``run_batch`` (once per batch shape): did it fit?"""
        shape = (len(idx), int(self.lengths[idx].max()))
        if shape in self.fitted:
            return self.fitted[shape]
        padded, budget = shape[0] * shape[1], self.budget
        self.gauge.reset_peak()
        t0 = time.monotonic()
        ok, peak = self.run_batch(idx), self.gauge.peak()
        self.fitted[shape] = ok
        budget.probes.append((padded, peak, ok))
        head = f"{self.where}: {what}: {shape[0]} x {shape[1]:,} = {padded:,} padded tokens"
        if ok:
            budget.peak = max(budget.peak, peak)
            self.log(
                f"{head} fit, peak {peak / GiB:.2f} of {budget.limit / GiB:.2f} GiB ({time.monotonic() - t0:.1f} s)"
            )
        else:
            self.gauge.clear()
            self.log(f"{head} ran out of memory")
        return ok

    def measure_static(self, reserve: int) -> None:
        """The limit (less ``reserve``) and the bytes held after load, before any batch; stated through ``log``."""
        budget = self.budget
        self.gauge.clear()
        budget.limit, budget.static = self.gauge.limit() - reserve, self.gauge.allocated()
        allocator = ""
        if isinstance(self.gauge, CudaGauge):
            allocator = (
                "; expandable segments" if expandable_segments() else "; fixed segments (fragmentation: headroom)"
            )
        if reserve:
            allocator += f"; {reserve / GiB:.2f} GiB of the limit kept for the optimiser's state"
        self.log(
            f"{self.where}: {budget.limit / GiB:.2f} GiB limit, {budget.static / GiB:.2f} GiB held after load"
            f"{allocator}; probing with the longest rows ({self.longest:,} tokens)"
        )

    def measure_per_token(self, probe_rows: int, max_rows: int) -> None:
        """Steps 1 and 2: the longest row alone must fit; then a few longest rows give ``budget.bytes_per_token``."""
        budget, longest = self.budget, self.longest
        if budget.limit <= budget.static or not self.fits(self.longest_rows(1), "longest row alone"):
            raise MemoryBudgetError(_too_long(budget))
        # what the first forward keeps (cuBLAS workspace, lazily built buffers) is no longer free for batches
        budget.static = max(budget.static, self.gauge.allocated())
        free = budget.limit - budget.static
        spare = free * budget.headroom
        per_token = max(budget.probes[0][1] - budget.static, 1) / longest
        # one row's cost includes every forward's fixed share (dequantised weight tiles, workspaces), so it
        # over-estimates a row in a batch: k rows predicted by it fit if memory grows linearly with the rows
        k = min(probe_rows, max_rows, int(spare // (per_token * longest)))
        if k >= 2:
            if self.fits(self.longest_rows(k), "probe"):
                per_token = max(budget.probes[-1][1] - budget.static, 1) / (k * longest)
            else:
                # memory grew faster than the rows: k rows cost more than all that was free
                per_token = max(per_token, free / (k * longest))
        # Bytes per padded token measured at the longest length are the worst per token: attention's share grows
        # with the length (quadratically with eager attention), so batches of shorter rows under the same token
        # budget take less per token. The fixed per-forward share averaged into ``per_token`` makes larger
        # batches cheaper per token too. Both err on the side of fitting.
        budget.bytes_per_token = per_token

    def first_budget(self, ceiling: int, max_rows: int) -> tuple[int, str]:
        """Step 3: the padded tokens the measured cost per token fits in the headroom, capped and floored; and why."""
        budget, longest = self.budget, self.longest
        spare = (budget.limit - budget.static) * budget.headroom
        tokens, why = min(
            (int(spare / budget.bytes_per_token), "set by memory"),
            (ceiling, f"capped at ceiling={ceiling:,}"),
            (max_rows * longest, f"capped at max_rows={max_rows} x {longest:,}"),
        )
        if tokens < longest:
            tokens, why = longest, "one longest row per batch"
        self.log(f"{self.where}: budget {tokens:,} padded tokens ({why}); confirming on the heaviest batches")
        return tokens, why

    def confirmed(self, tokens: int, max_rows: int) -> bool:
        """Whether the heaviest batches of ``rows`` under ``tokens`` fit: the longest rows, the most tokens."""
        lengths, longest = self.lengths, self.longest
        n = max(1, min(max_rows, tokens // longest))
        if not self.fits(self.longest_rows(n), "confirm, longest rows"):
            return False
        # the engine's own plan of these rows: its fullest batch packs more, shorter rows closer to the budget.
        # Run it even when its padded tokens are no more than the longest rows': other tensor shapes fragment the
        # caching allocator differently (H200 capped at 15 GiB, fixed segments: 62 x 714 tokens ran out of memory
        # right after 17 x 2,500 fit, with 0.3 GiB more allocated). Only a batch of no more rows is surely lighter.
        fullest = max(token_budget_batches(lengths, tokens, max_rows), key=lambda b: len(b) * int(lengths[b].max()))
        return len(fullest) <= n or self.fits(fullest, "confirm, most tokens")

    def confirm(self, tokens: int, why: str, max_rows: int) -> None:
        """Step 4: lower ``tokens`` until :meth:`confirmed`; the result goes to ``budget.tokens`` and ``.reason``."""
        longest, lowered = self.longest, 0
        while not self.confirmed(tokens, max_rows):
            if tokens == longest:  # the floor: one longest row per batch, which fitted alone in step 1
                why += "; shorter rows packed to this budget ran out of memory (score_batch will split them)"
                break
            # halve, but not below a batch already seen to fit: it is confirmed again at the smaller budget
            seen = [t for t, _, ok in self.budget.probes if ok and t < tokens]
            tokens, lowered = max(longest, tokens // 2, *seen), lowered + 1
            self.log(f"{self.where}: out of memory at the chosen budget; lowered to {tokens:,} padded tokens")
        self.budget.tokens = tokens
        self.budget.reason = f"{why}, lowered {lowered}x after out-of-memory" if lowered else why


def _too_long(budget: TokenBudget) -> str:
    return (
        f"{budget.device}: the longest row alone ({budget.longest:,} tokens) does not fit in memory: "
        f"{budget.limit / GiB:.2f} GiB limit, {budget.static / GiB:.2f} GiB held by the model after load. "
        "Use a shorter max_length (InputConfig.max_length) or split the model's layers over two devices."
    )
