"""kaggle_utils.scoring.planner on a simulated clock: a fake model whose batches take a known
``a * padded + b * sum(len^2) + c`` seconds (times seeded noise), run by an executor that re-plans before every
batch the way the infer stage is meant to (two devices, one shared queue, the cascade's passes in run order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from kaggle_utils.scoring.budget import RateMeter
from kaggle_utils.scoring.planner import (
    CostModel,
    PassWork,
    Plan,
    batch_features,
    nnls_normal,
    plan_cascade,
    project_run,
    rehearsal_report,
    synthetic_lengths,
)
from kaggle_utils.scoring.predict import plan_batches

# The 2xT4 recipe's batching (kaggle_utils/recipes/infer-cascade-2xt4.toml).
BATCH_TOKENS, MAX_ROWS, MAX_LENGTH = 8192, 32, 2500


@dataclass
class Law:
    """The simulated truth for one model on one device: seconds of a batch and of a load."""

    # seconds per padded token: ~600 tokens/s, Qwen2.5-14B's order on one T4
    a: float = 1 / 600
    # seconds per squared row length: b/a = 6e-5, about twice the FLOP ratio (3.3e-5, attention kernels run below
    # the GEMMs' efficiency), so attention is 13% of a 2,500-token row and 20% of a 4,096-token one
    b: float = 6e-5 / 600
    # seconds per batch
    c: float = 0.05
    # wall seconds of loading the model (both copies)
    load: float = 60.0
    # sigma of the multiplicative lognormal noise per batch
    noise: float = 0.03
    # each device's first batch takes this many times its law (kernel selection, allocator warm-up)
    first_factor: float = 1.0

    def exact(self, lengths: np.ndarray) -> float:
        lengths = np.asarray(lengths, dtype=np.float64)
        return self.a * len(lengths) * lengths.max() + self.b * (lengths**2).sum() + self.c

    def seconds(self, lengths: np.ndarray, rng: np.random.Generator, first: bool) -> float:
        return self.exact(lengths) * rng.lognormal(0.0, self.noise) * (self.first_factor if first else 1.0)


def measured_batches(law: Law, lengths: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    """(row lengths, seconds) of every batch of a length-sorted pass over ``lengths``, as a rehearsal records."""
    rng = np.random.default_rng(seed)
    return [(lengths[b], law.seconds(lengths[b], rng, i == 0)) for i, b in enumerate(plan_batches(lengths, 8192, 32))]


def fitted(law: Law, lengths: np.ndarray, **kw) -> CostModel:
    model = CostModel.from_rate(1000.0, **kw)  # a wrong prior on purpose: the fit must replace it
    for row_lengths, seconds in measured_batches(law, lengths):
        model.add(row_lengths, seconds)
    return model


# --- the cost model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_factor", [1.0, 20.0], ids=["steady", "slow-first-batch"])
def test_fit_recovers_a_and_b(first_factor: float) -> None:
    law = Law(first_factor=first_factor)
    model = fitted(law, synthetic_lengths(3000, 4096, seed=1), warmup=1)
    a, b, c = model.coefficients()
    # 3% noise on ~500 batches: a within 3%, b (a 10-20% share of each batch) within 15%
    assert model.fitted and a == pytest.approx(law.a, rel=0.03) and b == pytest.approx(law.b, rel=0.15)
    assert c >= 0
    if first_factor > 1:
        assert model.warmup_seconds and model.warmup_seconds[0] > 10 * law.exact(np.full(2, 4096))


def test_quadratic_term_matters() -> None:
    """Fitted on the same batches, a tokens-only rate (today's RateMeter) under-projects long rows and
    over-projects short ones; the cost model with attention's len^2 term gets both right."""
    law = Law(noise=0.02)
    mix = synthetic_lengths(3000, 4096, seed=2)
    model, rate = fitted(law, mix), RateMeter(safety=1.0)
    for row_lengths, seconds in measured_batches(law, mix):
        rate.add(len(row_lengths) * int(row_lengths.max()), seconds)
    errors = {}
    for length in (4096, 300):
        n = BATCH_TOKENS // length
        batches = [np.full(n, length)] * 20
        truth = sum(law.exact(b) for b in batches)
        quadratic = model.predict(batches).sum() / model.safety
        linear = rate.estimate(20 * n * length)
        errors[length] = (quadratic / truth - 1, linear / truth - 1)
    assert abs(errors[4096][0]) < 0.02 and abs(errors[300][0]) < 0.02
    assert errors[4096][1] < -0.10  # the linear rate promises 4,096-token rows >10% faster than they run
    assert errors[300][1] > 0.05


def test_prior_before_the_fit_then_the_fit() -> None:
    model = CostModel.from_rate(500.0, attention_ratio=1e-4, per_batch=0.1, prior_safety=1.5, warmup=0, min_fit=8)
    batch = [np.full(4, 1000)]
    prior_seconds = 4000 / 500 + 4 * 1000**2 * 1e-4 / 500 + 0.1
    assert model.predict(batch)[0] == pytest.approx(1.5 * prior_seconds)
    # the first measurements rescale the prior: batches running twice as slow double its projections
    for _ in range(3):
        model.add(batch[0], 2 * prior_seconds)
    assert not model.fitted and model.predict(batch)[0] == pytest.approx(1.5 * 2 * prior_seconds)
    # from min_fit batches on, the least-squares fit with its own (smaller) safety factor
    rng = np.random.default_rng(0)
    law = Law(noise=0.0)
    for _ in range(8):
        row_lengths = rng.integers(100, 2500, size=4)
        model.add(row_lengths, law.exact(row_lengths))
    assert model.fitted
    assert model.predict(batch)[0] != pytest.approx(1.5 * 2 * prior_seconds)


def test_warmup_batches_stay_out_of_the_fit() -> None:
    model = CostModel.from_rate(500.0, warmup=2)
    before = model.coefficients().copy()
    model.add([1000, 1000], 500.0)
    model.add([1000, 1000], 400.0)
    assert model.warmup_seconds == [500.0, 400.0] and model.n_fit == 0
    np.testing.assert_array_equal(model.coefficients(), before)
    model.add([1000, 1000], 2.0)  # the prior says 4 s
    assert model.n_fit == 1 and model.coefficients()[0] == pytest.approx(before[0] / 2)


def test_predict_and_load_estimate() -> None:
    model = CostModel(per_token=0.001, per_token2=1e-7, per_batch=0.5, load_seconds=100, prior_safety=1.2)
    seconds = model.predict([[10, 20], [300]])
    np.testing.assert_allclose(seconds, 1.2 * np.array([0.04 + 5e-5 + 0.5, 0.3 + 9e-3 + 0.5]))
    assert model.load_estimate() == pytest.approx(150.0)
    model.record_load(40.0)
    assert model.load_estimate() == pytest.approx(60.0)


def test_nnls_meets_the_optimality_conditions() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0.5, 2.0, size=(50, 3))  # (M, 3)
    for truth in ([1.0, 0.0, 2.0], [1.0, -0.5, 0.3], [-1.0, -1.0, -1.0]):
        y = x @ np.array(truth) + rng.normal(0, 0.01, 50)  # (M,)
        w = nnls_normal(x.T @ x, x.T @ y)
        gradient = x.T @ (x @ w - y)  # (3,)
        # KKT: w >= 0, gradient 0 on the support and >= 0 off it
        assert (w >= 0).all()
        np.testing.assert_allclose(gradient[w > 0], 0.0, atol=1e-6)
        assert (gradient[w == 0] >= -1e-6).all()
    w = nnls_normal(x.T @ x, x.T @ (x @ np.array([1.0, 0.0, 2.0])))
    np.testing.assert_allclose(w, [1.0, 0.0, 2.0], atol=1e-9)


def test_batch_features() -> None:
    lengths = np.array([5, 3, 4, 10])
    features = batch_features(lengths, [np.array([0, 1, 2]), np.array([3])])
    np.testing.assert_array_equal(features, [[15, 50, 1], [10, 100, 1]])


# --- the plan -------------------------------------------------------------------------------------------------


def cascade_work(n: int = 1500, seed: int = 0, priors: dict[str, Law] | None = None) -> dict[str, PassWork]:
    """The three passes over ``n`` synthetic rows: the primary on all, the secondary on every row by a random
    uncertainty, the primary's swapped view on the least certain 30%; secondary and TTA interleaved by margin."""
    priors = priors or {"primary": Law(), "secondary": Law(a=1 / 1000, b=6e-5 / 1000, load=40.0)}
    lengths = synthetic_lengths(n, MAX_LENGTH, seed=seed)
    margin = np.random.default_rng(seed).uniform(0, 0.5, n)  # (n,) |p_a - 0.5| of the primary
    order = np.argsort(margin, kind="stable")  # least certain first
    models = {
        role: CostModel(per_token=law.a, per_token2=law.b, per_batch=law.c, load_seconds=law.load)
        for role, law in priors.items()
    }
    m = int(0.3 * n)
    build = dict(batch_tokens=BATCH_TOKENS, max_rows=MAX_ROWS)
    return {
        "primary": PassWork.build(lengths, models["primary"], prioritized=False, needs_load=True, **build),
        "tta": PassWork.build(lengths[order[:m]], models["primary"], keys=margin[order[:m]], **build),
        "secondary": PassWork.build(lengths[order], models["secondary"], keys=margin[order], needs_load=True, **build),
    }


RUN_ORDER = ("primary", "tta", "secondary")  # the swapped view runs while the primary is still loaded


@dataclass
class Outcome:
    # simulated seconds at which the last batch ended
    finish: float
    # rows scored per pass
    rows: dict[str, int]
    # every plan made, in order, with the pass it was made in and how many of its batches had started
    plans: list[tuple[str, int, Plan]] = field(default_factory=list)


def run_on_simulated_clock(
    work: dict[str, PassWork],
    laws: dict[str, Law],
    deadline: float,
    reserve: float,
    devices: int = 2,
    replan: bool = True,
    seed: int = 0,
) -> Outcome:
    """Execute the cascade batch by batch: before each batch, plan the work left from the time left and run the
    batch only if the plan still holds it. ``replan=False`` keeps the first plan's shares instead (no feedback).
    A batch's seconds reach its cost model only when it ends, as on a real device."""
    rng = np.random.default_rng(seed)
    now, pending, out = 0.0, [], Outcome(0.0, dict.fromkeys(RUN_ORDER, 0))
    limits: dict[str, int] | None = None
    for p, role in enumerate(RUN_ORDER):
        w, law, loaded = work[role], laws["secondary" if role == "secondary" else "primary"], False
        free, projected_end, started = np.full(devices, now), np.full(devices, now), 0
        while started < len(w):
            device = int(np.argmin(free))
            now = max(now, free[device])
            for _end, model, lengths, seconds in [x for x in pending if x[0] <= now]:
                model.add(lengths, seconds)
            pending = [x for x in pending if x[0] > now]
            passes = {r: work[r] for r in RUN_ORDER[p + 1 :]} | {role: w.rest(started, loaded)}
            busy = [e - now for d, e in enumerate(projected_end) if d != device and free[d] > now]
            plan = plan_cascade(deadline - now, reserve, **passes, devices=devices, in_flight=np.maximum(busy, 0))
            out.plans.append((role, started, plan))
            limits = limits if (limits is not None and not replan) else {r: started + plan.batches[r] for r in passes}
            if started >= limits[role]:
                break
            if w.needs_load and not loaded:  # the whole pass waits for the load: every device is idle here
                now += law.load
                w.cost.record_load(law.load)
                free[:], loaded = now, True
                continue
            rows = w.batches[started]
            # each copy's first batch is slow; the swapped view runs on copies the primary pass warmed up
            seconds = law.seconds(w.lengths[rows], rng, first=started < devices and role != "tta")
            free[device], projected_end[device] = now + seconds, now + w.cost.predict([w.lengths[rows]])[0]
            pending.append((now + seconds, w.cost, w.lengths[rows], seconds))
            out.rows[role] += len(rows)
            started += 1
        now = float(free.max())  # the pass ends when its last batch does
        if role == "primary" and started < len(w):
            break  # the submission's own rows are not done: no optional work
    out.finish = now
    return out


def true_wall(work: dict[str, PassWork], laws: dict[str, Law], devices: int = 2) -> dict[str, float]:
    """Noise-free wall seconds of each whole pass, its load included."""
    seconds = {}
    for role, w in work.items():
        law = laws["secondary" if role == "secondary" else "primary"]
        batches = sum(law.exact(w.lengths[b]) for b in w.batches) / devices
        seconds[role] = batches + (law.load if w.needs_load else 0.0)
    return seconds


SCENARIOS = {
    # laws as the priors say
    "as-expected": {},
    # both models run at a third of the priors' speed: the prior's x1.5 safety covers half of that
    "slow-model": {"primary": {"a": 3 / 600, "b": 18e-5 / 600}, "secondary": {"a": 3 / 1000, "b": 18e-5 / 1000}},
    # every device's first batch of every model takes 20x its law
    "slow-first-batch": {"primary": {"first_factor": 20.0}, "secondary": {"first_factor": 20.0}},
    # the secondary's load takes 3x its estimate, twice what the estimate's x1.5 safety allows for
    "slow-secondary-load": {"secondary": {"load": 3 * 40.0}},
}


def scenario_laws(name: str) -> dict[str, Law]:
    """The truth of a scenario; the cost models' priors are the base laws (``cascade_work``)."""
    base = {"primary": Law(), "secondary": Law(a=1 / 1000, b=6e-5 / 1000, load=40.0)}
    return {role: replace(law, **SCENARIOS[name].get(role, {})) for role, law in base.items()}


@pytest.mark.parametrize("name", SCENARIOS)
def test_cascade_ends_before_deadline_minus_reserve(name: str) -> None:
    """Executed batch by batch with re-planning, the cascade ends before deadline - reserve and uses the time:
    the primary on every row, then as much optional work as fits (half of it, by construction)."""
    laws, reserve = scenario_laws(name), 120.0
    work = cascade_work()
    truth = true_wall(work, laws)
    deadline = truth["primary"] + 0.5 * (truth["secondary"] + truth["tta"]) + reserve
    out = run_on_simulated_clock(work, laws, deadline, reserve)
    budget = deadline - reserve
    assert out.finish <= budget, f"{name}: ended {out.finish - budget:.1f} s past deadline - reserve"
    assert out.rows["primary"] == len(work["primary"].lengths)
    assert 0 < out.rows["secondary"] < len(work["secondary"].lengths)
    # not timid: what is left at the end is about a batch's worth, not a safety factor's worth of the budget
    assert budget - out.finish < 0.02 * budget, f"{name}: {budget - out.finish:.0f} s left unused"
    first_plan = out.plans[0][2]
    if name == "slow-model":
        # the first plan (priors only) promised more than the model could do: the measurements cut it back ...
        assert first_plan.rows["secondary"] > out.rows["secondary"]
        # ... and without re-planning, its shares would have run past the deadline
        fixed = run_on_simulated_clock(cascade_work(), laws, deadline, reserve, replan=False)
        assert fixed.finish > deadline
        # once fitted, the secondary's plan is right: after 20 batches it foresees its final share within 10%
        plan = [plan for role, started, plan in out.plans if role == "secondary" and started == 20][0]
        foreseen = work["secondary"].sizes[:20].sum() + plan.rows["secondary"]
        assert foreseen == pytest.approx(out.rows["secondary"], rel=0.1)
    if name == "slow-secondary-load":
        # the plans made just before and just after the load: the overrun came out of the secondary's share
        before, after = [plan for role, started, plan in out.plans if role == "secondary" and started == 0][:2]
        assert after.rows["secondary"] < before.rows["secondary"]


def test_primary_that_cannot_finish_stops_in_time() -> None:
    laws, reserve = scenario_laws("as-expected"), 120.0
    work = cascade_work()
    deadline = 0.6 * true_wall(work, laws)["primary"] + reserve
    out = run_on_simulated_clock(work, laws, deadline, reserve)
    assert out.finish <= deadline - reserve
    assert 0 < out.rows["primary"] < len(work["primary"].lengths)
    assert out.rows["tta"] == out.rows["secondary"] == 0
    assert not out.plans[0][2].complete["primary"]


def test_secondary_is_not_loaded_when_its_load_does_not_fit() -> None:
    """30 s left after the primary, the secondary's load alone is projected at 60 s: it is never loaded (and the
    swap-TTA, which ties with it on the least certain row and comes after it, gets nothing either)."""
    laws, reserve = scenario_laws("as-expected"), 120.0
    work = cascade_work()
    deadline = true_wall(work, laws)["primary"] + 30.0 + reserve
    out = run_on_simulated_clock(work, laws, deadline, reserve)
    assert out.finish <= deadline - reserve
    assert out.rows["secondary"] == 0 and work["secondary"].cost.load_measured is None


@pytest.mark.parametrize("remaining, reserve", [(0.0, 0.0), (300.0, 300.0), (-50.0, 0.0), (10.0, 20.0)])
def test_no_time_plans_nothing(remaining: float, reserve: float) -> None:
    work = cascade_work(300)
    plan = plan_cascade(remaining, reserve, work["primary"], work["secondary"], work["tta"], devices=2)
    assert plan.batches == {"primary": 0, "secondary": 0, "tta": 0}
    assert plan.rows == {"primary": 0, "secondary": 0, "tta": 0} and plan.projected == 0.0
    # a second less than the load and the first batch need plans nothing; exactly that plans the first batch
    primary = work["primary"]
    one = primary.cost.load_estimate() + primary.cost.predict([primary.lengths[primary.batches[0]]])[0]
    assert plan_cascade(one - 1.0, 0.0, primary).batches["primary"] == 0
    assert plan_cascade(one + 1e-6, 0.0, primary).batches["primary"] == 1
    assert plan_cascade(0.0, 0.0).batches == {}


def test_more_time_never_plans_fewer_rows() -> None:
    """Over a fine grid of time, crossing the secondary's load (where skipping to cheaper TTA work and then
    taking the load would drop TTA rows), every pass's share only grows and no plan overruns its time."""
    work = cascade_work(600)
    primary = work["primary"].rest(len(work["primary"]) - 5, loaded=True)  # the primary's last 5 batches
    args = (primary, work["secondary"], work["tta"])
    end = plan_cascade(math.inf, 0.0, *args, devices=2).projected
    previous = dict.fromkeys(("primary", "secondary", "tta"), 0)
    for available in np.linspace(0.0, 1.05 * end, 3000):
        plan = plan_cascade(available + 60.0, 60.0, *args, devices=2, in_flight=[3.0])
        assert plan.projected <= available + 1e-9 or not any(plan.batches.values())  # (in-flight work aside)
        for role, rows in plan.rows.items():
            assert rows >= previous[role], f"{role}: {previous[role]} rows at less time, {rows} at {available:.1f} s"
        previous = plan.rows
    assert all(plan.complete.values())


def test_priority_order_of_the_shares() -> None:
    """The primary's rest comes before any optional work; secondary and TTA interleave by key, each a prefix of
    its own batches; without keys the secondary's candidates all come before the TTA's."""
    work = cascade_work(600)
    full = plan_cascade(math.inf, 0.0, work["primary"], work["secondary"], work["tta"], devices=2)
    # even keys below any margin (negative) do not put optional work before the primary's rows
    urgent = replace(work["secondary"], keys=work["secondary"].keys - 10.0)
    small = plan_cascade(full.seconds["primary"] * 0.5, 0.0, work["primary"], urgent, work["tta"])
    assert small.batches["primary"] > 0 and small.batches["secondary"] == small.batches["tta"] == 0
    rest = work["primary"].rest(len(work["primary"]))
    mid = plan_cascade(full.projected * 0.3, 0.0, rest, work["secondary"], work["tta"], devices=2)
    assert mid.batches["secondary"] > 0 and mid.batches["tta"] > 0  # interleaved by the primary's margin
    plain = {r: replace(work[r], keys=np.zeros(len(work[r]))) for r in ("secondary", "tta")}
    mid = plan_cascade(full.projected * 0.3, 0.0, rest, plain["secondary"], plain["tta"], devices=2)
    assert mid.batches["secondary"] > 0 and mid.batches["tta"] == 0


def test_pass_work_rejects_unsorted_keys() -> None:
    with pytest.raises(ValueError, match="non-decreasing"):
        PassWork.build([10, 20, 30], CostModel(per_token=1e-3), 64, 4, keys=[0.3, 0.1, 0.2])
    with pytest.raises(ValueError, match="one per row"):
        PassWork.build([10, 20, 30], CostModel(per_token=1e-3), 64, 4, keys=[0.1])


def test_pass_work_batches_are_the_executors() -> None:
    lengths = synthetic_lengths(700, MAX_LENGTH, seed=4)
    w = PassWork.build(lengths, CostModel(per_token=1e-3), BATCH_TOKENS, MAX_ROWS)
    expected = plan_batches(lengths, BATCH_TOKENS, MAX_ROWS, np.arange(700))
    assert len(w) == len(expected) and all((a == b).all() for a, b in zip(w.batches, expected, strict=True))
    assert w.sizes.sum() == 700 and len(w.rest(3)) == len(w) - 3


# --- projections ----------------------------------------------------------------------------------------------


def test_synthetic_lengths_profile() -> None:
    lengths = synthetic_lengths(20_000, 2048, seed=0)
    assert lengths.shape == (20_000,) and lengths.max() == 2048 and lengths.min() >= 32
    assert 1050 < np.median(lengths) < 1250  # prompt median 39 + two responses of median 452 + template
    assert 0.05 < (lengths == 2048).mean() < 0.2
    np.testing.assert_array_equal(lengths, synthetic_lengths(20_000, 2048, seed=0))


def test_project_run_matches_the_law_and_the_budget() -> None:
    law = Law()
    lengths = synthetic_lengths(5000, MAX_LENGTH, seed=5)
    primary = fitted(law, lengths)
    primary.load_seconds = law.load
    projection = project_run(lengths, primary, None, budget_seconds=4 * 3600, reserve_seconds=1800)
    batches = plan_batches(lengths, BATCH_TOKENS, MAX_ROWS)
    expected = (primary.safety * sum(law.exact(lengths[b]) for b in batches) / 2 + 1.5 * law.load) / 3600
    assert projection.primary_hours == pytest.approx(expected, rel=0.02)
    assert projection.plan.complete["primary"]
    short = project_run(lengths, primary, None, budget_seconds=0.5 * expected * 3600, reserve_seconds=0.0)
    assert not short.plan.complete["primary"] and "PRIMARY DOES NOT FINISH" in short.table()


def test_rehearsal_report_prints_the_projection() -> None:
    laws = scenario_laws("as-expected")
    rehearsal = synthetic_lengths(400, MAX_LENGTH, seed=6)
    measured = {role: measured_batches(laws[role], rehearsal, seed=i) for i, role in enumerate(laws)}
    lines: list[str] = []
    projection = rehearsal_report(
        measured, loads={"primary": 60.0, "secondary": 40.0}, n_rows=5000, tta_fraction=0.25, print_fn=lines.append
    )
    table = "\n".join(lines)
    assert lines[0].startswith("primary: fit on") and lines[1].startswith("secondary: fit on")
    for word in ("5,000 rows", "primary", "secondary", "tta", "total"):
        assert word in table
    assert projection.candidates == {"primary": 5000, "secondary": 5000, "tta": 1250}
    # 5,000 rows of these laws take ~1.5 h of the 11 h: everything fits
    assert all(projection.plan.complete.values()) and projection.primary_hours < 2
    with pytest.raises(ValueError, match="unknown roles"):
        rehearsal_report({"tertiary": []}, print_fn=lines.append)
