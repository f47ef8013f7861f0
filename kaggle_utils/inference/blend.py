"""The cascade's probabilities made predictions: calibrated, blended where both models scored, the stated fallback
where no model did.

Probabilities arrive raw (the models' own) and are calibrated here: swap TTA and the blend average margins, and a
temperature divides margins, so averaging raw margins then calibrating is the same as averaging calibrated ones.

Each row gets the fitted numbers of the view it has: the primary's margin is swap-averaged on the rows its swapped
view was averaged into (source ``+tta``) and single-order elsewhere; the secondary's is always single-order. So a
``primary+tta`` row is divided by the primary's swap-averaged temperature, a ``primary`` row by its single-order one,
and ``blend+tta`` and ``blend`` rows take the blend record fitted on those views (``Calibration.for_view``,
``Blend.for_view``). A file written before views were fitted apart holds one temperature (or weight): it serves every
row, as it did, and the report says which view it was fitted on. ``report.json`` names, per source, the temperature or
weight that served its rows and its view.

``calibration.json`` and ``blend.json`` record the fingerprint of the adapter weights they were fitted for; one
fitted for other weights (a stage-2 or fold-averaged adapter copied over the old one) is refused before any row is
scored, unless ``accept_stale_calibration`` is set, which the report then says loudly. A file without a fingerprint
(written before they were recorded) is applied, and the report says its adapter is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils.evaluation.calibration import Blend, Calibration, adapter_fingerprint, blend_view

# Probability given to the longer response on rows that no model scored.
FALLBACK_LONGER_WINS = 0.55
# What writes both files where inference reads them, after the students' train stages.
REFIT = "python -m kaggle_utils.evaluation.calibration --recipe calibrate-students"


class StaleCalibrationError(ValueError):
    """A calibration.json or blend.json was fitted for other adapter weights than the ones inference loads."""


def fallback_probs(df: pd.DataFrame) -> np.ndarray:
    """The stated fallback for unscored rows: the longer response wins with p = 0.55. Shape (N, 2)."""
    longer_a = df["response_a"].str.len().to_numpy() >= df["response_b"].str.len().to_numpy()
    p_a = np.where(longer_a, FALLBACK_LONGER_WINS, 1 - FALLBACK_LONGER_WINS)
    return np.stack([p_a, 1 - p_a], axis=1).astype(np.float32)


def _frame(test: pd.DataFrame, probs: np.ndarray, source) -> pd.DataFrame:
    """Predictions (id, p_a, p_b, source, winner) in test order from probabilities (N, 2)."""
    pred = pd.DataFrame({"id": test["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "source": source})
    pred["winner"] = np.where(pred["p_a"] >= pred["p_b"], "model_a", "model_b")
    return pred


@dataclass
class Blender:
    """Each model's fitted temperature and the blend weight, read from beside its adapter only when rows need them,
    and recorded in ``report`` (the run's report: ``calibration`` and ``blend``)."""

    primary_adapter: Path | None
    secondary_adapter: Path | None
    # the secondary's weight when no blend.json lies beside its adapter
    secondary_weight: float
    report: dict
    # apply a calibration.json / blend.json fitted for other adapter weights (said in the report) instead of refusing
    accept_stale: bool = False

    def __post_init__(self) -> None:
        """Check every file against the adapters' weights now, before hours of scoring, not when they are applied."""
        self.fingerprints = {"primary": adapter_fingerprint(self.primary_adapter)}
        self.fingerprints["secondary"] = adapter_fingerprint(self.secondary_adapter)
        self.stale: dict[str, str] = {}  # file -> what the report says about its fingerprint
        for what, adapter in (("primary", self.primary_adapter), ("secondary", self.secondary_adapter)):
            path = adapter / "calibration.json" if adapter else None
            if path is not None and path.is_file():
                self.check(path, {what: Calibration.load(path).adapter_fingerprint})
        path = self.secondary_adapter / "blend.json" if self.secondary_adapter else None
        if path is not None and path.is_file():
            blend = Blend.load(path)
            self.check(path, {"primary": blend.primary_fingerprint, "secondary": blend.secondary_fingerprint})

    def check(self, path: Path, recorded: dict[str, str | None]) -> None:
        """Compare the fingerprints ``path`` records (role -> fingerprint) with the adapters'; refuse a mismatch."""
        adapters = {"primary": self.primary_adapter, "secondary": self.secondary_adapter}
        unknown = [role for role, fp in recorded.items() if fp is None or self.fingerprints[role] is None]
        wrong = [role for role, fp in recorded.items() if role not in unknown and fp != self.fingerprints[role]]
        if wrong:
            names = ", ".join(f"the {r} adapter {adapters[r]} (weights {self.fingerprints[r]})" for r in wrong)
            text = (
                f"{path} was fitted for other weights than {names}: it records {[recorded[r] for r in wrong]}. "
                f"Refit it for these adapters ({REFIT}, then upload each adapter again with make upload-model), "
                "or set accept_stale_calibration to apply it anyway"
            )
            if not self.accept_stale:
                raise StaleCalibrationError(text)
            print(f"WARNING: STALE CALIBRATION ACCEPTED (accept_stale_calibration): {text}", flush=True)
            self.stale[str(path)] = f"STALE, accepted by accept_stale_calibration: {text}"
            self.report.setdefault("stale_calibration_accepted", []).append(text)
        elif unknown:
            self.stale[str(path)] = (
                f"fitted for unknown adapter weights ({', '.join(unknown)}: no fingerprint recorded or no "
                f"weights file to compare with), applied as is; {REFIT} records them"
            )
        else:
            self.stale[str(path)] = "fitted for these adapter weights"

    def calibration(self, what: str, adapter: Path | None) -> Calibration:
        """The adapter's fitted temperature (``calibration.json``, written by the train stage), else identity."""
        if adapter is None:
            cal = Calibration.identity("no adapter: the base model as is")
        else:
            cal = Calibration.load(adapter / "calibration.json")
        entry = {"temperature": cal.temperature, "reason": cal.reason, "view": cal.view or "unknown"}
        if cal.tta is None and adapter is not None and (adapter / "calibration.json").is_file():
            entry["note"] = "one temperature, fitted on this view: it serves every row, single-order and +tta alike"
        if adapter is not None and str(adapter / "calibration.json") in self.stale:
            entry["fingerprint"] = self.stale[str(adapter / "calibration.json")]
        self.report.setdefault("calibration", {})[what] = entry
        return cal

    def blend(self) -> Blend:
        """The fitted blend (``blend.json`` beside the secondary adapter), else ``secondary_weight`` with each
        model's own temperature; both average calibrated logit margins, not probabilities."""
        fitted = self.secondary_adapter / "blend.json" if self.secondary_adapter else None
        if fitted is not None and fitted.is_file():
            blend = Blend.load(fitted)
        else:
            first = self.calibration("primary", self.primary_adapter)
            second = self.calibration("secondary", self.secondary_adapter)
            default = dict(
                weight=self.secondary_weight,
                secondary_temperature=second.temperature,
                reason=f"no blend.json beside the secondary adapter: secondary_weight={self.secondary_weight}",
            )
            tta = first.for_view(True)  # the primary's swap-averaged temperature for blend+tta rows, where fitted
            blend = Blend(
                primary_temperature=first.temperature,
                view=blend_view(first.view, second.view),
                tta=Blend(primary_temperature=tta.temperature, view=blend_view(tta.view, second.view), **default),
                **default,
            )
        self.report["blend"] = {"weight": blend.weight, "reason": blend.reason, "view": blend.view or "unknown"}
        if blend.tta is None:
            self.report["blend"]["note"] = "one weight, fitted on this view: it serves every blended row"
        if fitted is not None and str(fitted) in self.stale:
            self.report["blend"] |= {"fraction": blend.fraction, "tta_fraction": blend.tta_fraction}
            self.report["blend"]["fingerprint"] = self.stale[str(fitted)]
        return blend

    def predictions(
        self, test: pd.DataFrame, raw: np.ndarray, secondary_raw: np.ndarray, tta: np.ndarray
    ) -> pd.DataFrame:
        """``raw``, ``secondary_raw`` (N, 2): each model's probabilities, NaN where it did not score; ``tta`` (N,):
        rows the swapped view was averaged into. The source of each row says which of them made it; each row is
        calibrated with the record of its view, and the report says which record served which source's rows."""
        probs, source = fallback_probs(test), np.full(len(test), "fallback", dtype=object)
        primary = np.isfinite(raw).all(1)
        both = primary & np.isfinite(secondary_raw).all(1)
        if not primary.any():
            return _frame(test, probs, source)
        cal = self.calibration("primary", self.primary_adapter)
        blend = self.blend() if both.any() else None  # (it may read the calibrations again: their entries are reset)
        served: dict[str, dict] = {"primary": {}, "blend": {}}
        for swapped in (False, True):
            view = primary & (tta == swapped)
            for rows, name, record in ((view & ~both, "primary", cal), (view & both, "blend", blend)):
                if not rows.any():
                    continue
                record = record.for_view(swapped)
                if name == "primary":
                    probs[rows] = record.apply(raw[rows])
                else:
                    probs[rows] = record.combine(raw[rows], secondary_raw[rows])
                served[name][name + "+tta" * swapped] = _served(record, int(rows.sum()))
        self.report["calibration"]["primary"]["served"] = served["primary"]
        if blend is not None:
            self.report["blend"]["served"] = served["blend"]
        source[primary] = np.where(both[primary], "blend", "primary")
        source[tta] = source[tta] + "+tta"
        return _frame(test, probs, source)


def _served(record: Calibration | Blend, rows: int) -> dict:
    """What the report says about the record that served ``rows`` rows of one source: its numbers and its view."""
    if isinstance(record, Calibration):
        numbers = {"temperature": record.temperature}
    else:
        numbers = {k: getattr(record, k) for k in ("weight", "primary_temperature", "secondary_temperature")}
    return {"rows": rows, **numbers, "view": record.view or "unknown"}


def uncalibrated(test: pd.DataFrame, raw: np.ndarray) -> pd.DataFrame:
    """The primary's raw probabilities where it scored, the fallback elsewhere: what is written when a calibration or
    blend file cannot be read, rather than nothing."""
    probs = np.where(np.isfinite(raw).all(1, keepdims=True), raw, fallback_probs(test))
    return _frame(test, probs, "uncalibrated")
