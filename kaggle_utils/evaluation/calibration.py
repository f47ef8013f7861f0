"""Calibration fitted on validation predictions: a temperature per model, a blend weight, swap-TTA.

Everything works on the logit margin ``z = log(p_a / p_b)`` of a row (positive: A preferred):

* **temperature scaling**: ``p_a = sigmoid(z / T)``, with ``T > 0`` fitted to minimise log loss on the model's
  ``val_predictions.parquet`` (written by the train stage); saved as ``calibration.json`` beside the adapter;
* **blend**: two calibrated margins mixed in logit space, ``z = (1 - w) * z1 / T1 + w * z2 / T2``, with ``w`` in
  [0, 1] fitted on the validation rows both models scored that the cascade would send to the secondary (the
  primary's least certain share); saved as ``blend.json`` beside the secondary adapter;
* **swap-TTA**: a row's calibrated margin averaged with the negated calibrated margin of its A/B-swapped view.

Each fitted number is fitted on the view of the rows it is applied to. At inference the primary scores every row in
one order and averages the swapped view into its least certain ``tta_fraction`` (source ``+tta``); the secondary
scores its rows in one order only. So ``calibration.json`` holds a temperature for single-order margins and, when
``val_predictions.parquet`` has both orders (``p_a_swapped`` / ``p_b_swapped``), one for swap-averaged margins
(``tta``); ``blend.json`` holds a weight for the blended rows whose primary margin is single-order and one for those
it is swap-averaged (``tta``), the secondary single-order in both. A file written before (one temperature or weight
and its ``view``) serves every row, as it did. Each record holds the fingerprint of the adapter weights it was
fitted for (:func:`adapter_fingerprint`): inference refuses a record fitted for other weights
(:mod:`kaggle_utils.inference.blend`).

Temperature scaling divides every margin by the same positive number, so it never changes which response a row
predicts: accuracy is fixed, only log loss moves. Numpy and pandas only, so inference can import it cheaply.

Run from a shell, after both students' train stages, to write the files where inference reads them
(``<dir>/adapter/calibration.json`` for each, ``<secondary dir>/adapter/blend.json``)::

    python -m kaggle_utils.evaluation.calibration --recipe calibrate-students
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.config.cli import parse_config
from kaggle_utils.data import schema
from kaggle_utils.evaluation.metrics import evaluate
from kaggle_utils.store import file_fingerprint, write_text_atomic

# Probabilities are clipped to [EPS, 1] before the log, so p = 0 or 1 gives a finite margin (|z| <= 16.1);
# the same floor as metrics.log_loss.
EPS = 1e-7
# Fewer usable rows than this: no fit, T = 1 (a 1-parameter fit on a handful of rows mostly fits their noise).
MIN_ROWS = 100
# T is searched in [T_MIN, T_MAX]. On separable rows (every prediction right) log loss keeps falling as T -> 0,
# and on noise it keeps falling as T -> inf; the bracket keeps T finite and the reason says when it binds.
T_MIN, T_MAX = 0.05, 20.0
# Blend weight used when there are too few rows to fit one: infer's former fixed weight.
DEFAULT_WEIGHT = 0.5
# Golden-section stops when the bracket is this narrow (in log T, or in w).
TOL = 1e-7
# Columns a val_predictions.parquet must have (written by kaggle_utils.train).
VAL_COLUMNS = ("id", "p_a", "p_b", "winner")
# The swapped view's probabilities in the original A/B order (schema.swap_probs); absent in files written before.
SWAPPED_COLUMNS = ("p_a_swapped", "p_b_swapped")
# The margins a record was fitted on (the ``view`` of a record): a row scored in one order, or the average of both
# orders (swap_tta_margin). Files written before views were fitted apart may hold other texts (or ""); they are kept.
SWAP_AVERAGED = "swap-averaged"
SINGLE_ORDER = "single order"
# The file of an adapter folder whose bytes name the adapter (peft's weights file).
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CalibrationFileError(ValueError):
    """A calibration.json / blend.json / val_predictions file is malformed; the message names the file."""


# ---------------------------------------------------------------------------------------------- margins and losses


def margin(probs: np.ndarray) -> np.ndarray:
    """Logit margin ``log(p_a / p_b)`` per row, shape (N,), from probabilities (N, 2); NaN rows stay NaN."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)  # (N, 2); 0 and 1 give a finite margin
    return np.log(p[:, 0]) - np.log(p[:, 1])


def _finite_margin(probs: np.ndarray) -> np.ndarray:
    """:func:`margin` with NaN on every row holding a non-finite probability (an inf would clip to a finite one)."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.where(np.isfinite(probs).all(1), margin(probs), np.nan)  # (N,)


def probs_from_margin(z: np.ndarray) -> np.ndarray:
    """Probabilities (N, 2) from margins (N,): ``[sigmoid(z), sigmoid(-z)]``, stable for large |z|."""
    z = np.asarray(z, dtype=np.float64)
    p_a = np.exp(-np.logaddexp(0.0, -z))  # sigmoid(z) without overflow
    p_b = np.exp(-np.logaddexp(0.0, z))
    return np.stack([p_a, p_b], axis=1)  # (N, 2)


def margin_log_loss(z: np.ndarray, labels: np.ndarray) -> float:
    """Mean log loss of margins (N,) against labels (N,) (0 = A wins): ``softplus(-s*z)``, s = +1 for A, -1 for B.

    The fitting objective: exact (no clip), smooth and convex in ``1/T`` and in ``w``, so a 1-D search is safe.
    """
    sign = 1.0 - 2.0 * np.asarray(labels, dtype=np.float64)  # (N,) +1 when A won, -1 when B won
    return float(np.logaddexp(0.0, -sign * z).mean())


def _metrics(z: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The project's metrics (metrics.evaluate: accuracy, clipped log loss) of margins (N,)."""
    out = evaluate(probs_from_margin(z), labels)
    return {"accuracy": out["accuracy"], "log_loss": out["log_loss"]}


def golden_section(f: Callable[[float], float], lo: float, hi: float, tol: float = TOL) -> float:
    """Minimiser of a unimodal ``f`` on [lo, hi]; the endpoints are compared too, so a bound can win exactly."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...: each step keeps this share of the bracket
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    candidates = [(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)]
    return min(candidates)[1]


def adapter_fingerprint(adapter: Path | str | None) -> str | None:
    """Fingerprint of an adapter folder's weights file (``store.file_fingerprint``); None without one."""
    weights = Path(adapter) / ADAPTER_WEIGHTS if adapter else None
    return file_fingerprint(weights) if weights is not None and weights.is_file() else None


# ---------------------------------------------------------------------------------------------- records


def _save_json(record, path: Path | str) -> Path:
    return write_text_atomic(path, json.dumps(dataclasses.asdict(record), indent=2) + "\n")


def _load_record(cls, path: Path):
    """The record of class ``cls`` in the JSON file ``path`` (its ``tta`` record too); errors name the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationFileError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from exc
    return _record(cls, data, path, "")


def _record(cls, data, path: Path, where: str):
    """``cls(**data)`` with ``data`` checked against its fields; ``where``: "" or the key of a nested record."""
    if not isinstance(data, dict):
        raise CalibrationFileError(f"{path}:{where} expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CalibrationFileError(f"{path}:{where} unknown key(s) {unknown}; expected some of {sorted(names)}")
    if data.get("tta") is not None:
        data = data | {"tta": _record(cls, data["tta"], path, f"{where} tta:")}
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise CalibrationFileError(f"{path}:{where} {exc}") from exc


@dataclass(frozen=True)
class Calibration:
    """One model's temperature, fitted on its validation predictions; saved as ``calibration.json``."""

    # divide the margin log(p_a/p_b) by this; 1.0 is the identity
    temperature: float = 1.0
    # validation rows the fit used (finite probabilities and a known winner)
    rows: int = 0
    # rows left out because p_a or p_b was NaN or infinite
    nan_rows: int = 0
    # log loss on the rows used, before and after scaling (metrics.log_loss); None when no fit ran
    log_loss_before: float | None = None
    # log loss after dividing the margins by ``temperature``
    log_loss_after: float | None = None
    # accuracy on the rows used: temperature scaling cannot change it, so one figure serves before and after
    accuracy: float | None = None
    # how the temperature was reached: fitted, fitted but held at a bracket bound, or why it is 1
    reason: str = "identity"
    # the validation file it was fitted on, for the record
    source: str = ""
    # the margins it was fitted on (SINGLE_ORDER or SWAP_AVERAGED; a file written before: either, or "")
    view: str = ""
    # store.file_fingerprint of the adapter weights it was fitted for; None: unknown (a file written before)
    adapter_fingerprint: str | None = None
    # the record fitted on swap-averaged margins, for the rows inference averages with their swapped view (source
    # "+tta"); None: the validation file had one order (or was written before), and this record serves every row
    tta: Calibration | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number > 0")
        if self.tta is not None and self.tta.tta is not None:
            raise ValueError("a tta record holds no tta record of its own")

    def for_view(self, swap_averaged: bool) -> Calibration:
        """The record for rows of this view: ``tta`` for swap-averaged rows when there is one, else this one."""
        return self.tta if swap_averaged and self.tta is not None else self

    @classmethod
    def identity(cls, reason: str) -> Calibration:
        return cls(temperature=1.0, reason=reason)

    def scaled_margin(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated margins (N,) of probabilities (N, 2)."""
        return margin(probs) / self.temperature

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, 2); the argmax of every row is kept."""
        return probs_from_margin(self.scaled_margin(probs))

    def save(self, path: Path | str) -> Path:
        return _save_json(self, path)

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        """Read ``calibration.json``; a missing file is the identity (with the reason), a malformed one an error."""
        path = Path(path)
        if not path.exists():
            return cls.identity(f"no calibration file at {path}: identity (T = 1)")
        return _load_record(cls, path)


@dataclass(frozen=True)
class Blend:
    """Weight of the secondary model in logit space, ``z = (1-w)*z1/T1 + w*z2/T2``; saved as ``blend.json``."""

    # weight of the secondary's calibrated margin, in [0, 1]
    weight: float = DEFAULT_WEIGHT
    # temperature of the primary (T1) that the weight was fitted with
    primary_temperature: float = 1.0
    # temperature of the secondary (T2) that the weight was fitted with
    secondary_temperature: float = 1.0
    # validation rows both models scored (joined on id), on which the weight was fitted
    rows: int = 0
    # accuracy and log loss on those rows: primary, secondary (raw and calibrated) and the blend
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # how the weight was reached: fitted, or why it is the default
    reason: str = "default weight"
    # share of the primary's least certain validation rows it was fitted on (InferConfig.budget.secondary_fraction)
    fraction: float = 1.0
    # the margins it was fitted on, each model's (blend_view); a file written before: one view for both, or ""
    view: str = ""
    # store.file_fingerprint of the primary's and the secondary's adapter weights; None: unknown
    primary_fingerprint: str | None = None
    secondary_fingerprint: str | None = None
    # share of the primary's least certain rows inference averages with their swapped view
    # (InferConfig.budget.tta_fraction) assumed by the fit: the blended rows among them are the ``tta`` record's, the
    # others this one's
    tta_fraction: float = 0.0
    # the record for blended rows whose primary margin is swap-averaged (source "blend+tta"); None: this one serves
    # every blended row (no swap-averaged validation margins, no TTA share, or a file written before)
    tta: Blend | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight={self.weight} must be in [0, 1]")
        for name in ("primary_temperature", "secondary_temperature"):
            t = getattr(self, name)
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"{name}={t} must be a finite number > 0")
        if self.tta is not None and self.tta.tta is not None:
            raise ValueError("a tta record holds no tta record of its own")

    def for_view(self, swap_averaged: bool) -> Blend:
        """The record for blended rows whose primary margin is of this view: ``tta`` when swap-averaged and there is
        one, else this one."""
        return self.tta if swap_averaged and self.tta is not None else self

    def combine(self, primary_probs: np.ndarray, secondary_probs: np.ndarray) -> np.ndarray:
        """Blended probabilities (N, 2) of two models' probabilities (N, 2) on the same rows."""
        z1 = margin(primary_probs) / self.primary_temperature  # (N,)
        z2 = margin(secondary_probs) / self.secondary_temperature  # (N,)
        return probs_from_margin(blend_margins(z1, z2, self.weight))

    def save(self, path: Path | str) -> Path:
        return _save_json(self, path)

    @classmethod
    def load(cls, path: Path | str) -> Blend:
        """Read ``blend.json``; a missing file is the default weight (with the reason), a malformed one an error."""
        path = Path(path)
        if not path.exists():
            return cls(reason=f"no blend file at {path}: default weight {DEFAULT_WEIGHT}, temperatures 1")
        return _load_record(cls, path)


def blend_view(primary: str, secondary: str) -> str:
    """The ``view`` of a blend: the margins of each model it mixes."""
    return f"primary {primary or 'unknown'}, secondary {secondary or 'unknown'}"


# ---------------------------------------------------------------------------------------------- fitting


def fit_temperature(probs: np.ndarray, labels: np.ndarray, min_rows: int = MIN_ROWS, source: str = "") -> Calibration:
    """Temperature minimising log loss of ``softmax(z / T)``; probs (N, 2), labels (N,) with 0 = A wins.

    Golden-section search on ``log T`` over [T_MIN, T_MAX]: the loss is convex in ``1/T``, hence unimodal in
    ``log T``. Non-finite rows are dropped and counted; with fewer than ``min_rows`` usable rows T stays 1.
    """
    return fit_temperature_margins(_finite_margin(probs), labels, min_rows=min_rows, source=source)


def fit_temperature_margins(z: np.ndarray, labels: np.ndarray, min_rows: int = MIN_ROWS, **record) -> Calibration:
    """:func:`fit_temperature` on margins (N,) (NaN where a row was not scored); ``record``: more fields to keep
    (``source``, ``view``, ``adapter_fingerprint``)."""
    z, labels = np.asarray(z, dtype=np.float64), np.asarray(labels)
    ok = np.isfinite(z) & np.isin(labels, (0, 1))  # (N,)
    nan_rows, rows = int((~np.isfinite(z)).sum()), int(ok.sum())
    if rows < min_rows:
        reason = f"only {rows} usable rows (< min_rows={min_rows}): too few to fit, identity (T = 1)"
        return Calibration(rows=rows, nan_rows=nan_rows, reason=reason, **record)
    z, y = z[ok], labels[ok]  # (R,), (R,)
    log_t = golden_section(lambda x: margin_log_loss(z * math.exp(-x), y), math.log(T_MIN), math.log(T_MAX))
    t = math.exp(log_t)
    reason = "fitted"
    if log_t <= math.log(T_MIN) + 1e-3:
        reason = f"held at the lower bound T_MIN={T_MIN}: the rows are (nearly) separable, loss falls as T -> 0"
    elif log_t >= math.log(T_MAX) - 1e-3:
        reason = f"held at the upper bound T_MAX={T_MAX}: the margins carry (almost) no signal, loss falls as T -> inf"
    before, after = _metrics(z, y), _metrics(z / t, y)
    return Calibration(
        temperature=t,
        rows=rows,
        nan_rows=nan_rows,
        log_loss_before=before["log_loss"],
        log_loss_after=after["log_loss"],
        accuracy=after["accuracy"],
        reason=reason,
        **record,
    )


def blend_margins(z1: np.ndarray, z2: np.ndarray, weight: float) -> np.ndarray:
    """Logit-space blend of two calibrated margins (N,): ``(1 - w) * z1 + w * z2``."""
    return (1.0 - weight) * z1 + weight * z2


def fit_blend(
    primary_probs: np.ndarray,
    secondary_probs: np.ndarray,
    labels: np.ndarray,
    primary: Calibration,
    secondary: Calibration,
    min_rows: int = MIN_ROWS,
) -> Blend:
    """Weight ``w`` in [0, 1] minimising log loss of the blended calibrated margins on rows both models scored.

    probs (N, 2) each, labels (N,). The loss is convex in ``w`` and both ends are compared, so the blend's log
    loss on these rows is never above the better calibrated model's.
    """
    z1, z2 = _finite_margin(primary_probs), _finite_margin(secondary_probs)  # (N,) each
    return fit_blend_margins(z1, z2, labels, primary, secondary, min_rows)


def fit_blend_margins(
    z1: np.ndarray,
    z2: np.ndarray,
    labels: np.ndarray,
    primary: Calibration,
    secondary: Calibration,
    min_rows: int = MIN_ROWS,
    **record,
) -> Blend:
    """:func:`fit_blend` on raw margins (N,) each (NaN where a model did not score); ``record``: more fields to keep
    (``fraction``, ``view``, the fingerprints)."""
    labels = np.asarray(labels)
    ok = np.isfinite(z1) & np.isfinite(z2) & np.isin(labels, (0, 1))  # (N,)
    y, z1, z2 = labels[ok], np.asarray(z1, dtype=np.float64)[ok], np.asarray(z2, dtype=np.float64)[ok]  # (R,)
    c1, c2 = z1 / primary.temperature, z2 / secondary.temperature  # (R,) calibrated
    temps = {"primary_temperature": primary.temperature, "secondary_temperature": secondary.temperature}
    if len(y) < min_rows:
        reason = f"only {len(y)} rows both scored (< min_rows={min_rows}): default weight {DEFAULT_WEIGHT}"
        return Blend(weight=DEFAULT_WEIGHT, rows=len(y), reason=reason, **temps, **record)
    w = golden_section(lambda v: margin_log_loss(blend_margins(c1, c2, v), y), 0.0, 1.0)
    p1, p2 = probs_from_margin(z1), probs_from_margin(z2)  # (R, 2) each
    fixed = evaluate((1 - DEFAULT_WEIGHT) * p1 + DEFAULT_WEIGHT * p2, y)  # what infer did before: a fixed average
    metrics = {
        "fixed_average": {"accuracy": fixed["accuracy"], "log_loss": fixed["log_loss"]},
        "primary": _metrics(z1, y),
        "secondary": _metrics(z2, y),
        "primary_calibrated": _metrics(c1, y),
        "secondary_calibrated": _metrics(c2, y),
        "blend": _metrics(blend_margins(c1, c2, w), y),
    }
    return Blend(weight=w, rows=len(y), metrics=metrics, reason="fitted", **temps, **record)


def swap_tta_margin(z: np.ndarray, z_swapped: np.ndarray) -> np.ndarray:
    """Average a row's calibrated margin (N,) with the NEGATED margin (N,) its A/B-swapped view got.

    On the swapped view "A" is the original B, so its margin must be negated to speak about the original A; a
    constant position bias b (z + b on a row, -z + b on its swap) cancels: ((z + b) - (-z + b)) / 2 = z.
    """
    return 0.5 * (z - z_swapped)


def swap_tta_probs(probs: np.ndarray, swapped_probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Swap-TTA in calibrated space: probs (N, 2) on the rows, swapped_probs (N, 2) on their swapped views."""
    z = calibration.scaled_margin(probs)  # (N,)
    z_swapped = calibration.scaled_margin(swapped_probs)  # (N,) about the swapped view's A (the original B)
    return probs_from_margin(swap_tta_margin(z, z_swapped))


# ---------------------------------------------------------------------------------------------- files


def _plain(value):
    """A numpy scalar as the Python value it holds, so messages read ``id 3``, not ``id np.int64(3)``."""
    return value.item() if isinstance(value, np.generic) else value


def read_val_predictions(path: Path | str) -> pd.DataFrame:
    """A ``val_predictions.parquet`` (id, p_a, p_b, winner [, p_a_swapped, p_b_swapped]) with the label as ``label``
    (0 = A wins, -1 = unknown)."""
    df = schema.read_table(path)
    missing = [c for c in VAL_COLUMNS if c not in df.columns]
    if missing:
        raise CalibrationFileError(f"{path}: missing column(s) {missing}; expected {list(VAL_COLUMNS)}")
    dup = df["id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise CalibrationFileError(
            f"{path}: column 'id' row {row}: id {_plain(df['id'].iloc[row])!r} appears more than once"
        )
    known = df["winner"].isin(schema.WINNERS).to_numpy()  # (N,) ties or missing winners cannot be fitted on
    swapped = [c for c in SWAPPED_COLUMNS if c in df.columns]
    if swapped and len(swapped) < len(SWAPPED_COLUMNS):
        raise CalibrationFileError(f"{path}: has {swapped} but not both of {list(SWAPPED_COLUMNS)}")
    out = df[["id", "p_a", "p_b", *swapped]].reset_index(drop=True)
    out["label"] = np.where(known, schema.labels(df), -1)  # (N,)
    return out


def val_margins(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Margins (N,) of read_val_predictions' rows in each view inference makes: ``SINGLE_ORDER`` always, and
    ``SWAP_AVERAGED`` (:func:`swap_tta_margin`, the swapped view's margin taken in its own order) when the file has
    the swapped view; NaN where a probability is not finite."""
    views = {SINGLE_ORDER: _finite_margin(df[["p_a", "p_b"]].to_numpy(dtype=np.float64))}  # (N,)
    if set(SWAPPED_COLUMNS) <= set(df.columns):
        swapped = schema.swap_probs(df[list(SWAPPED_COLUMNS)].to_numpy(dtype=np.float64))  # (N, 2) swapped order
        views[SWAP_AVERAGED] = swap_tta_margin(views[SINGLE_ORDER], _finite_margin(swapped))
    return views


def least_certain(p_a: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``round(fraction * N)`` rows with the smallest ``|p_a - 0.5|``, least certain first: the rows
    the cascade sends to the secondary (``InferConfig.budget.secondary_fraction``) or the swapped view
    (``tta_fraction``), ranked on the primary's single-order p_a as inference ranks them (``Cascade.plan_optional``)."""
    order = np.argsort(np.abs(np.asarray(p_a, dtype=np.float64) - 0.5), kind="stable")  # (N,) NaN last
    return order[: int(round(fraction * len(order)))]


def fit_from_val_predictions(
    path: Path | str, min_rows: int = MIN_ROWS, adapter: Path | str | None = None
) -> Calibration:
    """Temperatures of one model from its ``val_predictions.parquet`` (rows without a known winner are skipped): on
    single-order margins, and on swap-averaged ones (the ``tta`` record) where the file has both orders;
    ``adapter``: the folder whose weights they are fitted for."""
    df = read_val_predictions(path)
    record = {"source": str(path), "adapter_fingerprint": adapter_fingerprint(adapter)}
    labels = df["label"].to_numpy()
    fits = {
        view: fit_temperature_margins(z, labels, min_rows=min_rows, view=view, **record)
        for view, z in val_margins(df).items()
    }
    return dataclasses.replace(fits[SINGLE_ORDER], tta=fits.get(SWAP_AVERAGED))


def fit_blend_from_files(
    primary_val: Path | str,
    secondary_val: Path | str,
    primary: Calibration | None = None,
    secondary: Calibration | None = None,
    min_rows: int = MIN_ROWS,
    fraction: float = 1.0,
    tta_fraction: float = 0.0,
) -> Blend:
    """Blend weights from two ``val_predictions.parquet`` files joined on ``id``, on the views inference blends.

    Each model's temperatures are fitted on all of its own validation rows unless given. The blended rows are the
    ``fraction`` the primary is least sure of (the rows the cascade sends to the secondary); the least certain
    ``tta_fraction`` of all rows also get the primary's swapped view. The secondary scores one order, so its margin
    is single-order everywhere; the primary's is swap-averaged on the TTA share (the ``tta`` record, fitted with
    the primary's swap-averaged temperature, when the primary's file has both orders) and single-order on the rest
    of the share (this record; on the whole share when fewer than ``min_rows`` rows are left outside the TTA share:
    they serve where the planner cuts the swapped view short). The two files must agree on every shared row's
    winner. The fingerprints recorded are the calibrations'.
    """
    if primary is None:
        primary = fit_from_val_predictions(primary_val, min_rows=min_rows)
    if secondary is None:
        secondary = fit_from_val_predictions(secondary_val, min_rows=min_rows)
    a, b = read_val_predictions(primary_val), read_val_predictions(secondary_val)
    joined = _join(a, b, f"{primary_val} and {secondary_val}")  # (R, ...) rows in both files
    ids = joined["id"]
    z1 = {v: z[pd.Index(a["id"]).get_indexer(ids)] for v, z in val_margins(a).items()}  # (R,) per view, join order
    z2 = val_margins(b)[SINGLE_ORDER][pd.Index(b["id"]).get_indexer(ids)]  # (R,) the secondary: one order
    labels = joined["label_1"].to_numpy()
    order = least_certain(joined["p_a_1"].to_numpy(), 1.0)  # (R,) least certain first, as the cascade ranks
    share = order[: int(round(fraction * len(order)))]  # the rows the secondary scores
    in_tta = share[: int(round(tta_fraction * len(order)))] if SWAP_AVERAGED in z1 else share[:0]  # also swapped
    single = share[len(in_tta) :] if len(share) - len(in_tta) >= min_rows else share
    record = {
        "fraction": fraction,
        "tta_fraction": tta_fraction,
        "primary_fingerprint": primary.adapter_fingerprint,
        "secondary_fingerprint": secondary.adapter_fingerprint,
    }
    fit = fit_blend_margins(
        z1[SINGLE_ORDER][single], z2[single], labels[single], primary, secondary, min_rows,
        view=blend_view(SINGLE_ORDER, SINGLE_ORDER), **record,
    )  # fmt: skip
    if len(single) == len(share) and len(in_tta):
        note = f"on the whole share: < {min_rows} rows outside the TTA share"
        fit = dataclasses.replace(fit, reason=f"{fit.reason} ({note})")
    if not len(in_tta):
        return fit
    tta = fit_blend_margins(
        z1[SWAP_AVERAGED][in_tta], z2[in_tta], labels[in_tta], primary.for_view(True), secondary, min_rows,
        view=blend_view(SWAP_AVERAGED, SINGLE_ORDER), **record,
    )  # fmt: skip
    if tta.rows < min_rows:  # too few to fit: the other blended rows' weight says more than a fixed one
        reason = f"only {tta.rows} rows both scored (< min_rows={min_rows}): the weight fitted on the single-order rows"
        tta = dataclasses.replace(tta, weight=fit.weight, reason=reason)
    return dataclasses.replace(fit, tta=tta)


def _join(a: pd.DataFrame, b: pd.DataFrame, files: str) -> pd.DataFrame:
    """The rows of two read_val_predictions frames with the same id (columns suffixed _1, _2), which must agree on
    the winner; ``files`` names both in the error."""
    joined = a.merge(b, on="id", suffixes=("_1", "_2"), validate="1:1")
    clash = joined["label_1"] != joined["label_2"]
    if clash.any():
        bad = joined["id"].to_numpy()[clash.to_numpy()][0]
        raise CalibrationFileError(
            f"{files} disagree on the winner of id {_plain(bad)!r}; fit the blend on predictions of the same "
            "validation labels"
        )
    return joined


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class CalibrateConfig:
    """Fit each student's temperature and the blend weight on their validation predictions, and write them where
    inference reads them: ``calibration.json`` beside each adapter, ``blend.json`` beside the secondary's."""

    STAGE: ClassVar[str] = "calibrate"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "students": ("primary_dir", "secondary_dir"),
        "cascade": ("secondary_fraction", "tta_fraction", "min_rows"),
    }

    # the primary student's training output folder (val_predictions.parquet and adapter/, as the train stage writes)
    primary_dir: Path
    # the secondary student's training output folder; empty: no secondary, no blend
    secondary_dir: Path | None = None
    # share of the primary's least certain rows the cascade sends to the secondary: the infer recipe's
    # secondary_fraction (the blend weight is fitted on those rows)
    secondary_fraction: float = 1.0
    # share of the primary's least certain rows the cascade averages with their A/B-swapped view: the infer recipe's
    # tta_fraction (the blended rows among them get a weight fitted on the primary's swap-averaged margins)
    tta_fraction: float = 0.25
    # fewer usable rows than this: no fit (T = 1, default blend weight)
    min_rows: int = MIN_ROWS

    def __post_init__(self) -> None:
        self.primary_dir = Path(self.primary_dir)
        self.secondary_dir = Path(self.secondary_dir) if self.secondary_dir else None
        if not 0 < self.secondary_fraction <= 1:
            raise ValueError(f"secondary_fraction={self.secondary_fraction} must be in (0, 1]")
        if not 0 <= self.tta_fraction <= 1:
            raise ValueError(f"tta_fraction={self.tta_fraction} must be in [0, 1]")
        if self.min_rows < 1:
            raise ValueError(f"min_rows={self.min_rows} must be >= 1")

    def roles(self) -> dict[str, Path]:
        return {"primary": self.primary_dir} | ({"secondary": self.secondary_dir} if self.secondary_dir else {})


def val_predictions_of(out_dir: Path) -> Path:
    """``out_dir/val_predictions.parquet``, or an error naming it and the stage that writes it."""
    path = out_dir / "val_predictions.parquet"
    if not path.is_file():
        raise CalibrationFileError(
            f"no {path}: the train stage writes it into its out_dir; pass the student's training output folder"
        )
    return path


def summary(calibrations: dict[str, Calibration], blend: Blend | None = None) -> pd.DataFrame:
    """One row per model and view (before: raw, after: calibrated) and per view of the blend (before: a fixed 0.5
    average); a view is named as inference names the rows it serves (``primary``, ``primary+tta``, ``blend``, ...).
    ``secondary+tta`` is recorded but serves no row: inference scores the secondary in one order."""
    table = []
    for name, fitted in calibrations.items():
        for label, c in _views(name, fitted):
            table.append(
                {"model": label, "rows": c.rows, "T": c.temperature, "w": None}
                | {"log_loss_before": c.log_loss_before, "log_loss_after": c.log_loss_after}
                | {"accuracy_before": c.accuracy, "accuracy_after": c.accuracy, "reason": c.reason}
            )
    for label, b in _views("blend", blend) if blend is not None else ():
        fixed, fitted = b.metrics.get("fixed_average", {}), b.metrics.get("blend", {})
        table.append(
            {"model": label, "rows": b.rows, "T": None, "w": b.weight}
            | {"log_loss_before": fixed.get("log_loss"), "log_loss_after": fitted.get("log_loss")}
            | {"accuracy_before": fixed.get("accuracy"), "accuracy_after": fitted.get("accuracy"), "reason": b.reason}
        )
    return pd.DataFrame(table)


def _views(name: str, record):
    """(label, record) for a record and its ``tta`` record: ``name`` and ``name+tta``."""
    return [(name, record)] + ([(f"{name}+tta", record.tta)] if record.tta is not None else [])


def run(cfg: CalibrateConfig) -> tuple[dict[str, Calibration], Blend | None]:
    """Fit and save what ``cfg`` asks for; returns the calibrations by role and the blend (if any)."""
    calibrations = {}
    for role, out_dir in cfg.roles().items():
        calibrations[role] = fit_from_val_predictions(
            val_predictions_of(out_dir), min_rows=cfg.min_rows, adapter=out_dir / "adapter"
        )
        calibrations[role].save(out_dir / "adapter" / "calibration.json")
    if cfg.secondary_dir is None:
        return calibrations, None
    blend = fit_blend_from_files(
        val_predictions_of(cfg.primary_dir),
        val_predictions_of(cfg.secondary_dir),
        calibrations["primary"],
        calibrations["secondary"],
        min_rows=cfg.min_rows,
        fraction=cfg.secondary_fraction,
        tta_fraction=cfg.tta_fraction,
    )
    blend.save(cfg.secondary_dir / "adapter" / "blend.json")
    return calibrations, blend


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(CalibrateConfig, argv)
    calibrations, blend = run(cfg)
    print(summary(calibrations, blend).to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    written = [d / "adapter" / "calibration.json" for d in cfg.roles().values()]
    written += [cfg.secondary_dir / "adapter" / "blend.json"] if blend is not None else []
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
