"""kaggle_utils.scoring.memory: the token budget from free memory, probed on the longest rows.

A fake device (gauge) and a fake classifier whose activations grow with rows x length (plus length^2 for the
"eager attention" variant) stand in for a GPU; the fake raises ``torch.OutOfMemoryError`` above its true limit,
so the probe runs through the engine's real ``score_batch`` / ``pad`` path and sees real out-of-memory splits.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kaggle_utils.inputs.batching import token_budget_batches
from kaggle_utils.scoring import predict
from kaggle_utils.scoring.memory import (
    CudaGauge,
    GiB,
    MemoryBudgetError,
    MiB,
    TokenBudget,
    expandable_segments,
    probe_token_budget,
    shared_token_budget,
)
from kaggle_utils.scoring.predict import score_batch

LONGEST = 2500


class FakeGauge:
    """A device with ``static`` bytes held after load; ``limit`` is what it reports, ``true_limit`` what it has."""

    def __init__(self, limit: float, static: float, true_limit: float | None = None) -> None:
        self.reported = int(limit)
        self.true_limit = int(limit if true_limit is None else true_limit)
        self.current = int(static)
        self.high = self.current
        self.clears = 0

    def limit(self) -> int:
        return self.reported

    def allocated(self) -> int:
        return self.current

    def reserved(self) -> int:
        return self.current

    def reset_peak(self) -> None:
        self.high = self.current

    def peak(self) -> int:
        return self.high

    def clear(self) -> None:
        self.clears += 1

    def use(self, nbytes: float) -> None:
        """A forward's activations, freed when it returns."""
        if self.current + nbytes > self.true_limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes / MiB:.0f} MiB")
        self.high = max(self.high, self.current + int(nbytes))


class FakeClassifier:
    """Activation bytes of a (B, T) padded batch: ``fixed + B * (per_token * T + per_token_sq * T^2)``."""

    def __init__(self, gauge: FakeGauge, per_token: float, fixed: float = 0.0, per_token_sq: float = 0.0) -> None:
        self.gauge, self.per_token, self.fixed, self.per_token_sq = gauge, per_token, fixed, per_token_sq
        self.calls: list[tuple[int, int]] = []
        self.logit = 0.0  # NaN: the fp16 overflow that score_batch rescores in fp32

    def batch_bytes(self, b: int, t: int) -> float:
        return self.fixed + b * (self.per_token * t + self.per_token_sq * t * t)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        self.calls.append((b, t))
        self.gauge.use(self.batch_bytes(b, t))
        return SimpleNamespace(logits=torch.full((b, 2), self.logit))


def make_rows(n: int = 120, seed: int = 0) -> tuple[list[list[int]], np.ndarray]:
    """Rows of 100..LONGEST tokens, a few of them at LONGEST (truncated rows, as at max_length)."""
    lengths = np.random.default_rng(seed).integers(100, LONGEST, size=n)
    lengths[[0, n // 4, n // 2, 3 * n // 4, n - 1]] = LONGEST
    return [[1] * int(length) for length in lengths], lengths


def probe(model: FakeClassifier, rows, lengths, **kwargs) -> TokenBudget:
    kwargs.setdefault("log", lambda line: None)
    return probe_token_budget(model, rows, lengths, 0, "cpu", gauge=model.gauge, **kwargs)


def assert_every_batch_fits(model: FakeClassifier, rows, lengths, budget: TokenBudget, max_rows: int = 64) -> None:
    """Score all rows in batches under the budget, as the engine does: no batch may run out of memory."""
    stats: dict[str, int] = {}
    for idx in token_budget_batches(lengths, budget.tokens, max_rows):
        score_batch(model, rows, idx, 0, "cpu", stats)
    assert stats == {}, f"batches under {budget.tokens:,} tokens ran out of memory: {stats}"


# Qwen2.5-14B-like on a T4: 8 GiB after load, 15 GiB limit, 0.5 MiB per padded token, 150 MiB per forward
STATIC, LIMIT, PER_TOKEN, FIXED = 8 * GiB, 15 * GiB, 0.5 * MiB, 150 * MiB


def test_budget_fits_and_is_near_the_true_maximum() -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN, FIXED)
    budget = probe(model, rows, lengths, headroom=0.85)
    # the most padded tokens of LONGEST rows that fit at all
    true_max = (LIMIT - STATIC - FIXED) / PER_TOKEN
    # the headroom, and the fixed share averaged into the per-token cost, cost at most 5% more than 0.85
    assert 0.85 * 0.95 * true_max <= budget.tokens <= 0.85 * true_max
    # the probes: the longest row alone, then 4 of the longest rows, both padded to LONGEST; 4 rows are also
    # what the budget allows of the longest rows, so that batch is not run again; then the plan's fullest
    # batch, shorter rows packed close to the budget
    assert model.calls[:2] == [(1, LONGEST), (4, LONGEST)] and len(model.calls) == 3
    rows_, width = model.calls[2]
    assert 4 * LONGEST < rows_ * width <= budget.tokens and width < LONGEST
    assert [ok for _, _, ok in budget.probes] == [True, True, True]
    assert budget.tokens // LONGEST == 4 and budget.reason == "set by memory"
    assert budget.bytes_per_token == pytest.approx((FIXED + 4 * LONGEST * PER_TOKEN) / (4 * LONGEST))
    assert (budget.limit, budget.static, budget.longest) == (LIMIT, STATIC, LONGEST)
    # the fullest batch is the heaviest here (memory linear in padded tokens): the reason to confirm it too
    assert budget.peak == STATIC + model.batch_bytes(rows_, width) > STATIC + model.batch_bytes(4, LONGEST)
    assert_every_batch_fits(model, rows, lengths, budget)


def test_overflowing_rows_are_not_taken_for_out_of_memory(monkeypatch) -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN, FIXED)
    model.logit = float("nan")
    sent = []

    def rescore(model, rows, pad_id, device, stats=None):
        """score_logits's fp32 rescoring of non-finite rows, reduced to its counters (the real one is slow here)."""
        sent.append(len(rows))
        stats["overflow_rows"] = stats.get("overflow_rows", 0) + len(rows)
        return np.zeros((len(rows), 2), dtype=np.float32)

    monkeypatch.setattr(predict, "logits_in_fp32", rescore)
    budget = probe(model, rows, lengths)
    assert sent and all(ok for _, _, ok in budget.probes) and budget.tokens // LONGEST == 4


def test_confirmation_batch_runs_at_the_chosen_budget() -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN, FIXED)
    budget = probe(model, rows, lengths, probe_rows=2)
    # probed with 2 rows, the budget allows 4 of the longest rows: that batch, and the plan's fullest one, are
    # run before scoring starts
    assert model.calls[:3] == [(1, LONGEST), (2, LONGEST), (4, LONGEST)] and len(model.calls) == 4
    assert budget.probes[2] == (4 * LONGEST, STATIC + model.batch_bytes(4, LONGEST), True)
    padded, _, ok = budget.probes[3]
    assert ok and 4 * LONGEST < padded <= budget.tokens
    assert_every_batch_fits(model, rows, lengths, budget)


def test_a_lower_limit_gives_a_lower_budget() -> None:
    rows, lengths = make_rows()
    budgets = [
        probe(FakeClassifier(FakeGauge(limit, STATIC), PER_TOKEN, FIXED), rows, lengths) for limit in (12 * GiB, LIMIT)
    ]
    low, high = (b.tokens for b in budgets)
    assert low < high
    # the memory left after load is 4 GiB against 7 GiB
    assert low / high == pytest.approx(4 / 7, rel=0.1)


@pytest.mark.parametrize("headroom", [0.5, 0.85, 1.0])
def test_headroom_is_applied(headroom: float) -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN)  # no fixed share: per token is exact
    budget = probe(model, rows, lengths, headroom=headroom)
    assert budget.bytes_per_token == pytest.approx(PER_TOKEN)
    assert budget.tokens == int(headroom * (LIMIT - STATIC) / PER_TOKEN)
    assert f"x{headroom:g} headroom" in budget.describe()
    assert_every_batch_fits(model, rows, lengths, budget)


def test_out_of_memory_on_the_confirmation_halves_the_budget() -> None:
    rows, lengths = make_rows()
    # the device reports 15 GiB but only 12 GiB can be had (another process holds the rest)
    gauge = FakeGauge(LIMIT, STATIC, true_limit=12 * GiB)
    model = FakeClassifier(gauge, PER_TOKEN, FIXED)
    lines: list[str] = []
    budget = probe(model, rows, lengths, probe_rows=2, log=lines.append)
    first = int(0.85 * (LIMIT - STATIC) / ((FIXED + 2 * LONGEST * PER_TOKEN) / (2 * LONGEST)))
    # 4 of the longest rows ran out of memory (score_batch split them and scored the halves); halved, the
    # budget allows 2 of them, seen to fit in the probe, and its fullest batch of shorter rows fits too
    assert [ok for _, _, ok in budget.probes] == [True, True, False, True]
    assert budget.probes[2][0] == (first // LONGEST) * LONGEST == 4 * LONGEST
    assert budget.tokens == first // 2
    assert budget.reason == "set by memory, lowered 1x after out-of-memory"
    assert gauge.clears == 2  # once before probing, once after the failed batch
    assert any(f"lowered to {first // 2:,} padded tokens" in line for line in lines)
    assert_every_batch_fits(model, rows, lengths, budget)


def test_a_probe_batch_that_runs_out_of_memory_still_leads_to_a_budget_that_fits() -> None:
    rows, lengths = make_rows()
    gauge = FakeGauge(LIMIT, STATIC, true_limit=12 * GiB)
    model = FakeClassifier(gauge, PER_TOKEN, FIXED)
    budget = probe(model, rows, lengths, probe_rows=4)
    # 4 rows predicted to fit by the one-row probe did not: the cost is taken as at least free / (4 x LONGEST)
    assert budget.probes[1] == (4 * LONGEST, budget.probes[1][1], False)
    assert budget.bytes_per_token == pytest.approx((LIMIT - STATIC) / (4 * LONGEST))
    # budgeted at 8,500 tokens: 3 of the longest rows fit, but 8,500 tokens of shorter rows do not fit the
    # 12 GiB the device really has; halving would give 4,250, so the 7,500 tokens seen to fit are kept
    assert [(t, ok) for t, _, ok in budget.probes[2:]] == [(3 * LONGEST, True), (budget.probes[3][0], False)]
    assert 3 * LONGEST < budget.probes[3][0] <= 8500
    assert budget.tokens == 3 * LONGEST and budget.reason == "set by memory, lowered 1x after out-of-memory"
    assert_every_batch_fits(model, rows, lengths, budget)


def test_eager_attention_budget_is_conservative_for_shorter_rows() -> None:
    rows, lengths = make_rows()
    gauge = FakeGauge(LIMIT, STATIC)
    # attention's share grows with length^2: at LONGEST it is 4/5 of a token's cost, at 500 tokens 4/9
    model = FakeClassifier(gauge, 0.1 * MiB, FIXED, per_token_sq=0.4 * MiB / LONGEST)
    budget = probe(model, rows, lengths)
    assert budget.bytes_per_token == pytest.approx(model.batch_bytes(4, LONGEST) / (4 * LONGEST))
    for idx in token_budget_batches(lengths, budget.tokens, 64):
        gauge.reset_peak()
        score_batch(model, rows, idx, 0, "cpu")
        padded = len(idx) * int(lengths[idx].max())
        # every batch fits within the headroom, and shorter rows take less per padded token than measured
        assert gauge.peak() - STATIC <= 0.85 * (LIMIT - STATIC)
        assert (gauge.peak() - STATIC) / padded <= budget.bytes_per_token


def test_caps_and_the_floor() -> None:
    rows, lengths = make_rows()

    def fresh(limit=LIMIT, static=STATIC):
        return FakeClassifier(FakeGauge(limit, static), PER_TOKEN, FIXED)

    capped = probe(fresh(), rows, lengths, ceiling=6000)
    assert (capped.tokens, capped.reason) == (6000, "capped at ceiling=6,000")
    few_rows = probe(fresh(), rows, lengths, max_rows=3)
    assert (few_rows.tokens, few_rows.reason) == (3 * LONGEST, f"capped at max_rows=3 x {LONGEST:,}")
    # room for 0.85 x 1.5 GiB: less than the longest row's 1.37 GiB, which fits without the headroom
    model = fresh(limit=STATIC + 1.5 * GiB)
    floor = probe(model, rows, lengths)
    assert (floor.tokens, floor.reason) == (LONGEST, "one longest row per batch")
    # the one-row probe is the confirmation: no batch of these rows under 2,500 tokens has more padded tokens
    assert model.calls == [(1, LONGEST)]


def test_the_longest_row_that_does_not_fit_alone_is_a_clear_error() -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, 14.5 * GiB), PER_TOKEN, FIXED)
    with pytest.raises(MemoryBudgetError) as err:
        probe(model, rows, lengths)
    message = str(err.value)
    for part in ("longest row alone (2,500 tokens)", "15.00 GiB limit", "14.50 GiB held", "max_length", "layers"):
        assert part in message
    # a model that leaves nothing at all for activations fails before any forward
    model = FakeClassifier(FakeGauge(LIMIT, LIMIT), PER_TOKEN)
    with pytest.raises(MemoryBudgetError, match="does not fit in memory"):
        probe(model, rows, lengths)
    assert model.calls == []


def test_cpu_returns_the_fallback_with_a_reason() -> None:
    rows, lengths = make_rows()
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN)
    budget = probe_token_budget(model, rows, lengths, 0, "cpu", fallback=12_288)
    assert (budget.tokens, budget.measured, model.calls) == (12_288, False, [])
    assert "cpu" in budget.reason and "fallback" in budget.reason
    assert budget.describe() == f"cpu: 12,288 padded tokens per batch ({budget.reason})"
    empty = probe(model, [], np.zeros(0, dtype=int), fallback=4096)
    assert (empty.tokens, empty.reason) == (4096, "fallback: no rows to probe with")


def test_fewer_rows_than_a_batch_are_cycled() -> None:
    rows, lengths = [[1] * 300, [1] * 200], np.array([300, 200])
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN)
    budget = probe(model, rows, lengths, max_rows=8)
    assert model.calls == [(1, 300), (4, 300), (8, 300)]
    assert (budget.tokens, budget.probes[-1][2]) == (8 * 300, True)


def test_describe_is_one_line() -> None:
    budget = TokenBudget(
        "cuda:0", 9216, "set by memory", 0.63 * MiB, 2500, int(14.9 * GiB), int(8.1 * GiB), int(14 * GiB), 0.85
    )
    assert budget.describe() == (
        "cuda:0: 9,216 padded tokens per batch: 14.9 GiB limit, 8.1 GiB weights, 0.63 MiB per token at "
        "2,500 tokens, x0.85 headroom (set by memory)"
    )


def test_shared_budget_is_the_smallest() -> None:
    budgets = [TokenBudget("cuda:0", 9216, "set by memory"), TokenBudget("cuda:1", 7000, "set by memory")]
    assert shared_token_budget(budgets) == 7000
    with pytest.raises(ValueError):
        shared_token_budget([])


def test_arguments_are_checked() -> None:
    rows, lengths = make_rows(10)
    model = FakeClassifier(FakeGauge(LIMIT, STATIC), PER_TOKEN)
    for bad in ({"headroom": 0}, {"headroom": 1.2}, {"max_rows": 0}, {"probe_rows": 1}):
        with pytest.raises(ValueError):
            probe(model, rows, lengths, **bad)
    with pytest.raises(ValueError, match="10 rows but 9 lengths"):
        probe(model, rows, lengths[:9])


def fake_cuda(monkeypatch, total: float, fraction: float | None, free: float, reserved: float) -> None:
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=int(total)))
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: (int(free), int(total)))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: int(reserved))
    if fraction is None:
        monkeypatch.delattr(cuda, "get_per_process_memory_fraction", raising=False)
    else:
        monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: fraction)


def test_cuda_gauge_limit_is_the_fraction_or_what_the_device_has_left(monkeypatch) -> None:
    gauge = CudaGauge("cuda:1")
    assert gauge.device == torch.device("cuda", 1)
    # a 16 GiB device capped at 0.9: the cap binds while the device has more free
    fake_cuda(monkeypatch, 16 * GiB, 0.9, free=12 * GiB, reserved=3 * GiB)
    assert gauge.limit() == int(16 * GiB * 0.9)
    # another process holds memory: free + what our allocator already reserved binds
    fake_cuda(monkeypatch, 16 * GiB, 0.9, free=6 * GiB, reserved=3 * GiB)
    assert gauge.limit() == 9 * GiB
    # a torch without get_per_process_memory_fraction: no cap beyond the device
    fake_cuda(monkeypatch, 16 * GiB, None, free=15 * GiB, reserved=0.5 * GiB)
    assert gauge.fraction() == 1.0 and gauge.limit() == int(15.5 * GiB)
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGauge("cpu")


@pytest.mark.parametrize(
    ("cuda_conf", "conf", "expected"),
    [
        (None, None, False),
        ("expandable_segments:True", None, True),
        ("max_split_size_mb:512, expandable_segments:true", None, True),
        (None, "expandable_segments:True", True),
        ("expandable_segments:False", None, False),
    ],
)
def test_expandable_segments_is_read_from_either_variable(monkeypatch, cuda_conf, conf, expected) -> None:
    for name, value in (("PYTORCH_CUDA_ALLOC_CONF", cuda_conf), ("PYTORCH_ALLOC_CONF", conf)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert expandable_segments() is expected
