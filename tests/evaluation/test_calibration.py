"""kaggle_utils.evaluation.calibration on synthetic predictions whose right answer is known.

The synthetic "true" model: margins z ~ N(0, 1.5^2) per row, labels drawn from sigmoid(z) with a fixed seed.
A model that is over-confident by a factor k predicts k*z; the temperature that undoes it is T = k.
Across 20 seeds at 20K rows the fitted T for k = 2.5 had mean 2.501 and standard deviation 0.039 (1.5%), so the
tolerance of 5% below is about 3 standard deviations.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.evaluation import calibration as cal
from kaggle_utils.evaluation.calibration import (
    T_MAX,
    T_MIN,
    Blend,
    Calibration,
    CalibrationFileError,
    fit_blend,
    fit_blend_from_files,
    fit_from_val_predictions,
    fit_temperature,
    margin,
    margin_log_loss,
    probs_from_margin,
    swap_tta_margin,
    swap_tta_probs,
)
from kaggle_utils.evaluation.metrics import evaluate, log_loss

N = 20_000


def true_rows(seed: int = 0, n: int = N, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """True margins (n,) and labels (n,) drawn from them (0 = A wins with probability sigmoid(z))."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, n)
    labels = (rng.random(n) >= 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return z, labels


def val_file(path, probs: np.ndarray, labels: np.ndarray, ids=None):
    """A val_predictions.parquet as the train stage writes it."""
    ids = np.arange(len(labels)) if ids is None else ids
    winner = np.where(labels == 0, "model_a", "model_b")
    pd.DataFrame({"id": ids, "p_a": probs[:, 0], "p_b": probs[:, 1], "winner": winner}).to_parquet(path, index=False)
    return path


# ---------------------------------------------------------------------------------------------- margins


def test_margin_and_probs_are_inverse_and_swap_negates():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    z = margin(probs)
    assert z == pytest.approx([math.log(9), 0.0, math.log(0.25)])
    assert probs_from_margin(z) == pytest.approx(probs)
    assert margin(probs[:, ::-1]) == pytest.approx(-z)
    # softplus(-log 9) = log(1 + 1/9) = -log 0.9: the exact loss matches metrics.log_loss
    assert margin_log_loss(z, np.array([0, 1, 1])) == pytest.approx(log_loss(probs, np.array([0, 1, 1])))


# ---------------------------------------------------------------------------------------------- (a) recovery


@pytest.mark.parametrize("k", [2.5, 0.5])
def test_temperature_recovers_the_sharpening_factor(k):
    z, labels = true_rows(seed=0)
    probs = probs_from_margin(k * z)  # over-confident (k > 1) or under-confident (k < 1) by a known factor
    fit = fit_temperature(probs, labels)
    assert fit.reason == "fitted"
    assert fit.temperature == pytest.approx(k, rel=0.05)
    assert fit.rows == N and fit.nan_rows == 0
    # the loss falls to (about) the true model's own loss, the best any rescaling can do
    true_loss = log_loss(probs_from_margin(z), labels)
    assert fit.log_loss_after < fit.log_loss_before - 0.01
    assert fit.log_loss_after == pytest.approx(true_loss, abs=2e-3)
    assert fit.log_loss_after == pytest.approx(log_loss(fit.apply(probs), labels))


def test_calibrated_model_keeps_temperature_near_one():
    z, labels = true_rows(seed=1)
    fit = fit_temperature(probs_from_margin(z), labels)
    assert fit.temperature == pytest.approx(1.0, rel=0.05)
    assert fit.log_loss_after == pytest.approx(fit.log_loss_before, abs=1e-3)


# ---------------------------------------------------------------------------------------------- (b) accuracy


@pytest.mark.parametrize("temperature", [T_MIN, 0.3, 1.0, 4.0, T_MAX])
def test_temperature_never_changes_the_predicted_side(temperature):
    z, labels = true_rows(seed=2, n=2000)
    probs = probs_from_margin(3.0 * z)
    probs[:5] = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5000001, 0.4999999], [0.4999999, 0.5000001]]
    scaled = Calibration(temperature=temperature).apply(probs)
    assert (scaled.argmax(1) == probs.argmax(1)).all()
    assert evaluate(scaled, labels)["accuracy"] == evaluate(probs, labels)["accuracy"]


def test_fitted_record_reports_the_unchanged_accuracy():
    z, labels = true_rows(seed=3)
    probs = probs_from_margin(2.0 * z)
    fit = fit_temperature(probs, labels)
    assert fit.accuracy == evaluate(probs, labels)["accuracy"]


# ---------------------------------------------------------------------------------------------- (c) blend


def two_models(secondary: str, seed: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primary: the true margin plus noise, over-confident by 2. Secondary: the true margin, or pure noise."""
    z, labels = true_rows(seed=seed)
    rng = np.random.default_rng(seed + 100)
    primary = probs_from_margin(2.0 * (z + rng.normal(0.0, 1.0, N)))
    if secondary == "better":
        other = probs_from_margin(0.7 * z)  # the true model, under-confident: calibration must undo it first
    else:
        other = probs_from_margin(rng.normal(0.0, 3.0, N))  # independent of the labels
    return primary, other, labels


@pytest.mark.parametrize(("secondary", "lo", "hi"), [("better", 0.95, 1.0), ("noise", 0.0, 0.05)])
def test_blend_weight_follows_the_better_model(secondary, lo, hi):
    p1, p2, labels = two_models(secondary)
    c1, c2 = fit_temperature(p1, labels), fit_temperature(p2, labels)
    blend = fit_blend(p1, p2, labels, c1, c2)
    assert blend.reason == "fitted" and blend.rows == N
    assert lo <= blend.weight <= hi
    m = blend.metrics
    best_single = min(m[k]["log_loss"] for k in ("primary", "secondary", "primary_calibrated", "secondary_calibrated"))
    assert m["blend"]["log_loss"] <= best_single + 1e-12
    assert m["blend"]["log_loss"] < m["fixed_average"]["log_loss"]
    # combine() reproduces the fitted figure from raw probabilities
    assert log_loss(blend.combine(p1, p2), labels) == pytest.approx(m["blend"]["log_loss"])


def test_blend_of_two_partial_models_beats_both():
    # two independent noisy views of the same truth: the optimum is inside (0, 1), near the middle
    z, labels = true_rows(seed=5)
    rng = np.random.default_rng(6)
    p1 = probs_from_margin(z + rng.normal(0.0, 1.5, N))
    p2 = probs_from_margin(z + rng.normal(0.0, 1.5, N))
    blend = fit_blend(p1, p2, labels, fit_temperature(p1, labels), fit_temperature(p2, labels))
    assert 0.4 < blend.weight < 0.6
    m = blend.metrics
    assert (
        m["blend"]["log_loss"] < min(m["primary_calibrated"]["log_loss"], m["secondary_calibrated"]["log_loss"]) - 0.01
    )


def test_blend_from_files_joins_on_id(tmp_path):
    p1, p2, labels = two_models("better")
    ids = np.array([f"r{i}" for i in range(N)])
    # the secondary scored only the first half, in another order: the join must pair rows by id, not position
    half = np.random.default_rng(7).permutation(N // 2)
    a = val_file(tmp_path / "a.parquet", p1, labels, ids)
    b = val_file(tmp_path / "b.parquet", p2[half], labels[half], ids[half])
    blend = fit_blend_from_files(a, b)
    assert blend.rows == N // 2
    assert blend.primary_temperature == pytest.approx(fit_temperature(p1, labels).temperature)
    direct = fit_blend(
        p1[half],
        p2[half],
        labels[half],
        Calibration(blend.primary_temperature),
        Calibration(blend.secondary_temperature),
    )
    assert blend.weight == pytest.approx(direct.weight)
    assert blend.weight > 0.95


def test_blend_from_files_refuses_disagreeing_labels(tmp_path):
    p1, p2, labels = two_models("better")
    a = val_file(tmp_path / "a.parquet", p1, labels)
    flipped = labels.copy()
    flipped[3] = 1 - flipped[3]
    b = val_file(tmp_path / "b.parquet", p2, flipped)
    with pytest.raises(CalibrationFileError, match=r"disagree on the winner of id 3"):
        fit_blend_from_files(a, b)


def test_blend_with_too_few_shared_rows_keeps_the_default():
    p1, p2, labels = two_models("better")
    blend = fit_blend(p1[:10], p2[:10], labels[:10], Calibration(), Calibration())
    assert blend.weight == cal.DEFAULT_WEIGHT and blend.rows == 10
    assert "only 10 rows both scored" in blend.reason and "min_rows=100" in blend.reason


# ---------------------------------------------------------------------------------------------- (d) swap-TTA


def test_swap_tta_removes_a_position_bias():
    z, labels = true_rows(seed=8)  # symmetric: as many rows favour A as B
    bias = 1.0  # the model adds +1 to the margin of whichever response is shown first
    probs = probs_from_margin(z + bias)  # (N, 2) rows as given
    swapped = probs_from_margin(-z + bias)  # (N, 2) the same rows with A and B exchanged
    before = (probs[:, 0] > 0.5).mean()
    assert before > 0.6
    identity = Calibration()
    after = swap_tta_probs(probs, swapped, identity)
    assert (after[:, 0] > 0.5).mean() == pytest.approx(0.5, abs=0.02)
    assert margin(after) == pytest.approx(z)
    # in calibrated space: the average of z/T and the negated swapped z/T is z/T
    scaled = swap_tta_probs(probs, swapped, Calibration(temperature=2.0))
    assert margin(scaled) == pytest.approx(z / 2.0)
    assert swap_tta_margin(np.array([3.0]), np.array([1.0])) == pytest.approx([1.0])


# ---------------------------------------------------------------------------------------------- (e) files


def test_calibration_round_trip(tmp_path):
    z, labels = true_rows(seed=9, n=1000)
    fit = fit_temperature(probs_from_margin(2.0 * z), labels, source="val.parquet")
    path = fit.save(tmp_path / "adapter" / "calibration.json")
    assert Calibration.load(path) == fit
    assert json.loads(path.read_text())["temperature"] == fit.temperature
    both = dataclasses.replace(fit, tta=cal.fit_temperature_margins(1.5 * z, labels, view=cal.SWAP_AVERAGED))
    assert Calibration.load(both.save(tmp_path / "both.json")) == both


def test_blend_round_trip(tmp_path):
    p1, p2, labels = two_models("noise")
    blend = fit_blend(p1, p2, labels, fit_temperature(p1, labels), fit_temperature(p2, labels))
    assert Blend.load(blend.save(tmp_path / "blend.json")) == blend
    both = dataclasses.replace(blend, tta=fit_blend(p1[:500], p2[:500], labels[:500], Calibration(2.0), Calibration()))
    assert Blend.load(both.save(tmp_path / "both.json")) == both


# the files as written before views were fitted apart: one temperature (one weight) and the view it was fitted on
OLD_CALIBRATION = {"temperature": 1.7, "rows": 4000, "nan_rows": 0, "log_loss_before": 0.69, "log_loss_after": 0.68,
                   "accuracy": 0.6, "reason": "fitted", "source": "output/s/val_predictions.parquet",
                   "view": "swap-averaged", "adapter_fingerprint": None}  # fmt: skip
OLD_BLEND = {"weight": 0.3, "primary_temperature": 1.7, "secondary_temperature": 1.2, "rows": 4000, "metrics": {},
             "reason": "fitted", "fraction": 1.0, "view": "swap-averaged", "primary_fingerprint": None,
             "secondary_fingerprint": None}  # fmt: skip


def test_an_old_calibration_or_blend_file_loads_and_serves_every_row(tmp_path):
    """A file with one temperature (weight) and its view loads as it is, and that one record serves both views."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(OLD_CALIBRATION))
    old = Calibration.load(path)
    assert (old.temperature, old.view, old.tta) == (1.7, cal.SWAP_AVERAGED, None)
    assert old.for_view(False) is old and old.for_view(True) is old
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(OLD_BLEND))
    blend = Blend.load(path)
    assert (blend.weight, blend.primary_temperature, blend.tta, blend.tta_fraction) == (0.3, 1.7, None, 0.0)
    assert blend.for_view(False) is blend and blend.for_view(True) is blend


def test_missing_files_are_identity_with_a_reason(tmp_path):
    missing = tmp_path / "adapter" / "calibration.json"
    c = Calibration.load(missing)
    assert c.temperature == 1.0 and str(missing) in c.reason
    probs = np.array([[0.8, 0.2]])
    assert c.apply(probs) == pytest.approx(probs)
    b = Blend.load(tmp_path / "blend.json")
    assert b.weight == cal.DEFAULT_WEIGHT and "blend.json" in b.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "expected a JSON object"),
        ('{"temperature": -1.0}', "must be a finite number > 0"),
        ('{"temperature": 1.0, "temprature": 2.0}', "unknown key"),
        ('{"temperature": 1.0, "tta": {"temperature": 0.0}}', r"tta: temperature=0.0 must be a finite number > 0"),
        ('{"temperature": 1.0, "tta": {"temprature": 2.0}}', r"tta: unknown key"),
        ('{"tta": {"tta": {}}}', "a tta record holds no tta record of its own"),
    ],
)
def test_malformed_calibration_names_the_file(tmp_path, text, message):
    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(CalibrationFileError, match=message) as info:
        Calibration.load(path)
    assert str(path) in str(info.value)


def test_malformed_blend_names_the_file(tmp_path):
    path = tmp_path / "blend.json"
    path.write_text('{"weight": 1.5}')
    with pytest.raises(CalibrationFileError, match=r"weight=1.5 must be in \[0, 1\]") as info:
        Blend.load(path)
    assert str(path) in str(info.value)


def test_fit_from_val_predictions(tmp_path):
    z, labels = true_rows(seed=10)
    probs = probs_from_margin(2.5 * z)
    path = val_file(tmp_path / "val_predictions.parquet", probs, labels)
    fit = fit_from_val_predictions(path)
    assert fit.temperature == pytest.approx(fit_temperature(probs, labels).temperature)
    assert fit.source == str(path)


def test_val_predictions_missing_a_column_names_the_file(tmp_path):
    path = tmp_path / "val_predictions.parquet"
    pd.DataFrame({"id": [1], "p_a": [0.5], "p_b": [0.5]}).to_parquet(path)
    with pytest.raises(CalibrationFileError, match=r"val_predictions.parquet: missing column\(s\) \['winner'\]"):
        fit_from_val_predictions(path)


def test_val_predictions_with_a_repeated_id_names_it(tmp_path):
    path = val_file(tmp_path / "val.parquet", np.full((3, 2), 0.5), np.array([0, 1, 0]), ids=np.array([7, 8, 7]))
    with pytest.raises(CalibrationFileError, match=r"val.parquet: column 'id' row 2: id 7 appears more than once"):
        fit_from_val_predictions(path)


def student_dir(path, probs, labels, swapped=None, weights: bytes = b"weights"):
    """A training output folder as the train stage leaves it: val_predictions.parquet and adapter/ with weights."""
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / cal.ADAPTER_WEIGHTS).write_bytes(weights)
    val_file(path / "val_predictions.parquet", probs, labels)
    if swapped is not None:  # the swapped view's probabilities in the original A/B order
        df = pd.read_parquet(path / "val_predictions.parquet")
        df["p_a_swapped"], df["p_b_swapped"] = swapped[:, 0], swapped[:, 1]
        df.to_parquet(path / "val_predictions.parquet", index=False)
    return path


def test_cli_writes_each_file_where_inference_reads_it(tmp_path, capsys):
    """calibration.json beside each adapter, blend.json beside the secondary's (kaggle_utils.inference.blend reads
    them there), each with the fingerprint of the weights it was fitted for."""
    p1, p2, labels = two_models("better")
    primary = student_dir(tmp_path / "qwen", p1, labels, weights=b"qwen")
    secondary = student_dir(tmp_path / "gemma", p2, labels, weights=b"gemma")
    cal.main(["--primary-dir", str(primary), "--secondary-dir", str(secondary)])
    printed = capsys.readouterr().out
    first = Calibration.load(primary / "adapter" / "calibration.json")
    assert first.temperature == pytest.approx(fit_temperature(p1, labels).temperature)
    assert first.adapter_fingerprint == cal.adapter_fingerprint(primary / "adapter") is not None
    second = Calibration.load(secondary / "adapter" / "calibration.json")
    assert second.adapter_fingerprint == cal.adapter_fingerprint(secondary / "adapter") != first.adapter_fingerprint
    blend = Blend.load(secondary / "adapter" / "blend.json")
    assert blend.weight > 0.95 and not (primary / "adapter" / "blend.json").exists()
    assert (blend.primary_fingerprint, blend.secondary_fingerprint) == (
        first.adapter_fingerprint,
        second.adapter_fingerprint,
    )
    for word in ("primary", "secondary", "blend", "log_loss_before", "log_loss_after", "T", "w", "wrote"):
        assert word in printed


def test_the_recipes_write_beside_the_students_the_cascade_loads():
    """calibrate-students reads the real students' out_dirs and fits the blend on the infer recipe's share; the
    demo's likewise (notebook 03 uses CalibrateConfig's default share: the same)."""
    from kaggle_utils.config import recipes
    from kaggle_utils.infer import InferConfig
    from kaggle_utils.train import TrainConfig

    for name, primary, secondary, infer in (
        ("calibrate-students", "student-qwen2.5-14b", "student-gemma2-9b", "infer-cascade-2xt4"),
        ("demo-calibrate", "demo-student-qwen2", "demo-student-gemma2", "demo-infer"),
    ):
        cfg = recipes.load(name, cal.CalibrateConfig)
        assert cfg.primary_dir == recipes.load(primary, TrainConfig).data.out_dir
        assert cfg.secondary_dir == recipes.load(secondary, TrainConfig).data.out_dir
        assert cfg.secondary_fraction == recipes.load(infer, InferConfig).budget.secondary_fraction
        assert cal.CalibrateConfig(cfg.primary_dir).secondary_fraction == cfg.secondary_fraction
        assert cfg.tta_fraction == recipes.load(infer, InferConfig).budget.tta_fraction
        assert cal.CalibrateConfig(cfg.primary_dir).tta_fraction == cfg.tta_fraction


def test_a_student_without_val_predictions_names_the_file(tmp_path):
    with pytest.raises(CalibrationFileError, match=r"no .*nowhere/val_predictions.parquet: the train stage writes"):
        cal.run(cal.CalibrateConfig(tmp_path / "nowhere"))


def biased_views(seed: int, bias: float = 1.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A model with a position bias: margin z + b on a row, -z + b on its swapped view. Returns the true margins,
    labels, the row's probabilities and the swapped view's in the original A/B order (as val_predictions holds)."""
    z, labels = true_rows(seed=seed, n=5000)
    probs = probs_from_margin(z + bias)
    swapped_order = probs_from_margin(-z + bias)  # (N, 2) as scored on the swapped rows
    return z, labels, probs, swapped_order[:, ::-1]


def test_each_view_gets_the_temperature_fitted_on_it(tmp_path):
    """Single-order margins (what inference makes of most rows) and swap-averaged ones (its +tta rows) are fitted
    apart: a position bias makes the single order look over- or under-confident, the average of both orders not."""
    z, labels, probs, swapped = biased_views(seed=20)
    fit = fit_from_val_predictions(student_dir(tmp_path / "s", probs, labels, swapped) / "val_predictions.parquet")
    averaged = probs_from_margin(swap_tta_margin(margin(probs), margin(swapped[:, ::-1])))
    assert fit.view == cal.SINGLE_ORDER and fit.tta.view == cal.SWAP_AVERAGED
    assert fit.temperature == pytest.approx(fit_temperature(probs, labels).temperature)
    assert fit.tta.temperature == pytest.approx(fit_temperature(averaged, labels).temperature)
    assert fit.tta.temperature == pytest.approx(1.0, abs=0.1)  # the averaged margins are the true ones
    assert fit.temperature > 1.2  # the biased single order is over-confident on half of the rows
    assert fit.for_view(False) is fit and fit.for_view(True) is fit.tta
    assert fit.tta.source == fit.source and fit.tta.adapter_fingerprint == fit.adapter_fingerprint
    old = fit_from_val_predictions(val_file(tmp_path / "old.parquet", probs, labels))  # one order only
    assert old.view == cal.SINGLE_ORDER and old.tta is None and old.for_view(True) is old
    assert old.temperature == pytest.approx(fit.temperature)


def test_blend_is_fitted_on_the_views_inference_blends(tmp_path):
    """The secondary's rows are the primary's least certain share; of them the least certain tta_fraction (of all
    rows) have a swap-averaged primary margin: one weight for those (``tta``), one for the rest, the secondary's
    margin single-order in both (inference scores it in one order), each with the temperature of its view."""
    z, labels = true_rows(seed=21, n=5000)
    rng = np.random.default_rng(3)
    z1, z2 = z + rng.normal(0, 1.0, len(z)), z + rng.normal(0, 1.0, len(z))  # two noisy models, biased towards A
    p1, s1 = probs_from_margin(z1 + 0.8), probs_from_margin(-z1 + 0.8)[:, ::-1]
    p2, s2 = probs_from_margin(z2 + 1.5), probs_from_margin(-z2 + 1.5)[:, ::-1]
    a = student_dir(tmp_path / "a", p1, labels, s1) / "val_predictions.parquet"
    b = student_dir(tmp_path / "b", p2, labels, s2) / "val_predictions.parquet"
    first, second = fit_from_val_predictions(a), fit_from_val_predictions(b)
    blend = fit_blend_from_files(a, b, first, second, fraction=0.6, tta_fraction=0.2)
    order = cal.least_certain(p1[:, 0], 1.0)
    tta_rows, single_rows = order[:1000], order[1000:3000]  # 5000 rows: a share of 3000, the first 1000 swapped
    assert np.abs(p1[order[:3000], 0] - 0.5).max() <= np.abs(p1[order[3000:], 0] - 0.5).min()
    assert (blend.rows, blend.tta.rows, blend.fraction, blend.tta_fraction) == (2000, 1000, 0.6, 0.2)
    assert blend.view == cal.blend_view(cal.SINGLE_ORDER, cal.SINGLE_ORDER)
    assert blend.tta.view == cal.blend_view(cal.SWAP_AVERAGED, cal.SINGLE_ORDER)
    z1_swapped = swap_tta_margin(margin(p1), margin(s1[:, ::-1]))  # (N,) the primary on its +tta rows
    direct = cal.fit_blend_margins(margin(p1)[single_rows], margin(p2)[single_rows], labels[single_rows], first, second)
    assert blend.weight == pytest.approx(direct.weight) and blend.primary_temperature == first.temperature
    direct_tta = cal.fit_blend_margins(
        z1_swapped[tta_rows], margin(p2)[tta_rows], labels[tta_rows], first.tta, second
    )  # fmt: skip
    assert blend.tta.weight == pytest.approx(direct_tta.weight)
    assert (blend.tta.primary_temperature, blend.tta.secondary_temperature) == (
        first.tta.temperature,
        second.temperature,
    )
    # what the fit would be on the views inference does not make: each differs
    z2_swapped = swap_tta_margin(margin(p2), margin(s2[:, ::-1]))
    wrong = cal.fit_blend_margins(z1_swapped[tta_rows], z2_swapped[tta_rows], labels[tta_rows], first.tta, second.tta)
    assert blend.tta.weight != pytest.approx(wrong.weight, abs=1e-2)
    wrong = cal.fit_blend_margins(margin(p1)[tta_rows], margin(p2)[tta_rows], labels[tta_rows], first, second)
    assert blend.tta.weight != pytest.approx(wrong.weight, abs=1e-2)
    # too few rows in the TTA share to fit: its weight is the other blended rows', at its own temperatures
    small = fit_blend_from_files(a, b, first, second, fraction=0.6, tta_fraction=0.01)
    assert small.tta.rows == 50 and small.tta.weight == small.weight and "(< min_rows=100)" in small.tta.reason
    assert small.tta.primary_temperature == first.tta.temperature
    # a TTA share covering the secondary's: the single-order weight (for rows the planner leaves unswapped) on all
    covered = fit_blend_from_files(a, b, first, second, fraction=0.2, tta_fraction=0.25)
    assert covered.rows == covered.tta.rows == 1000 and "on the whole share" in covered.reason
    # without the swapped view in the primary's file there is no tta record: one weight on the whole share
    plain = fit_blend_from_files(
        val_file(tmp_path / "p1.parquet", p1, labels), b, first, second, fraction=0.6, tta_fraction=0.2
    )
    assert plain.tta is None and plain.rows == 3000


# ---------------------------------------------------------------------------------------------- (f) edge cases


def test_probabilities_of_exactly_zero_and_one_are_clipped():
    z, labels = true_rows(seed=11, n=2000)
    probs = probs_from_margin(4.0 * z)
    probs[:20] = np.where(labels[:20, None] == 0, [[1.0, 0.0]], [[0.0, 1.0]])  # certain and right
    probs[20:25] = np.where(labels[20:25, None] == 0, [[0.0, 1.0]], [[1.0, 0.0]])  # certain and wrong
    assert np.isfinite(margin(probs)).all() and np.abs(margin(probs)).max() <= -math.log(cal.EPS) + 1e-9
    fit = fit_temperature(probs, labels)
    assert math.isfinite(fit.temperature) and math.isfinite(fit.log_loss_after)
    assert fit.log_loss_after < fit.log_loss_before


def test_all_correct_rows_hold_temperature_at_the_lower_bound():
    z, _ = true_rows(seed=12, n=1000)
    labels = (z < 0).astype(np.int64)  # every prediction right: loss falls forever as T -> 0
    fit = fit_temperature(probs_from_margin(z), labels)
    assert fit.temperature == pytest.approx(T_MIN)
    assert 0.01 <= fit.temperature < 1.0  # finite and sensible: the bracket, not the data, stopped the search
    assert "lower bound" in fit.reason and fit.accuracy == 1.0


def test_noise_holds_temperature_at_the_upper_bound():
    # rows in pairs with the same margin and opposite labels: the margin says nothing, loss falls as T -> inf
    rng = np.random.default_rng(13)
    z = np.repeat(rng.choice([-1.0, 1.0], 1000), 2)  # (2000,)
    labels = np.tile([0, 1], 1000)  # (2000,)
    fit = fit_temperature(probs_from_margin(z), labels)
    assert fit.temperature == pytest.approx(T_MAX)
    assert "upper bound" in fit.reason


def test_nan_rows_are_ignored_and_counted():
    z, labels = true_rows(seed=14, n=5000)
    probs = probs_from_margin(2.0 * z)
    clean = fit_temperature(probs, labels)
    dirty = probs.copy()
    dirty[[3, 10, 77]] = np.nan
    dirty[100, 0] = np.inf
    keep = np.ones(len(labels), bool)
    keep[[3, 10, 77, 100]] = False
    fit = fit_temperature(dirty, labels)
    assert fit.nan_rows == 4 and fit.rows == 4996
    assert fit.temperature == pytest.approx(fit_temperature(probs[keep], labels[keep]).temperature)
    assert fit.temperature == pytest.approx(clean.temperature, rel=0.01)


def test_unknown_winners_are_skipped(tmp_path):
    z, labels = true_rows(seed=15, n=3000)
    probs = probs_from_margin(2.0 * z)
    path = val_file(tmp_path / "val.parquet", probs, labels)
    df = pd.read_parquet(path)
    df.loc[:99, "winner"] = "tie"
    df.to_parquet(path, index=False)
    fit = fit_from_val_predictions(path)
    assert fit.rows == 2900
    assert fit.temperature == pytest.approx(fit_temperature(probs[100:], labels[100:]).temperature)


def test_too_few_rows_is_identity_with_a_reason():
    z, labels = true_rows(seed=16, n=50)
    fit = fit_temperature(probs_from_margin(3.0 * z), labels, min_rows=100)
    assert fit.temperature == 1.0 and fit.rows == 50
    assert "50 usable rows" in fit.reason and "min_rows=100" in fit.reason
    assert fit_temperature(probs_from_margin(3.0 * z), labels, min_rows=50).reason == "fitted"


def test_golden_section_finds_an_interior_minimum_and_an_exact_bound():
    assert cal.golden_section(lambda x: (x - 0.3) ** 2, 0.0, 1.0) == pytest.approx(0.3, abs=1e-6)
    assert cal.golden_section(lambda x: x, 0.0, 1.0) == 0.0
    assert cal.golden_section(lambda x: -x, 0.0, 1.0) == 1.0
