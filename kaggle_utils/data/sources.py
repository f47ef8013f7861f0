"""Normalisers: every public preference format into one table, with every dropped row counted.

One function per format; each takes the raw frame (or use :func:`read` for a file) and returns
``(frame, report)`` where ``frame`` has exactly :data:`COLUMNS` and ``report`` counts rows in, rows out and
rows dropped per reason. Nothing is dropped silently and a tie is never read as a win.

========================  ===========================================================================
format                    raw columns (docs/facts.md §2)
========================  ===========================================================================
``competition``           ``id, prompt, response_a, response_b, winner, model_a, model_b, language``
``lmsys_55k``             ``id, model_a, model_b, prompt, response_a, response_b, winner_model_a,
                          winner_model_b, winner_tie``; texts are JSON-encoded lists of turns (``null``
                          turns allowed); the winner is one-hot over the three ``winner_*`` columns
``arena_conversations``   ``question_id, model_a, model_b, winner, conversation_a, conversation_b,
                          language, ...``; conversations are lists of ``{role, content}``; winner in
                          ``model_a, model_b, tie, tie (bothbad)``
``dpo``                   ``chosen, rejected`` as texts (then a ``prompt`` / ``question`` column) or as
                          ``{role, content}`` lists; chosen goes to A or B at random with a seed
``messages``              ``messages_a, messages_b`` (``{role, content}`` lists) and ``label`` ``A`` / ``B``
``unlabelled``            ``id, prompt, response_a, response_b`` (models, language optional); no winner
========================  ===========================================================================

Ties are dropped (reason ``tie``) unless a normaliser of :data:`TIE_FORMATS` is called with ``keep_ties=True``:
then a tie is kept with ``winner = "tie"`` (:data:`~kaggle_utils.data.schema.TIE`, counted as the note
``tie_kept``), never read as a win; the pool stage gives such a row the target p_a = p_b = 0.5.

Multi-turn convention (one rule for every format): the prompt is the user turns, the response is that
side's assistant turns, each list joined by :func:`join_turns`. One turn is kept as it is (so single-turn
rows look exactly like the competition's); several turns are each headed ``[turn k]`` and separated by a
blank line. A ``null`` turn becomes an empty string in its place (counted as the note ``null_turns``).
``system`` messages are not part of either side and are left out (counted as the note ``system_turns``).

Bad input: a file that cannot be read, or a missing column, raises :class:`~kaggle_utils.data.schema.DataError`
naming the source and the column. A bad *row* (JSON that does not parse, a wrong type, text that is not
UTF-8, an unknown label) is dropped and counted under its reason; with ``strict=True`` it raises a
``DataError`` naming source, column and row instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kaggle_utils.data.schema import TIE, WINNERS, DataError, read_table

if TYPE_CHECKING:
    import pyarrow as pa

# The normalised schema: the competition's train columns, plus where each row came from.
COLUMNS = (
    "id",  # "<source>:<source_id>", unique across sources
    "prompt",
    "response_a",
    "response_b",
    "winner",  # "model_a" / "model_b", or None for unlabelled rows
    "model_a",
    "model_b",
    "language",  # as given by the source, None where it gave none (see clean.fill_language)
    "source",  # the name the rows were normalised under
    "source_id",  # the row's id in its source (the row number where the source has none)
)
TURN_HEADER = "[turn {k}]"
TURN_SEPARATOR = "\n\n"
TIES = ("tie", "tie (bothbad)")


@dataclass
class Report:
    """Row counts of one or more steps, one record per (step, source, kind, reason).

    ``kind`` is ``in`` / ``out`` (rows entering and leaving a step), ``dropped`` (rows removed, with the
    reason) or ``note`` (rows kept but worth knowing about, e.g. ``null_turns`` or ``swapped``).
    """

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, source: str, kind: str, reason: str, rows: int) -> None:
        if kind not in ("in", "out", "dropped", "note"):
            raise ValueError(f"kind={kind!r}; expected in, out, dropped or note")
        if rows or kind in ("in", "out"):
            self.records.append({"step": step, "source": source, "kind": kind, "reason": reason, "rows": int(rows)})

    def add_by_source(self, step: str, kind: str, reason: str, mask: np.ndarray, sources: pd.Series) -> None:
        """Count the rows of ``mask`` per source."""
        mask = np.asarray(mask, dtype=bool)
        if kind in ("in", "out"):
            counts = sources.value_counts(sort=False) if not mask.size or mask.all() else sources[mask].value_counts()
            for src in pd.unique(sources):
                self.add(step, str(src), kind, reason, int(counts.get(src, 0)))
            return
        if mask.any():
            for src, n in sources[mask].value_counts(sort=False).items():
                self.add(step, str(src), kind, reason, int(n))

    def extend(self, other: Report) -> Report:
        self.records.extend(other.records)
        return self

    def table(self) -> pd.DataFrame:
        """All records as a frame with columns ``step, source, kind, reason, rows``."""
        return pd.DataFrame(self.records, columns=["step", "source", "kind", "reason", "rows"])

    def dropped(self, step: str | None = None) -> dict[str, int]:
        """Rows dropped per reason (over all sources), for one step or all."""
        t = self.table()
        t = t[(t["kind"] == "dropped") & ((t["step"] == step) if step else True)]
        return {str(k): int(v) for k, v in t.groupby("reason", sort=True)["rows"].sum().items()}

    def notes(self, step: str | None = None) -> dict[str, int]:
        t = self.table()
        t = t[(t["kind"] == "note") & ((t["step"] == step) if step else True)]
        return {str(k): int(v) for k, v in t.groupby("reason", sort=True)["rows"].sum().items()}

    def summary(self) -> pd.DataFrame:
        """One line per (step, source): rows in, rows out, and one column per drop reason."""
        t = self.table()
        if t.empty:
            return pd.DataFrame()
        flow = t[t["kind"].isin(["in", "out"])].pivot_table(
            index=["step", "source"], columns="kind", values="rows", aggfunc="sum", sort=False
        )
        drops = t[t["kind"] == "dropped"].pivot_table(
            index=["step", "source"], columns="reason", values="rows", aggfunc="sum", sort=False
        )
        out = flow.join(drops, how="outer").fillna(0).astype(np.int64)
        order = list(dict.fromkeys(zip(t["step"], t["source"], strict=True)))
        return out.reindex(order).rename_axis(columns=None)

    def check_balanced(self) -> None:
        """Every step's rows in = rows out + rows dropped, per source (an internal consistency check)."""
        s = self.summary()
        if s.empty:
            return
        dropped = s.drop(columns=[c for c in ("in", "out") if c in s.columns]).sum(axis=1)
        bad = s["in"] != s["out"] + dropped
        if bad.any():
            raise AssertionError(f"rows lost without a count at {list(s.index[bad])}")


def join_turns(turns: Iterable[str | None]) -> str:
    """One text from a list of turns, by the module's multi-turn convention (``None`` becomes ``""``)."""
    turns = ["" if t is None else t for t in turns]
    if len(turns) == 1:
        return turns[0]
    return TURN_SEPARATOR.join(f"{TURN_HEADER.format(k=k)}\n{t}" for k, t in enumerate(turns, start=1))


# ---- reading -------------------------------------------------------------------------------------------------


def read(path: Path | str, source: str | None = None) -> pd.DataFrame:
    """Read a parquet, CSV, JSON-lines or JSON file; a missing, truncated or non-UTF-8 file raises DataError."""
    path = Path(path)
    name = source or str(path)
    if path.suffix in (".parquet", ".csv"):
        try:
            return read_table(path)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from exc.__cause__
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{name}: {path} is not .parquet, .csv, .jsonl or .json")
    if not path.is_file():
        raise DataError(f"{name}: {path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}: {path} line {line} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if path.suffix == ".json":
        try:
            return pd.DataFrame(json.loads(text))
        except (json.JSONDecodeError, ValueError) as exc:
            raise DataError(f"{name}: {path} is not a JSON list of records ({exc})") from exc
    records = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: {path} line {i + 1} is not valid JSON ({exc.msg}); truncated file?") from exc
        if not isinstance(rec, dict):
            raise DataError(f"{name}: {path} line {i + 1} is a JSON {type(rec).__name__}, expected an object")
        records.append(rec)
    return pd.DataFrame.from_records(records)


# ---- per-row checks ------------------------------------------------------------------------------------------


class _Rows:
    """Bookkeeping for one normaliser: which rows are bad and why, then the counts into the report."""

    def __init__(self, df: pd.DataFrame, source: str, ids: np.ndarray, strict: bool) -> None:
        self.source, self.ids, self.strict, self.n = source, ids, strict, len(df)
        self.row_numbers = row_numbers(df)
        self.bad = np.zeros(self.n, dtype=bool)
        self.drops: dict[str, int] = {}
        self.note_counts: dict[str, int] = {}

    def reject(
        self, reason: str, column: str, mask: np.ndarray, values: Any = None, why: str = "", expected: bool = False
    ) -> None:
        """Drop the rows of ``mask`` under ``reason``; bad input raises instead in strict mode (``expected``
        drops, such as ties, never raise)."""
        mask = np.asarray(mask, dtype=bool) & ~self.bad  # a row is counted under its first reason only
        if not mask.any():
            return
        if self.strict and not expected:
            i = int(np.flatnonzero(mask)[0])
            shown = "" if values is None else f": {str(values[i])[:80]!r}"
            raise DataError(
                f"{self.source}: column {column!r} row {self.row_numbers[i]} (source_id={self.ids[i]!r}): "
                f"{why or reason}{shown}"
            )
        self.bad |= mask
        self.drops[reason] = self.drops.get(reason, 0) + int(mask.sum())

    def note(self, reason: str, count: int) -> None:
        if count:
            self.note_counts[reason] = self.note_counts.get(reason, 0) + int(count)

    def report(self, rows_out: int) -> Report:
        rep = Report()
        rep.add("normalise", self.source, "in", "", self.n)
        for reason, n in self.drops.items():
            rep.add("normalise", self.source, "dropped", reason, n)
        for reason, n in self.note_counts.items():
            rep.add("normalise", self.source, "note", reason, n)
        rep.add("normalise", self.source, "out", "", rows_out)
        return rep


def _require(df: pd.DataFrame, source: str, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")


def row_numbers(df: pd.DataFrame) -> np.ndarray:
    """Row numbers used in messages and as ids where a source has none: the frame's integer index (a batch
    read from a file carries its rows' positions in the file), else positions."""
    if pd.api.types.is_integer_dtype(df.index):
        return df.index.to_numpy(dtype=np.int64)
    return np.arange(len(df), dtype=np.int64)


def _source_ids(df: pd.DataFrame, column: str | None) -> np.ndarray:
    if column and column in df.columns:
        return df[column].astype(str).to_numpy(dtype=object)
    return row_numbers(df).astype(str).astype(object)


def coin(seed: int, rows: np.ndarray) -> np.ndarray:
    """A fair coin per row number, a pure function of (seed, row): the same in any batch or order. (N,) bool."""
    with np.errstate(over="ignore"):  # splitmix64: wraps modulo 2**64 by design
        x = rows.astype(np.uint64) + np.uint64(seed % 2**32) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(63)).astype(bool)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and (v.isascii() or _utf8_ok(v))


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
        return False
    return True


def _texts(rows: _Rows, df: pd.DataFrame, column: str) -> np.ndarray:
    """The column as an object array of str; nulls, wrong types and non-UTF-8 values are rejected."""
    values = df[column].to_numpy(dtype=object)
    out = values.copy()
    null = np.zeros(len(values), dtype=bool)
    wrong = np.zeros(len(values), dtype=bool)
    bad_utf8 = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, str):
            if not (v.isascii() or _utf8_ok(v)):
                bad_utf8[i] = True
        elif isinstance(v, bytes):
            try:
                out[i] = v.decode("utf-8")
            except UnicodeDecodeError:
                bad_utf8[i] = True
        elif v is None or (isinstance(v, float) and np.isnan(v)):
            null[i] = True
        else:
            wrong[i] = True
    rows.reject("null_text", column, null, why="text is missing")
    rows.reject("wrong_type", column, wrong, values, why="expected text")
    rows.reject("not_utf8", column, bad_utf8, why="text is not valid UTF-8")
    out[rows.bad] = ""
    return out


def _optional(df: pd.DataFrame, column: str) -> np.ndarray:
    """A metadata column as object array with None where absent or missing."""
    if column not in df.columns:
        return np.full(len(df), None, dtype=object)
    values = df[column].astype(object).to_numpy(dtype=object)
    return np.where(pd.isna(values), None, values).astype(object)


def _frame(rows: _Rows, cols: dict[str, np.ndarray]) -> tuple[pd.DataFrame, Report]:
    # a second row with an id already seen in the source cannot be kept under that id
    dup = np.zeros(rows.n, dtype=bool)
    dup[~rows.bad] = pd.Series(rows.ids[~rows.bad]).duplicated().to_numpy()
    rows.reject("duplicate_id", "id", dup, rows.ids, why="id appears more than once")
    keep = ~rows.bad
    if "winner" in cols:
        rows.note("tie_kept", int((np.asarray(cols["winner"], dtype=object)[keep] == TIE).sum()))
    out = pd.DataFrame({c: np.asarray(cols[c], dtype=object)[keep] for c in COLUMNS if c in cols})
    out.insert(0, "id", [f"{rows.source}:{s}" for s in rows.ids[keep]])
    out["source"] = rows.source
    out["source_id"] = rows.ids[keep]
    out = out[list(COLUMNS)].reset_index(drop=True)
    return out, rows.report(len(out))


def _winner_labels(rows: _Rows, winner: np.ndarray, column: str, keep_ties: bool = False) -> np.ndarray:
    """Keep model_a / model_b (and ties as ``TIE`` with ``keep_ties``); the rest is dropped under its own reason."""
    w = pd.Series(winner, dtype=object).str.strip().str.lower().to_numpy(dtype=object)
    tie = np.isin(w, TIES)
    if keep_ties:
        w = np.where(tie, TIE, w).astype(object)  # counted as the note tie_kept in _frame, after every check
    else:
        rows.reject("tie", column, tie, expected=True)
    rows.reject("bad_label", column, ~np.isin(w, WINNERS) & ~tie, winner, why=f"expected one of {[*WINNERS, *TIES]}")
    return w


# ---- the formats ---------------------------------------------------------------------------------------------


def competition(
    df: pd.DataFrame, source: str = "competition", strict: bool = False, keep_ties: bool = False
) -> tuple[pd.DataFrame, Report]:
    """The competition's ``train.parquet`` (one turn, winner ``model_a`` / ``model_b``, language given)."""
    _require(df, source, ("id", "prompt", "response_a", "response_b", "winner"))
    rows = _Rows(df, source, _source_ids(df, "id"), strict)
    cols = {c: _texts(rows, df, c) for c in ("prompt", "response_a", "response_b")}
    cols["winner"] = _winner_labels(rows, _optional(df, "winner"), "winner", keep_ties)
    cols |= {c: _optional(df, c) for c in ("model_a", "model_b", "language")}
    return _frame(rows, cols)


def unlabelled(df: pd.DataFrame, source: str = "unlabelled", strict: bool = False) -> tuple[pd.DataFrame, Report]:
    """A pool of pairs without labels (pseudo-labelling input): ``winner`` is None on every row."""
    _require(df, source, ("prompt", "response_a", "response_b"))
    rows = _Rows(df, source, _source_ids(df, "id"), strict)
    cols = {c: _texts(rows, df, c) for c in ("prompt", "response_a", "response_b")}
    cols |= {c: _optional(df, c) for c in ("model_a", "model_b", "language")}
    cols["winner"] = np.full(len(df), None, dtype=object)
    return _frame(rows, cols)


def _json_turns(rows: _Rows, df: pd.DataFrame, column: str) -> list[list[str | None] | None]:
    """Parse a column of JSON-encoded turn lists; unparsable or non-list values are rejected."""
    parsed: list[list[str | None] | None] = []
    bad = np.zeros(len(df), dtype=bool)
    nulls = 0
    for i, v in enumerate(df[column].to_numpy(dtype=object)):
        turns = None
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                v = None
        if isinstance(v, str):
            try:
                turns = json.loads(v)
            except json.JSONDecodeError:
                turns = None
        if not (isinstance(turns, list) and turns and all(t is None or _is_text(t) for t in turns)):
            bad[i] = True
            parsed.append(None)
            continue
        nulls += any(t is None for t in turns)
        parsed.append(turns)
    rows.reject("bad_json", column, bad, df[column].to_numpy(dtype=object), why="not a JSON list of text turns")
    rows.note("null_turns", nulls)
    return parsed


def lmsys_55k(
    df: pd.DataFrame, source: str = "lmsys-55k", strict: bool = False, keep_ties: bool = False
) -> tuple[pd.DataFrame, Report]:
    """LMSYS arena-human-preference-55k: JSON turn lists and a one-hot ``winner_model_a/_b/_tie``."""
    onehot = ["winner_model_a", "winner_model_b", "winner_tie"]
    _require(df, source, ("prompt", "response_a", "response_b", *onehot))
    rows = _Rows(df, source, _source_ids(df, "id"), strict)
    label = df[onehot].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)  # (N, 3)
    valid = np.isin(label, (0.0, 1.0)).all(1) & (label.sum(1) == 1)
    rows.reject("bad_label", "winner_model_a", ~valid, label.tolist(), why="winner_* must be one-hot 0/1")
    tie = valid & (label[:, 2] == 1)
    if not keep_ties:
        rows.reject("tie", "winner_tie", tie, expected=True)
    turns = {c: _json_turns(rows, df, c) for c in ("prompt", "response_a", "response_b")}
    cols = {c: np.array([join_turns(t) if t is not None else "" for t in v], dtype=object) for c, v in turns.items()}
    rows.note("multi_turn", sum(t is not None and len(t) > 1 for t in turns["prompt"]))
    cols["winner"] = np.where(tie, TIE, np.where(label[:, 1] == 1, "model_b", "model_a")).astype(object)
    cols |= {c: _optional(df, c) for c in ("model_a", "model_b", "language")}
    return _frame(rows, cols)


def _split_conversation(conv: Any) -> tuple[list[str | None], list[str | None], int] | None:
    """User turns, assistant turns and the number of system turns of a ``{role, content}`` list; None if malformed."""
    if isinstance(conv, np.ndarray):  # parquet list columns arrive as arrays of dicts
        conv = conv.tolist()
    if not isinstance(conv, list) or not conv:
        return None
    user: list[str | None] = []
    assistant: list[str | None] = []
    system = 0
    for msg in conv:
        if not isinstance(msg, dict):
            return None
        role, content = msg.get("role"), msg.get("content")
        if content is not None and not _is_text(content):
            return None
        if role in ("user", "human"):
            user.append(content)
        elif role in ("assistant", "gpt", "model"):
            assistant.append(content)
        elif role == "system":
            system += 1
        else:
            return None
    return user, assistant, system


def _conversations(rows: _Rows, df: pd.DataFrame, a_col: str, b_col: str) -> dict[str, np.ndarray]:
    """Prompt and both responses from two conversations that share their user turns."""
    n = len(df)
    prompt, resp_a, resp_b = (np.full(n, "", dtype=object) for _ in range(3))
    malformed, mismatch = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    nulls = system = multi = 0
    for i, (ca, cb) in enumerate(zip(df[a_col].to_numpy(dtype=object), df[b_col].to_numpy(dtype=object), strict=True)):
        sa, sb = _split_conversation(ca), _split_conversation(cb)
        if sa is None or sb is None or not sa[0] or not sa[1] or not sb[1]:
            malformed[i] = True
            continue
        if sa[0] != sb[0]:
            mismatch[i] = True
            continue
        prompt[i], resp_a[i], resp_b[i] = join_turns(sa[0]), join_turns(sa[1]), join_turns(sb[1])
        nulls += any(t is None for t in (*sa[0], *sa[1], *sb[1]))
        system += bool(sa[2] or sb[2])
        multi += len(sa[0]) > 1
    rows.reject("bad_conversation", a_col, malformed, why="not a list of {role, content} with user and assistant turns")
    rows.reject("prompt_mismatch", b_col, mismatch, why="the two conversations have different user turns")
    rows.note("null_turns", nulls)
    rows.note("system_turns", system)
    rows.note("multi_turn", multi)
    return {"prompt": prompt, "response_a": resp_a, "response_b": resp_b}


def arena_conversations(
    df: pd.DataFrame, source: str = "arena-conversations", strict: bool = False, keep_ties: bool = False
) -> tuple[pd.DataFrame, Report]:
    """lmsys/chatbot_arena_conversations: two ``{role, content}`` lists and a winner incl. two kinds of tie."""
    _require(df, source, ("conversation_a", "conversation_b", "winner"))
    rows = _Rows(df, source, _source_ids(df, "question_id"), strict)
    winner = _winner_labels(rows, _optional(df, "winner"), "winner", keep_ties)
    cols = _conversations(rows, df, "conversation_a", "conversation_b")
    cols["winner"] = winner
    cols |= {c: _optional(df, c) for c in ("model_a", "model_b", "language")}
    return _frame(rows, cols)


def dpo(
    df: pd.DataFrame, source: str = "dpo", seed: int = 0, strict: bool = False, id_column: str | None = None
) -> tuple[pd.DataFrame, Report]:
    """Chosen/rejected pairs; the chosen response lands at A or B with probability 1/2 (seeded).

    ``chosen`` / ``rejected`` are either texts (the prompt then comes from a ``prompt`` or ``question``
    column) or ``{role, content}`` conversations (prompt = their user turns). Optional ``chosen_model`` /
    ``rejected_model`` columns become ``model_a`` / ``model_b`` at the same positions.
    """
    _require(df, source, ("chosen", "rejected"))
    rows = _Rows(df, source, _source_ids(df, id_column), strict)
    first = next((v for v in df["chosen"] if v is not None), None)
    if isinstance(first, str):
        prompt_col = next((c for c in ("prompt", "question", "instruction") if c in df.columns), None)
        if prompt_col is None:
            raise DataError(f"{source}: chosen/rejected are texts but there is no 'prompt' or 'question' column")
        cols = {"prompt": _texts(rows, df, prompt_col)}
        chosen, rejected = _texts(rows, df, "chosen"), _texts(rows, df, "rejected")
    else:
        conv = _conversations(rows, df, "chosen", "rejected")
        cols = {"prompt": conv["prompt"]}
        chosen, rejected = conv["response_a"], conv["response_b"]
    # a coin per row number: a row's placement depends on neither the other rows nor the batching
    chosen_at_b = coin(seed, rows.row_numbers)
    cols["response_a"] = np.where(chosen_at_b, rejected, chosen)
    cols["response_b"] = np.where(chosen_at_b, chosen, rejected)
    cols["winner"] = np.where(chosen_at_b, "model_b", "model_a").astype(object)
    cm, rm = _optional(df, "chosen_model"), _optional(df, "rejected_model")
    cols["model_a"], cols["model_b"] = np.where(chosen_at_b, rm, cm), np.where(chosen_at_b, cm, rm)
    cols["language"] = _optional(df, "language")
    rows.note("chosen_at_b", int((chosen_at_b & ~rows.bad).sum()))
    return _frame(rows, cols)


def messages(
    df: pd.DataFrame,
    source: str = "messages",
    strict: bool = False,
    a_column: str = "messages_a",
    b_column: str = "messages_b",
    label_column: str = "label",
    id_column: str | None = "id",
    keep_ties: bool = False,
) -> tuple[pd.DataFrame, Report]:
    """Pairs of ``{role, content}`` conversations with a label ``A`` / ``B`` (RLHFlow-style pair preference)."""
    _require(df, source, (a_column, b_column, label_column))
    rows = _Rows(df, source, _source_ids(df, id_column), strict)
    label = pd.Series(_optional(df, label_column), dtype=object).astype(str).str.strip().str.upper()
    winner = label.map({"A": "model_a", "B": "model_b", "TIE": "tie"}).to_numpy(dtype=object)
    winner = _winner_labels(rows, np.where(pd.isna(winner), None, winner), label_column, keep_ties)
    cols = _conversations(rows, df, a_column, b_column)
    cols["winner"] = winner
    cols |= {c: _optional(df, c) for c in ("model_a", "model_b", "language")}
    return _frame(rows, cols)


FORMATS: dict[str, Callable[..., tuple[pd.DataFrame, Report]]] = {
    "competition": competition,
    "lmsys_55k": lmsys_55k,
    "arena_conversations": arena_conversations,
    "dpo": dpo,
    "messages": messages,
    "unlabelled": unlabelled,
}
# the formats that can hold ties: their normalisers take ``keep_ties``
TIE_FORMATS = ("competition", "lmsys_55k", "arena_conversations", "messages")


def normalise(
    data: pd.DataFrame | Path | str, fmt: str, source: str | None = None, batch_rows: int = 20_000, **kwargs: Any
) -> tuple[pd.DataFrame, Report]:
    """Normalise a frame or a file in format ``fmt`` (a key of :data:`FORMATS`); returns ``(frame, report)``.

    A parquet file is read ``batch_rows`` rows at a time: nested columns (turn lists) become Python objects in
    pandas, and one batch of them at a time keeps memory near the size of the normalised output.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    source = source or fmt
    if isinstance(data, pd.DataFrame):
        return FORMATS[fmt](data, source=source, **kwargs)
    path = Path(data)
    if path.suffix != ".parquet":
        return FORMATS[fmt](read(path, source), source=source, **kwargs)
    frames, report, start = [], Report(), 0
    for batch in parquet_batches(path, source, batch_rows):
        df = batch.to_pandas()
        df.index = pd.RangeIndex(start, start + len(df))  # row numbers in the file
        start += len(df)
        frame, rep = FORMATS[fmt](df, source=source, **kwargs)
        frames.append(frame)
        report.records += [r for r in rep.records if r["kind"] != "out"]
    out = pd.concat(frames, ignore_index=True) if frames else FORMATS[fmt](pd.DataFrame(), source=source)[0]
    dup = out["id"].duplicated().to_numpy()  # within a batch this was checked already; across batches here
    if dup.any():
        if kwargs.get("strict"):
            raise DataError(f"{source}: column 'id': id {out['id'][dup].iloc[0]!r} appears more than once")
        report.add("normalise", source, "dropped", "duplicate_id", int(dup.sum()))
        out = out[~dup].reset_index(drop=True)
    report.add("normalise", source, "out", "", len(out))
    return out, report


def parquet_batches(path: Path, source: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A parquet file ``batch_rows`` rows at a time (pyarrow record batches), without reading it whole; a missing,
    truncated or corrupt file raises DataError naming ``source`` and the path (also mid-file, where pyarrow finds
    the damage)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{source}: {path}: file not found")
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
    except Exception as exc:  # pyarrow raises several types for a truncated or corrupt file
        raise DataError(f"{source}: {path}: cannot be read as parquet ({type(exc).__name__}: {exc})") from exc


def normalise_all(
    inputs: Iterable[tuple[pd.DataFrame | Path | str, str, str]], progress: bool = False, **kwargs: Any
) -> tuple[pd.DataFrame, Report]:
    """Normalise ``(data, format, source)`` triples and stack them; sources must have distinct names."""
    from tqdm.auto import tqdm

    frames, report = [], Report()
    inputs = list(inputs)
    names = [s for _, _, s in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be distinct: {names}")
    for data, fmt, source in tqdm(inputs, desc="normalise", disable=not progress):
        extra = {k: v for k, v in kwargs.items() if k == "strict" or (k == "seed" and fmt == "dpo")}
        frame, rep = normalise(data, fmt, source, **extra)
        frames.append(frame)
        report.extend(rep)
    return pd.concat(frames, ignore_index=True), report
