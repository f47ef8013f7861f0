"""kaggle_utils.inference.blend: each row is calibrated with the record of the view it has.

The primary's rows carry a single-order margin, or a swap-averaged one where its swapped view was averaged in (the
``tta`` mask, source ``+tta``); the secondary's are single-order. Small arrays and hand-written files, no model.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from kaggle_utils.evaluation.calibration import (
    ADAPTER_WEIGHTS,
    SINGLE_ORDER,
    SWAP_AVERAGED,
    Blend,
    Calibration,
    adapter_fingerprint,
    blend_view,
    margin,
    probs_from_margin,
)
from kaggle_utils.inference.blend import Blender

# raw margins of six rows: rows 1, 3 and 5 got the swapped view averaged in (source +tta)
Z1 = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.5])
Z2 = np.array([1.0, 1.0, -0.5, 2.0, -1.0, 0.5])
TTA = np.array([False, True, False, True, False, True])


def _test_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(n), "response_a": ["a"] * n, "response_b": ["bb"] * n})


def _adapter(path, weights: bytes = b"w"):
    path.mkdir(parents=True)
    (path / ADAPTER_WEIGHTS).write_bytes(weights)
    return path


def _per_view_calibration(adapter) -> Calibration:
    fp = adapter_fingerprint(adapter)
    single = Calibration(temperature=2.0, reason="fitted", view=SINGLE_ORDER, adapter_fingerprint=fp)
    tta = Calibration(temperature=0.5, reason="fitted", view=SWAP_AVERAGED, adapter_fingerprint=fp)
    cal = dataclasses.replace(single, tta=tta)
    cal.save(adapter / "calibration.json")
    return cal


def test_a_single_order_row_gets_the_single_order_temperature_and_a_tta_row_the_swap_averaged_one(tmp_path):
    adapter = _adapter(tmp_path / "primary")
    _per_view_calibration(adapter)
    report: dict = {}
    raw = probs_from_margin(Z1)
    pred = Blender(adapter, None, 0.5, report).predictions(_test_rows(6), raw, np.full((6, 2), np.nan), TTA)
    got = margin(pred[["p_a", "p_b"]].to_numpy())
    np.testing.assert_allclose(got[~TTA], Z1[~TTA] / 2.0, atol=1e-5)
    np.testing.assert_allclose(got[TTA], Z1[TTA] / 0.5, atol=1e-5)
    assert pred["source"].tolist() == ["primary", "primary+tta"] * 3
    served = report["calibration"]["primary"]["served"]
    assert served == {
        "primary": {"rows": 3, "temperature": 2.0, "view": SINGLE_ORDER},
        "primary+tta": {"rows": 3, "temperature": 0.5, "view": SWAP_AVERAGED},
    }
    assert "note" not in report["calibration"]["primary"]


def test_blended_rows_get_the_blend_of_their_primary_view(tmp_path):
    primary, secondary = _adapter(tmp_path / "p", b"p"), _adapter(tmp_path / "s", b"s")
    _per_view_calibration(primary)
    single_view, tta_view = blend_view(SINGLE_ORDER, SINGLE_ORDER), blend_view(SWAP_AVERAGED, SINGLE_ORDER)
    tta = Blend(weight=0.7, primary_temperature=0.5, secondary_temperature=3.0, reason="fitted", view=tta_view)
    Blend(
        weight=0.2, primary_temperature=2.0, secondary_temperature=3.0, reason="fitted", view=single_view, tta=tta
    ).save(secondary / "blend.json")
    report: dict = {}
    secondary_raw = probs_from_margin(Z2)
    secondary_raw[:2] = np.nan  # rows 0 and 1: the primary alone
    pred = Blender(primary, secondary, 0.5, report).predictions(
        _test_rows(6), probs_from_margin(Z1), secondary_raw, TTA
    )
    got = margin(pred[["p_a", "p_b"]].to_numpy())
    assert pred["source"].tolist() == ["primary", "primary+tta", "blend", "blend+tta", "blend", "blend+tta"]
    np.testing.assert_allclose(got[[2, 4]], 0.8 * Z1[[2, 4]] / 2.0 + 0.2 * Z2[[2, 4]] / 3.0, atol=1e-5)
    np.testing.assert_allclose(got[[3, 5]], 0.3 * Z1[[3, 5]] / 0.5 + 0.7 * Z2[[3, 5]] / 3.0, atol=1e-5)
    np.testing.assert_allclose(got[:2], Z1[:2] / np.array([2.0, 0.5]), atol=1e-5)
    served = report["blend"]["served"]
    assert served["blend"] == {
        "rows": 2, "weight": 0.2, "primary_temperature": 2.0, "secondary_temperature": 3.0, "view": single_view
    }  # fmt: skip
    assert served["blend+tta"]["rows"] == 2 and served["blend+tta"]["weight"] == 0.7
    assert served["blend+tta"]["view"] == tta_view
    assert set(report["calibration"]["primary"]["served"]) == {"primary", "primary+tta"}


def test_without_a_blend_file_blend_tta_rows_take_the_primarys_swap_averaged_temperature(tmp_path):
    primary = _adapter(tmp_path / "p", b"p")
    _per_view_calibration(primary)
    report: dict = {}
    pred = Blender(primary, None, 0.25, report).predictions(
        _test_rows(6), probs_from_margin(Z1), probs_from_margin(Z2), TTA
    )
    got = margin(pred[["p_a", "p_b"]].to_numpy())
    np.testing.assert_allclose(got[~TTA], 0.75 * Z1[~TTA] / 2.0 + 0.25 * Z2[~TTA], atol=1e-5)
    np.testing.assert_allclose(got[TTA], 0.75 * Z1[TTA] / 0.5 + 0.25 * Z2[TTA], atol=1e-5)
    assert report["blend"]["served"]["blend+tta"]["primary_temperature"] == 0.5
    assert report["blend"]["served"]["blend+tta"]["view"] == blend_view(SWAP_AVERAGED, "")


def test_an_old_calibration_and_blend_file_serve_every_row_as_before(tmp_path):
    """A calibration.json / blend.json written before views were fitted apart (one temperature, one weight, and the
    view they were fitted on) still loads, and its one record serves single-order and +tta rows alike."""
    primary, secondary = _adapter(tmp_path / "p", b"p"), _adapter(tmp_path / "s", b"s")
    old = {"temperature": 1.7, "rows": 4000, "reason": "fitted", "view": SWAP_AVERAGED, "adapter_fingerprint": None}
    (primary / "calibration.json").write_text(json.dumps(old))
    old_blend = {"weight": 0.3, "primary_temperature": 1.7, "secondary_temperature": 1.2, "reason": "fitted",
                 "fraction": 1.0, "view": SWAP_AVERAGED, "secondary_fingerprint": None}  # fmt: skip
    (secondary / "blend.json").write_text(json.dumps(old_blend))
    report: dict = {}
    secondary_raw = probs_from_margin(Z2)
    secondary_raw[:2] = np.nan
    pred = Blender(primary, secondary, 0.5, report).predictions(
        _test_rows(6), probs_from_margin(Z1), secondary_raw, TTA
    )
    got = margin(pred[["p_a", "p_b"]].to_numpy())
    np.testing.assert_allclose(got[:2], Z1[:2] / 1.7, atol=1e-5)
    np.testing.assert_allclose(got[2:], 0.7 * Z1[2:] / 1.7 + 0.3 * Z2[2:] / 1.2, atol=1e-5)
    entry = report["calibration"]["primary"]
    assert entry["view"] == SWAP_AVERAGED and "serves every row" in entry["note"]
    assert {v["temperature"] for v in entry["served"].values()} == {1.7}
    assert report["blend"]["view"] == SWAP_AVERAGED and "every blended row" in report["blend"]["note"]
    assert {v["weight"] for v in report["blend"]["served"].values()} == {0.3}
    assert "unknown adapter weights" in entry["fingerprint"]


@pytest.mark.parametrize("accept", [False, True])
def test_a_tta_record_fitted_for_other_weights_is_checked_like_the_file(tmp_path, accept):
    """The fingerprint check reads the file's own record; the per-view records do not change it."""
    from kaggle_utils.inference.blend import StaleCalibrationError

    adapter = _adapter(tmp_path / "p", b"new")
    cal = _per_view_calibration(adapter)
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"other")  # the adapter changed after the fit
    assert cal.adapter_fingerprint != adapter_fingerprint(adapter)
    if not accept:
        with pytest.raises(StaleCalibrationError, match="calibration.json was fitted for other weights"):
            Blender(adapter, None, 0.5, {})
        return
    report: dict = {}
    blender = Blender(adapter, None, 0.5, report, accept_stale=True)
    pred = blender.predictions(_test_rows(6), probs_from_margin(Z1), np.full((6, 2), np.nan), TTA)
    np.testing.assert_allclose(margin(pred[["p_a", "p_b"]].to_numpy())[TTA], Z1[TTA] / 0.5, atol=1e-5)
    assert report["calibration"]["primary"]["fingerprint"].startswith("STALE, accepted")
