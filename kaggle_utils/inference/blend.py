"""The cascade's probabilities made predictions: calibrated, blended where both models scored, the stated fallback
where no model did.

Probabilities arrive raw (the models' own) and are calibrated here: swap TTA and the blend average margins, and a
temperature divides margins, so averaging raw margins then calibrating is the same as averaging calibrated ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils.evaluation.calibration import Blend, Calibration

# Probability given to the longer response on rows that no model scored.
FALLBACK_LONGER_WINS = 0.55


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

    def calibration(self, what: str, adapter: Path | None) -> Calibration:
        """The adapter's fitted temperature (``calibration.json``, written by the train stage), else identity."""
        if adapter is None:
            cal = Calibration.identity("no adapter: the base model as is")
        else:
            cal = Calibration.load(adapter / "calibration.json")
        self.report.setdefault("calibration", {})[what] = {"temperature": cal.temperature, "reason": cal.reason}
        return cal

    def blend(self) -> Blend:
        """The fitted blend (``blend.json`` beside the secondary adapter), else ``secondary_weight`` with each
        model's own temperature; both average calibrated logit margins, not probabilities."""
        fitted = self.secondary_adapter / "blend.json" if self.secondary_adapter else None
        if fitted is not None and fitted.is_file():
            blend = Blend.load(fitted)
        else:
            blend = Blend(
                weight=self.secondary_weight,
                primary_temperature=self.calibration("primary", self.primary_adapter).temperature,
                secondary_temperature=self.calibration("secondary", self.secondary_adapter).temperature,
                reason=f"no blend.json beside the secondary adapter: secondary_weight={self.secondary_weight}",
            )
        self.report["blend"] = {"weight": blend.weight, "reason": blend.reason}
        return blend

    def predictions(
        self, test: pd.DataFrame, raw: np.ndarray, secondary_raw: np.ndarray, tta: np.ndarray
    ) -> pd.DataFrame:
        """``raw``, ``secondary_raw`` (N, 2): each model's probabilities, NaN where it did not score; ``tta`` (N,):
        rows the swapped view was averaged into. The source of each row says which of them made it."""
        probs, source = fallback_probs(test), np.full(len(test), "fallback", dtype=object)
        primary = np.isfinite(raw).all(1)
        if primary.any():
            probs[primary] = self.calibration("primary", self.primary_adapter).apply(raw[primary])
            source[primary] = "primary"
        both = primary & np.isfinite(secondary_raw).all(1)
        if both.any():
            probs[both] = self.blend().combine(raw[both], secondary_raw[both])
            source[both] = "blend"
        source[tta] = source[tta] + "+tta"
        return _frame(test, probs, source)


def uncalibrated(test: pd.DataFrame, raw: np.ndarray) -> pd.DataFrame:
    """The primary's raw probabilities where it scored, the fallback elsewhere: what is written when a calibration or
    blend file cannot be read, rather than nothing."""
    probs = np.where(np.isfinite(raw).all(1, keepdims=True), raw, fallback_probs(test))
    return _frame(test, probs, "uncalibrated")
