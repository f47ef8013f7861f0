"""Which extra rows the train stage mixes in: a confidence filter, agreement with the human label, per-source caps.

The extra files (``TrainConfig.data.extra_files``) hold two kinds of row, told apart per row, never per file:

* **teacher rows**: finite teacher logits (``logit_a/logit_b``, or ``p_a/p_b``: see :func:`schema.teacher_logits`),
  the pseudo-label stage's output; with a human ``winner`` too where the teacher scored a labelled row (out of fold);
* **human rows**: a ``winner`` and no teacher, e.g. the pool's ``extra_labelled.parquet``, or a kept tie
  (``winner = "tie"`` with its p = 0.5 target, which is a human label, not a teacher's).

Each row goes through the filters in this order and is counted under the first that drops it::

    low_confidence        a row whose only target is the teacher's, with max softmax prob < mix_min_confidence
    disagrees_with_human  a row with a human winner whose teacher prefers the other response (mix_agree_with_human)
    source_cap            beyond mix_source_caps[source] rows of its source, among those the filters kept

Caps keep the rows of lowest ``pool.priority(id, seed)``: the same seed keeps the same rows whatever else the file
holds. The defaults filter nothing. :class:`MixConfig` is the ``mix`` section of the train stage's config::

    mix: MixConfig = field(default_factory=MixConfig)                # in TrainConfig; [mix] in its recipes
    extras[0], report = mix_extras(cfg.mix, extras[0], cfg.schedule.seed)  # in train.split, after average_teachers
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kaggle_utils.data.pool import priority
from kaggle_utils.data.schema import TIE, WINNERS, DataError, average_teachers, load, teacher_logits

# the report's (and mix_source_caps') name for rows without a ``source`` column or value
NO_SOURCE = "(no source)"
# drop reasons, in the order the filters run
REASONS = ("low_confidence", "disagrees_with_human", "source_cap")


@dataclass
class MixConfig:
    """Which pseudo-labelled and hard-labelled extra rows training keeps (a section of the train stage's config)."""

    # keep a row whose only target is the teacher's when the teacher's max softmax probability (T=1) is at least
    # this; 0.5 keeps every row. Rows with a human winner (hard-labelled, kept ties) are never dropped by it
    mix_min_confidence: float = 0.5
    # where a row has both a human winner and a teacher, drop it when the teacher prefers the other response
    mix_agree_with_human: bool = False
    # at most this many rows per value of ``source`` (after the filters above), chosen by a seeded hash of the id;
    # 0 drops the source; unlisted sources are not capped; rows without a source are "(no source)"
    mix_source_caps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.mix_min_confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c < 1:
            raise ValueError(
                f"mix_min_confidence={c!r}: write a probability in [0.5, 1); max(p_a, p_b) is never below 0.5, so "
                "0.5 keeps every teacher row, and 1 would drop them all"
            )
        if not isinstance(self.mix_agree_with_human, bool):
            raise ValueError(f"mix_agree_with_human={self.mix_agree_with_human!r}: write true or false")
        if not isinstance(self.mix_source_caps, dict):
            raise ValueError(f"mix_source_caps={self.mix_source_caps!r}: write a table of source = rows")
        bad = {
            k: v
            for k, v in self.mix_source_caps.items()
            if not (isinstance(k, str) and k) or isinstance(v, bool) or not isinstance(v, int) or v < 0
        }
        if bad:
            raise ValueError(
                f"mix_source_caps {bad}: each cap is a source name (the rows' ``source`` column) and a whole number "
                "of rows >= 0, e.g. {dpo = 50000}"
            )

    @property
    def mix_settings(self) -> dict[str, Any]:
        """This section's fields and values."""
        return {k: getattr(self, k) for k in asdict(MixConfig())}


@dataclass
class MixReport:
    """Rows of the extra files per source: in, with a teacher, with a human label, dropped per reason, kept."""

    # one line per source (first-seen order): in, teacher, human, one column per REASONS, kept
    table: pd.DataFrame
    # the MixConfig fields the rows were mixed with
    settings: dict[str, Any]

    @property
    def rows_in(self) -> int:
        return int(self.table["in"].sum())

    @property
    def kept(self) -> int:
        return int(self.table["kept"].sum())

    def dropped(self) -> dict[str, int]:
        """Rows dropped per reason, over all sources."""
        return {r: int(self.table[r].sum()) for r in REASONS}

    def summary(self) -> pd.DataFrame:
        """The per-source table with a ``total`` line (in = kept + the drops, on every line)."""
        total = self.table.sum().to_frame("total").T
        return pd.concat([self.table, total]).rename_axis("source")

    def __str__(self) -> str:
        on = {k: v for k, v in self.settings.items() if v != getattr(MixConfig(), k)}
        head = f"extra rows: {self.rows_in} in, {self.kept} kept ({', '.join(f'{k}={v}' for k, v in on.items())})"
        return head.replace(" ()", " (no filter)") + "\n" + self.summary().to_string()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, totals and the per-source counts (to save next to a run's artifacts)."""
        return {
            "settings": self.settings,
            "in": self.rows_in,
            "kept": self.kept,
            "dropped": self.dropped(),
            "sources": {s: {k: int(v) for k, v in row.items()} for s, row in self.table.to_dict("index").items()},
        }


def row_kinds(extras: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: ``(teacher_logits (N, 2), taught (N,), human (N,))``: finite teacher logits, and a human label.

    A kept tie's p = 0.5 is its human label, so a tie row is human and not taught.
    """
    winner = extras["winner"].to_numpy(dtype=object) if "winner" in extras.columns else np.full(len(extras), None)
    tie = winner == TIE
    logits = teacher_logits(extras)  # (N, 2), NaN rows: no teacher
    taught = np.isfinite(logits).all(1) & ~tie
    human = np.isin(winner, WINNERS) | tie
    return logits, taught, human


def mix_extras(cfg: MixConfig, extras: pd.DataFrame, seed: int, verbose: bool = True) -> tuple[pd.DataFrame, MixReport]:
    """The rows of ``extras`` that ``cfg`` keeps (input order, fresh index) and the counts; ``verbose`` prints them.

    ``extras`` is the train stage's extra rows after the teachers are averaged (one row per id). A cap naming a
    source that no row has is an error: a misspelt name would silently cap nothing.
    """
    source = _sources(extras)
    caps = cfg.mix_source_caps
    unknown = sorted(set(caps) - set(source))
    if unknown:
        known = list(dict.fromkeys(source))
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hint = "; ".join(f"{u!r}: did you mean {h[0]!r}?" for u, h in hints.items() if h)
        raise DataError(
            f"mix_source_caps names source(s) {unknown} that no extra row has (their 'source' column); the extra "
            f"rows' sources are {known}{'; ' + hint if hint else ''}"
        )
    logits, taught, human = row_kinds(extras)
    margin = np.abs(logits[:, 0] - logits[:, 1]).astype(np.float64)  # (N,); max softmax prob = sigmoid(margin)
    with np.errstate(invalid="ignore", over="ignore"):
        confidence = 1.0 / (1.0 + np.exp(-margin))
    reason = np.full(len(extras), "", dtype=object)
    low = taught & ~human & (confidence < cfg.mix_min_confidence)
    reason[low] = "low_confidence"
    if cfg.mix_agree_with_human and "winner" in extras.columns:
        w = extras["winner"].to_numpy(dtype=object)
        prefers_b = logits[:, 1] > logits[:, 0]
        prefers_a = logits[:, 0] > logits[:, 1]  # an exact 50/50 teacher disagrees with no one
        disagree = taught & (((w == "model_a") & prefers_b) | ((w == "model_b") & prefers_a))
        reason[(reason == "") & disagree] = "disagrees_with_human"
    if caps:
        # by source, then by the seeded hash of the id
        order = np.lexsort((priority(extras["id"], seed), pd.factorize(source)[0]))
        open_ = reason[order] == ""
        ranked = pd.Series(open_).groupby(source[order]).cumsum().to_numpy()  # kept rows so far in the source
        cap = pd.Series(source[order]).map(caps).fillna(np.inf).to_numpy()
        over = np.zeros(len(extras), bool)
        over[order] = open_ & (ranked > cap)
        reason[over] = "source_cap"
    keep = reason == ""
    report = MixReport(_table(source, taught, human, reason), cfg.mix_settings)
    if verbose:
        print(report)
    return extras[keep].reset_index(drop=True), report


def confidence_table(extras: pd.DataFrame, levels: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9)) -> pd.DataFrame:
    """Per source: rows, rows with a teacher, the teacher's mean confidence and share preferring A, and how many
    teacher rows each ``mix_min_confidence`` in ``levels`` would keep (rows with a human label are always kept)."""
    logits, taught, human = row_kinds(extras)
    with np.errstate(invalid="ignore", over="ignore"):
        confidence = 1.0 / (1.0 + np.exp(-np.abs(logits[:, 0] - logits[:, 1]).astype(np.float64)))  # (N,)
    frame = pd.DataFrame(
        {"source": _sources(extras), "teacher": taught, "confidence": np.where(taught, confidence, np.nan)}
    ).assign(prefers_a=np.where(taught, logits[:, 0] > logits[:, 1], np.nan))
    for level in levels:
        frame[f">= {level:g}"] = taught & ~human & (confidence >= level)
    grouped = frame.groupby("source", sort=False)
    out = grouped.agg(rows=("teacher", "size"), teacher=("teacher", "sum"), confidence=("confidence", "mean"))
    out["prefers_a"] = grouped["prefers_a"].mean()
    out = out.join(grouped[[f">= {level:g}" for level in levels]].sum())
    return out.round({"confidence": 3, "prefers_a": 3})


def read_extras(files: list[str]) -> pd.DataFrame:
    """The extra files as the train stage reads them: each checked (``schema`` kind "soft"), then one row per id
    with the teachers' logits averaged (one file per teacher over the same pool; hard-labelled files pass as they
    are). Empty list: an empty frame."""
    frames = [load(f, "soft") for f in files]
    return average_teachers(frames, sources=[str(f) for f in files]) if frames else pd.DataFrame()


def _sources(extras: pd.DataFrame) -> np.ndarray:
    if "source" not in extras.columns:
        return np.full(len(extras), NO_SOURCE, dtype=object)
    s = extras["source"].astype(object)
    return s.where(s.notna() & (s.astype(str) != ""), NO_SOURCE).astype(str).to_numpy(dtype=object)


def _table(source: np.ndarray, taught: np.ndarray, human: np.ndarray, reason: np.ndarray) -> pd.DataFrame:
    columns = ["in", "teacher", "human", *REASONS, "kept"]
    if not len(source):
        return pd.DataFrame(columns=columns, dtype=np.int64).rename_axis("source")
    frame = pd.DataFrame({"source": source, "teacher": taught, "human": human, "reason": reason})
    names = list(dict.fromkeys(source))
    grouped = frame.groupby("source", sort=False)
    out = pd.DataFrame({"in": grouped.size(), "teacher": grouped["teacher"].sum(), "human": grouped["human"].sum()})
    drops = pd.crosstab(frame["source"], frame["reason"])
    for r in REASONS:
        out[r] = drops[r] if r in drops.columns else 0
    out["kept"] = drops[""] if "" in drops.columns else 0
    return out.reindex(names).fillna(0).astype(np.int64)[columns].rename_axis("source")
