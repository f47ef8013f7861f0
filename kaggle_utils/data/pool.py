"""Assemble the extra labelled set and the unlabelled pool from a manifest of public sources.

One call, :func:`assemble`, runs every step of ``sources`` and ``clean`` over the sources a recipe lists, and
writes what the later stages read::

    extra_labelled.parquet   rows whose source keeps its human / chosen label (``labelled = true``)
    unlabelled.parquet       pairs for the teacher to pseudo-label (``labelled = false``; no ``winner`` column)
    pool_report.csv          every count: step, source, kind (in / out / dropped / note), reason, rows
    pool_languages.csv       rows per step × source × language, from the quality step on
    pool_report.json         per source: rows in, kept, dropped per reason; outputs; languages
    pool_leaks.csv           the rows dropped as leaks, with the holdout prompt matched and the similarity
    pool_config.json         the resolved config

Both outputs are in the competition schema (``id, prompt, response_a, response_b, [winner,] model_a, model_b,
language``) plus ``source`` (the manifest name: provenance), ``source_id`` (the row's id in its source) and
``weight`` (the source's training weight). ``id`` is ``<source>:<source_id>``, unique across sources.

Ties: dropped (reason ``tie``) unless the source says ``keep_ties = true``. A labelled source then writes its ties
to extra_labelled.parquet with ``winner = "tie"`` and ``p_a = p_b = 0.5`` (the train stage distils them toward
50/50 and gives them no cross-entropy term); every other labelled row has ``p_a, p_b`` empty (its winner is the
target). An unlabelled source keeps a tie as one more pair for the teacher.

Steps, in order (each counted per source in the report)::

    normalise         sources.normalise, a chunk of a file at a time  (ties, bad rows, ...)
    quality           clean.quality_mask, per chunk              (empty, too_short, identical_responses, ...)
    language          clean.fill_language, per chunk             (note: language_detected)
    source_languages  the entry's ``languages``, if given        (language_not_selected)
    ids               an id repeated across a source's chunks    (duplicate_id)
    dedup             clean.dedup over all sources, swap-aware   (duplicate_pair, duplicate_pair_swapped)
    leakage           clean.drop_leaks vs the holdout prompts    (leak_exact, leak_near)
    cap               the entry's ``cap``                        (source_cap)
    language_balance  ``language_caps`` then the row budgets     (language_cap, language_balance)
    balance           clean.balance_ab on the labelled rows      (note: swapped; texts swapped as written)

Dedup keeps the first copy in manifest order: list the most trusted sources first (labelled before unlabelled,
or a pair seen in both keeps the copy of whichever comes first). Which rows a cap or a budget keeps is decided
by a hash of ``(seed, id)`` per row: the same seed gives the same rows whatever else the manifest holds.

Memory: each source is read ``chunk_rows`` raw rows at a time, normalised, filtered and written to a shard on
disk; the steps across sources run on a slim frame (hash keys, language, the head of the prompt); the outputs
are written shard by shard. The peak is about one chunk's texts plus the slim frame of all rows. Measured on a
2-core CPU machine (2026-11-28; 200K synthetic rows of the competition's length profile in two parquet sources,
~2 GB of text in pandas; peak RSS from resource.getrusage): chunk_rows 20,000 → 1.76 GiB peak, 187 s;
50,000 → 3.07 GiB; a whole 100K-row source at once → 3.61 GiB. 560K rows (~5.7 GB of text in pandas, 1.6 GB of
parquet), chunk_rows 20,000: 2.62 GiB peak, 253 s.

``python -m kaggle_utils.data.pool --recipe demo-pool``
"""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import clean, sources
from kaggle_utils.data.schema import TIE, DataError, swap_ab
from kaggle_utils.data.sources import Report

SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
FOLDER_SUFFIXES = (".parquet", ".csv", ".jsonl")  # the files read from a folder
OUTPUT_FILES = {"labelled": "extra_labelled.parquet", "unlabelled": "unlabelled.parquet"}
WRITE_BATCH = 10_000  # rows of a shard turned into pandas at a time while the outputs are written
OTHER = "other"  # the language-balance bucket of every language not named in language_shares / language_caps

# The competition's own language mix (docs/facts.md §1, train counts / 48,439): the seed team prioritised the top five
# languages, English first, and so does the default; every other language shares what is left.
DEFAULT_LANGUAGE_SHARES: dict[str, float] = {
    "English": 0.52,
    "Russian": 0.13,
    "Chinese": 0.09,
    "Vietnamese": 0.06,
    "German": 0.03,
    OTHER: 0.17,
}

_STRING = pa.string()
_COLUMNS = ("id", "prompt", "response_a", "response_b", "winner", "model_a", "model_b", "language", "source")
OUTPUT_SCHEMAS = {
    # p_a, p_b: a kept tie's target (0.5, 0.5); empty on rows whose winner is the target
    "labelled": pa.schema(
        [
            *((c, _STRING) for c in _COLUMNS),
            ("source_id", _STRING),
            ("weight", pa.float64()),
            ("p_a", pa.float64()),
            ("p_b", pa.float64()),
        ]
    ),
    "unlabelled": pa.schema(
        [*((c, _STRING) for c in _COLUMNS if c != "winner"), ("source_id", _STRING), ("weight", pa.float64())]
    ),
}


@dataclass(frozen=True)
class SourceSpec:
    """One manifest entry (a ``[[sources]]`` table of the recipe)."""

    # unique name: the ``source`` column of every row it gives, and the prefix of their ids
    name: str
    # a file (.parquet, .csv, .jsonl, .json) or a folder of .parquet/.csv/.jsonl files (read in sorted order)
    path: Path
    # the normaliser: a key of kaggle_utils.data.sources.FORMATS
    format: str
    # true: rows keep their human / chosen label and go to extra_labelled.parquet; false: the label is dropped
    # and the pair goes to unlabelled.parquet for the teacher
    labelled: bool = True
    # at most this many rows of this source in the output (after cleaning); None: no cap
    cap: int | None = None
    # training weight written on every row of this source (the ``weight`` column)
    weight: float = 1.0
    # keep only rows in these languages (names as the competition writes them, e.g. "English"); None: all
    languages: tuple[str, ...] | None = None
    # keep tie rows (formats with ties only: sources.TIE_FORMATS): labelled, as winner "tie" with p_a = p_b = 0.5
    # targets; unlabelled, as pairs for the teacher. false: ties are dropped (reason ``tie``)
    keep_ties: bool = False

    KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "path",
        "format",
        "labelled",
        "cap",
        "weight",
        "languages",
        "keep_ties",
    )

    @classmethod
    def from_entry(cls, entry: Any, index: int) -> SourceSpec:
        """Check one raw entry; a DataError names the entry, the key and the fix."""
        where = f"sources[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a table with name, path, format; got {entry!r}")
        name = entry.get("name")
        if isinstance(name, str) and name:
            where = f"source {name!r} ({where})"
        for key in entry:
            if key not in cls.KEYS:
                close = difflib.get_close_matches(key, cls.KEYS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the keys are {list(cls.KEYS)}"
                raise DataError(f"{where}: unknown key {key!r}; {hint}")
        for key in ("name", "path", "format"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise DataError(f"{where}: {key!r} is missing or not text; every entry needs name, path and format")
        fmt = entry["format"]
        if fmt not in sources.FORMATS:
            close = difflib.get_close_matches(fmt, sources.FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{where}: format {fmt!r} is not a normaliser{hint}; set one of {sorted(sources.FORMATS)}")
        labelled = entry.get("labelled", True)
        if not isinstance(labelled, bool):
            raise DataError(f"{where}: labelled = {labelled!r}; write true or false")
        if labelled and fmt == "unlabelled":
            raise DataError(f"{where}: format 'unlabelled' has no labels; set labelled = false")
        cap = entry.get("cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise DataError(f"{where}: cap = {cap!r}; write a positive number of rows, or leave it out for no cap")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"{where}: weight = {weight!r}; write a positive number (1.0: as a competition row)")
        languages = entry.get("languages")
        if languages is not None and (
            not isinstance(languages, list) or not languages or not all(isinstance(x, str) for x in languages)
        ):
            raise DataError(f'{where}: languages = {languages!r}; write a list of names, e.g. ["English"]')
        keep_ties = entry.get("keep_ties", False)
        if not isinstance(keep_ties, bool):
            raise DataError(f"{where}: keep_ties = {keep_ties!r}; write true or false")
        if keep_ties and fmt not in sources.TIE_FORMATS:
            raise DataError(
                f"{where}: keep_ties = true, but format {fmt!r} has no ties (formats with ties: "
                f"{list(sources.TIE_FORMATS)}); remove keep_ties"
            )
        return cls(
            name=name,
            path=Path(entry["path"]),
            format=fmt,
            labelled=labelled,
            cap=cap,
            weight=float(weight),
            languages=tuple(languages) if languages else None,
            keep_ties=keep_ties,
        )

    @property
    def output(self) -> str:
        return "labelled" if self.labelled else "unlabelled"

    def files(self) -> list[Path]:
        """The files to read: the path itself, or every readable file under the folder in sorted order."""
        if self.path.is_dir():  # .json is skipped in folders: there it is dataset metadata (dataset_info.json)
            found = self.path.rglob("*")
            return sorted(
                p
                for p in found
                if p.is_file()
                and p.suffix in FOLDER_SUFFIXES
                and not any(x.startswith(".") for x in p.relative_to(self.path).parts)
            )
        return [self.path]


@dataclass
class PoolConfig:
    """Assemble the labelled extra set and the unlabelled pool from a manifest of public sources."""

    # the stage its recipes name (``stage = "pool"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "pool"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sources": ("sources",),
        "holdout": ("holdout_files", "near_leaks", "leak_threshold"),
        "select": (
            "language_shares",
            "language_caps",
            "labelled_rows",
            "unlabelled_rows",
            "min_response_chars",
            "balance_ab",
            "seed",
        ),
        "output": ("out_dir", "chunk_rows", "keep_work"),
    }

    # the manifest: a list of tables (TOML [[sources]]) with name, path, format, labelled, cap, weight, languages,
    # keep_ties
    # (see SourceSpec); dedup keeps the first copy in this order, so list the most trusted source first
    sources: list[dict[str, Any]] = field(default_factory=list)
    # competition files whose prompts no pool row may share (exactly or nearly): the test file and the validation
    # rows (the competition's train file, every row of which is validated once under cross-validation)
    holdout_files: list[str] = field(default_factory=list)
    # folder that receives the outputs, the reports and the resolved config
    out_dir: Path = Path("demo/work/pool")
    # target share of each language in each output, applied when a row budget binds; "other" is every language
    # not named. Default: the competition's mix of its top five languages, English first (the seed's priority)
    language_shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LANGUAGE_SHARES))
    # at most this many rows per language in each output (e.g. {English = 200000}); applied before the budgets
    language_caps: dict[str, int] = field(default_factory=dict)
    # row budget of extra_labelled.parquet, filled toward language_shares; None: no budget (shares do not bind)
    labelled_rows: int | None = None
    # row budget of unlabelled.parquet (the teacher's cost), filled toward language_shares; None: no budget
    unlabelled_rows: int | None = None
    # a response shorter than this (characters, trimmed) drops its row; the seed team filtered short responses
    min_response_chars: int = 3
    # also drop near-duplicates of holdout prompts (MinHash, clean.LeakConfig); false: exact matches only
    near_leaks: bool = True
    # estimated Jaccard similarity (character 5-grams) at or above which a prompt is a near duplicate
    leak_threshold: float = 0.7
    # swap A/B on random labelled rows so that each source's winners are half A (clean.balance_ab)
    balance_ab: bool = True
    # seed of DPO A/B placement, caps, budgets and A/B balancing: the same seed gives the same files
    seed: int = 0
    # raw rows normalised, filtered and written to a shard at a time: bounds memory (200K rows of the competition's
    # lengths peaked at 1.76 GiB with 20,000, 3.07 GiB with 50,000; see the module docstring)
    chunk_rows: int = 20_000
    # keep the shards (out_dir/work) after the run, for debugging
    keep_work: bool = False

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.sources:
            raise DataError("no sources: add [[sources]] tables (name, path, format, labelled) to the recipe")
        specs = self.manifest  # checks every entry
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"source name(s) {dup} appear more than once; give every [[sources]] entry its own name")
        bad = {k: v for k, v in self.language_shares.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad or not sum(self.language_shares.values()) > 0:
            raise ValueError(f"language_shares {self.language_shares}: shares must be >= 0 and not all zero")
        bad = {k: v for k, v in self.language_caps.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"language_caps {bad}: caps must be whole numbers of rows >= 0")
        for name in ("labelled_rows", "unlabelled_rows"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0, or empty for no budget")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be >= 1")
        if not 0 < self.leak_threshold <= 1:
            raise ValueError(f"leak_threshold={self.leak_threshold} must be in (0, 1]")

    @property
    def manifest(self) -> list[SourceSpec]:
        """The checked manifest entries, in order."""
        return [SourceSpec.from_entry(e, i) for i, e in enumerate(self.sources)]

    @property
    def leak(self) -> clean.LeakConfig:
        return clean.LeakConfig(near=self.near_leaks, threshold=self.leak_threshold)


def check_inputs(cfg: PoolConfig) -> list[SourceSpec]:
    """Every source and holdout file is there and readable by name, before any work; all problems in one error."""
    problems = []
    specs = cfg.manifest
    for i, spec in enumerate(specs):
        where = f"source {spec.name!r} (sources[{i}], format {spec.format!r})"
        if not spec.path.exists():
            problems.append(f"{where}: path {spec.path} not found; fix `path` in the manifest or fetch the data")
        elif spec.path.is_dir() and not spec.files():
            problems.append(f"{where}: folder {spec.path} holds no {'/'.join(FOLDER_SUFFIXES)} file; fix `path`")
        elif spec.path.is_file() and spec.path.suffix not in SUFFIXES:
            problems.append(f"{where}: {spec.path} is not {'/'.join(SUFFIXES)}; convert it or point at another file")
    for path in map(Path, cfg.holdout_files):
        if not path.is_file():
            problems.append(f"holdout file {path} not found; fix `holdout_files` (the competition's test/train files)")
    if problems:
        raise DataError("the pool manifest cannot run as written:\n  " + "\n  ".join(problems))
    return specs


# ---- steps -----------------------------------------------------------------------------------------------------


def priority(ids: pd.Series, seed: int) -> np.ndarray:
    """A pseudo-random rank per row from ``(seed, id)`` alone: caps and budgets keep the lowest. (N,) uint64."""
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(f"{seed}:{i}".encode()) for i in ids.tolist()), dtype=np.uint64, count=len(ids)
    )


def _raw_chunks(path: Path, source: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The raw rows of one file, ``chunk_rows`` at a time, indexed by their row number in the file (which is
    what the normalisers use for messages, missing ids and the DPO coin: chunking changes no row's output)."""
    if path.suffix == ".parquet":
        start = 0
        for batch in sources.parquet_batches(path, source, chunk_rows):
            df = batch.to_pandas()
            df.index = pd.RangeIndex(start, start + len(df))
            start += len(df)
            yield df
        return
    raw = sources.read(path, source)
    for lo in range(0, max(len(raw), 1), chunk_rows):
        yield raw.iloc[lo : lo + chunk_rows]


def read_chunks(spec: SourceSpec, seed: int, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, Report]]:
    """The source normalised (``sources.COLUMNS``), file by file and ``chunk_rows`` at a time; with several files
    the ids carry the file's name (row numbers restart in every file)."""
    files = spec.files()
    for k, path in enumerate(files):
        extra = {"seed": seed + k} if spec.format == "dpo" else {}
        if spec.keep_ties:
            extra["keep_ties"] = True
        for raw in _raw_chunks(path, spec.name, chunk_rows):
            frame, report = sources.normalise(raw, spec.format, spec.name, **extra)
            if len(files) > 1:
                frame["source_id"] = path.relative_to(spec.path).as_posix() + ":" + frame["source_id"].astype(str)
                frame["id"] = spec.name + ":" + frame["source_id"]
            if not spec.labelled:
                report.add("normalise", spec.name, "note", "label_dropped", int(frame["winner"].notna().sum()))
                frame["winner"] = None
            yield frame, report


def _language_filter(df: pd.DataFrame, spec: SourceSpec) -> tuple[pd.DataFrame, Report]:
    report = Report()
    src = df["source"].reset_index(drop=True)
    report.add_by_source("source_languages", "in", "", np.ones(len(df), bool), src)
    keep = np.ones(len(df), bool) if spec.languages is None else df["language"].isin(spec.languages).to_numpy()
    report.add_by_source("source_languages", "dropped", "language_not_selected", ~keep, src)
    report.add_by_source("source_languages", "out", "", keep, src)
    return df[keep].reset_index(drop=True), report


def _drop(df: pd.DataFrame, step: str, reasons: dict[str, np.ndarray]) -> tuple[pd.DataFrame, Report]:
    """Rows of ``df`` less those of each reason's mask (a row counted under its first reason), with the report."""
    report = Report()
    src = df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    dropped = np.zeros(len(df), bool)
    for reason, mask in reasons.items():
        report.add_by_source(step, "dropped", reason, mask & ~dropped, src)
        dropped |= mask
    report.add_by_source(step, "out", "", ~dropped, src)
    return df[~dropped].reset_index(drop=True), report


def _rank(df: pd.DataFrame, by: str | pd.Series) -> np.ndarray:
    """Each row's rank (0 = kept first) within its group ``by``, ordered by ``_priority``."""
    order = df.assign(_g=by if isinstance(by, pd.Series) else df[by]).sort_values(["_g", "_priority"], kind="stable")
    ranks = np.empty(len(df), dtype=np.int64)
    ranks[order.index.to_numpy()] = order.groupby("_g", sort=False).cumcount().to_numpy()
    return ranks


def apply_caps(slim: pd.DataFrame, specs: list[SourceSpec]) -> tuple[pd.DataFrame, Report]:
    """At most ``cap`` rows per source, the lowest ``_priority`` kept."""
    cap = slim["source"].map({s.name: (s.cap if s.cap is not None else np.iinfo(np.int64).max) for s in specs})
    return _drop(slim, "cap", {"source_cap": _rank(slim, "source") >= cap.to_numpy()})


def allocate(counts: dict[str, int], shares: dict[str, float], budget: int) -> dict[str, int]:
    """Rows per bucket: ``budget`` split by ``shares``, a bucket short of its share giving the rest to the others
    (water-filling). Never more than a bucket has; the sum is ``min(budget, sum(counts))``."""
    alloc = {b: 0 for b in counts}
    active = [b for b, n in counts.items() if n > 0]
    left = min(budget, sum(counts.values()))
    while active and left > 0:
        weights = {b: float(shares.get(b, 0.0)) for b in active}
        if sum(weights.values()) == 0:  # only unshared buckets are left: split what remains evenly
            weights = dict.fromkeys(active, 1.0)
        total = sum(weights.values())
        quota = {b: left * w / total for b, w in weights.items()}
        short = [b for b in active if counts[b] <= quota[b]]
        if not short:
            base = {b: int(np.floor(q)) for b, q in quota.items()}
            rest = left - sum(base.values())  # rounding: the largest remainders (then names) take one more
            for b in sorted(active, key=lambda b: (-(quota[b] - base[b]), b))[:rest]:
                base[b] += 1
            for b in active:
                alloc[b] += base[b]
            break
        for b in short:
            alloc[b] = counts[b]
            left -= counts[b]
            active.remove(b)
    return alloc


def balance_languages(slim: pd.DataFrame, specs: list[SourceSpec], cfg: PoolConfig) -> tuple[pd.DataFrame, Report]:
    """Per output: ``language_caps`` per language, then the row budget filled toward ``language_shares``."""
    output = slim["source"].map({s.name: s.output for s in specs})
    lang = slim["language"].astype(object).where(slim["language"].notna(), "unknown").astype(str)
    caps = lang.map(cfg.language_caps).fillna(np.inf).to_numpy()
    over_cap = _rank(slim, output + "\x00" + lang) >= caps
    bucket = lang.where(lang.isin(list(cfg.language_shares)), OTHER)
    over_budget = np.zeros(len(slim), bool)
    for name, budget in (("labelled", cfg.labelled_rows), ("unlabelled", cfg.unlabelled_rows)):
        rows = (output == name).to_numpy() & ~over_cap
        if budget is None or rows.sum() <= budget:
            continue
        part = slim[rows].reset_index(drop=True)
        part_bucket = bucket[rows].reset_index(drop=True)
        alloc = allocate(part_bucket.value_counts().to_dict(), cfg.language_shares, budget)
        over_budget[np.flatnonzero(rows)] = _rank(part, part_bucket) >= part_bucket.map(alloc).to_numpy()
    return _drop(slim, "language_balance", {"language_cap": over_cap, "language_balance": over_budget})


def holdout_prompts(files: list[str]) -> pd.DataFrame:
    """The ``prompt`` of every row of every holdout file (parquet read column-only), with its ``file`` and ``row``."""
    out: list[pd.DataFrame] = []
    for path in map(Path, files):
        try:
            df = pd.read_parquet(path, columns=["prompt"]) if path.suffix == ".parquet" else sources.read(path)
        except (KeyError, ValueError, pa.ArrowException) as exc:
            raise DataError(f"holdout file {path}: no 'prompt' column or unreadable ({exc})") from exc
        if "prompt" not in df.columns:
            raise DataError(f"holdout file {path}: no 'prompt' column; found {list(df.columns)}")
        prompts = df["prompt"].dropna().astype(str)
        out.append(pd.DataFrame({"file": str(path), "row": prompts.index.to_numpy(), "prompt": prompts.to_numpy()}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["file", "row", "prompt"])


def _language_counts(slim: pd.DataFrame, step: str) -> pd.DataFrame:
    lang = slim["language"].astype(object).where(slim["language"].notna(), "unknown")
    counts = slim.assign(language=lang).groupby(["source", "language"], sort=False).size()
    return counts.rename("rows").reset_index().assign(step=step)[["step", "source", "language", "rows"]]


# ---- the stage -------------------------------------------------------------------------------------------------


@dataclass
class PoolResult:
    """What :func:`assemble` wrote and counted."""

    # output name ("labelled", "unlabelled") -> parquet path
    paths: dict[str, Path]
    # rows written per output
    rows: dict[str, int]
    # every count of every step, per source
    report: Report
    # rows per step × source × language, from the quality step on
    languages: pd.DataFrame
    # the manifest as run
    manifest: list[SourceSpec]

    def summary(self) -> pd.DataFrame:
        """One line per source: output, rows in, kept, and rows dropped per reason (in = kept + dropped)."""
        return source_summary(self.report, self.manifest)


def source_summary(report: Report, specs: list[SourceSpec]) -> pd.DataFrame:
    t = report.table()
    names = [s.name for s in specs]
    rows_in = t[(t["step"] == "normalise") & (t["kind"] == "in")].groupby("source")["rows"].sum()
    last = t[t["kind"] == "out"].groupby("source")["step"].last()
    kept = t[(t["kind"] == "out") & (t["step"] == t["source"].map(last))].groupby("source")["rows"].sum()
    drops = t[t["kind"] == "dropped"].pivot_table(
        index="source", columns="reason", values="rows", aggfunc="sum", fill_value=0
    )
    out = pd.DataFrame(
        {"output": [s.output for s in specs], "in": rows_in.reindex(names, fill_value=0)}, index=names
    ).assign(kept=kept.reindex(names, fill_value=0))
    out = out.join(drops.reindex(names, fill_value=0)).fillna(0)
    return out.astype({c: np.int64 for c in out.columns if c != "output"}).rename_axis("source")


def assemble(cfg: PoolConfig, progress: bool = False) -> PoolResult:
    """Run the stage (see the module docstring); a bad manifest entry fails before any file is read."""
    specs = check_inputs(cfg)
    holdout = holdout_prompts(cfg.holdout_files)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    work = cfg.out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    report = Report()
    languages: list[pd.DataFrame] = []  # rows per source and language after each step, from quality on
    # steps normalise to source_languages, a chunk at a time; the rest on the slim frame of all sources
    slim, shards = _read_sources(cfg, specs, work, report, languages, progress)
    # ids are unique within a chunk (the normaliser drops repeats); across a source's chunks, here
    slim, rep = _drop(slim, "ids", {"duplicate_id": slim["id"].duplicated().to_numpy()})
    report.extend(rep)
    slim, rep = clean.dedup(slim)
    report.extend(rep)
    languages.append(_language_counts(slim, "dedup"))
    slim, rep, leaks = clean.drop_leaks(slim, holdout["prompt"], cfg.leak)
    matched = holdout.iloc[leaks["holdout_index"].to_numpy()]
    leaks = leaks.assign(holdout_file=matched["file"].to_numpy(), holdout_row=matched["row"].to_numpy())
    report.extend(rep)
    languages.append(_language_counts(slim, "leakage"))
    slim = slim.assign(_priority=priority(slim["id"], cfg.seed))
    slim, rep = apply_caps(slim, specs)
    report.extend(rep)
    languages.append(_language_counts(slim, "cap"))
    slim, rep = balance_languages(slim, specs, cfg)
    report.extend(rep)
    languages.append(_language_counts(slim, "selected"))
    swap = np.zeros(len(slim), bool)
    if cfg.balance_ab:
        # decided on the slim frame (labels only); the texts are swapped as each shard is written
        before = slim["winner"].to_numpy(dtype=object)
        slim, rep = clean.balance_ab(slim, cfg.seed)
        report.extend(rep)
        swap = before != slim["winner"].to_numpy(dtype=object)

    rows = _write_outputs(cfg, shards, slim.assign(_swap=swap))
    if not cfg.keep_work:
        shutil.rmtree(work)
    report.check_balanced()
    lang_table = pd.concat(languages, ignore_index=True)
    lang_table = lang_table.groupby(["step", "source", "language"], sort=False, as_index=False)["rows"].sum()
    result = PoolResult({k: cfg.out_dir / v for k, v in OUTPUT_FILES.items()}, rows, report, lang_table, specs)
    _write_reports(cfg, result, leaks)
    return result


def _read_sources(
    cfg: PoolConfig,
    specs: list[SourceSpec],
    work: Path,
    report: Report,
    languages: list[pd.DataFrame],
    progress: bool,
) -> tuple[pd.DataFrame, list[tuple[SourceSpec, Path]]]:
    """Each source a chunk at a time through the per-chunk steps, its rows written to a shard under ``work``.

    Returns the slim frame of every row kept (manifest order: dedup keeps the first source's copy) and the shards
    (source, path) in the order written; counts go to ``report``, language counts to ``languages``.
    """
    from tqdm.auto import tqdm

    slims, shards = [], []
    # MinHash and language detection read the prompt's head only: the slim frame keeps that much of it
    head = max(100, 4 * cfg.leak.near_max_chars)
    quality = clean.QualityConfig(min_response_chars=cfg.min_response_chars)

    for spec in tqdm(specs, desc="sources", disable=not progress):
        for df, rep in read_chunks(spec, cfg.seed, cfg.chunk_rows):
            report.extend(rep)
            df = clean.add_keys(df)
            keep, rep = clean.quality_mask(df, quality)
            report.extend(rep)
            df = df[keep].reset_index(drop=True)
            df, rep = clean.fill_language(df)
            report.extend(rep)
            df, rep = _language_filter(df, spec)
            report.extend(rep)
            languages.append(_language_counts(df, "quality"))
            shards.append((spec, work / f"{len(shards):05d}.parquet"))
            df[list(sources.COLUMNS)].to_parquet(shards[-1][1], index=False, row_group_size=WRITE_BATCH)
            slim = df[["id", "source", "winner", "language", *clean.KEY_COLUMNS]].assign(
                prompt=df["prompt"].str.slice(0, head), _shard=len(shards) - 1, _shard_row=np.arange(len(df))
            )
            slims.append(slim)
            del df
    return pd.concat(slims, ignore_index=True), shards


def _write_outputs(cfg: PoolConfig, shards: list[tuple[SourceSpec, Path]], slim: pd.DataFrame) -> dict[str, int]:
    """Each shard's selected rows, A/B-swapped where ``_swap`` says, appended to its output in manifest order."""
    writers = {k: pq.ParquetWriter(cfg.out_dir / v, OUTPUT_SCHEMAS[k]) for k, v in OUTPUT_FILES.items()}
    rows = dict.fromkeys(OUTPUT_FILES, 0)
    selected = slim.groupby("_shard", sort=False)
    try:
        for i, (spec, path) in enumerate(shards):
            if i not in selected.groups:
                continue
            part = selected.get_group(i).sort_values("_shard_row")
            take, swaps = part["_shard_row"].to_numpy(), part["_swap"].to_numpy()
            start = 0
            # a batch of the shard at a time: the texts pass through pandas WRITE_BATCH rows at a time
            for batch in pq.ParquetFile(path).iter_batches(batch_size=WRITE_BATCH):
                lo, hi = np.searchsorted(take, [start, start + batch.num_rows])
                rows_here, swap = take[lo:hi] - start, swaps[lo:hi]
                start += batch.num_rows
                if not len(rows_here):
                    continue
                df = batch.take(pa.array(rows_here, type=pa.int64())).to_pandas()
                df["winner"] = df["winner"].astype(object)  # an all-null column reads back as float
                if swap.any():
                    df.loc[swap] = swap_ab(df.loc[swap])
                schema = OUTPUT_SCHEMAS[spec.output]
                tie = np.where(df["winner"].to_numpy(dtype=object) == TIE, 0.5, np.nan)
                df = df.assign(weight=spec.weight, p_a=tie, p_b=tie)[schema.names]
                writers[spec.output].write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))
                rows[spec.output] += len(df)
    finally:
        for w in writers.values():
            w.close()
    return rows


def _write_reports(cfg: PoolConfig, result: PoolResult, leaks: pd.DataFrame) -> None:
    result.report.table().to_csv(cfg.out_dir / "pool_report.csv", index=False)
    result.languages.to_csv(cfg.out_dir / "pool_languages.csv", index=False)
    leaks[["id", "source", "holdout_file", "holdout_row", "similarity"]].to_csv(
        cfg.out_dir / "pool_leaks.csv", index=False
    )
    summary = result.summary()
    doc = {
        "outputs": {k: {"path": str(result.paths[k]), "rows": result.rows[k]} for k in OUTPUT_FILES},
        "sources": [
            {"source": name, **{k: (v if isinstance(v, str) else int(v)) for k, v in row.items()}}
            for name, row in summary.to_dict("index").items()
        ],
        "dropped": result.report.dropped(),
        "notes": result.report.notes(),
        "languages": result.languages.to_dict("records"),
    }
    (cfg.out_dir / "pool_report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    save_config(cfg, cfg.out_dir / "pool_config.json")


def plot_languages(result: PoolResult, step: str = "selected", top: int = 8):
    """Rows per source × language at ``step`` (stacked bars; languages past the ``top`` most common as "other")."""
    import matplotlib.pyplot as plt

    t = result.languages[result.languages["step"] == step]
    keep = t.groupby("language")["rows"].sum().sort_values(ascending=False).index[:top]
    t = t.assign(language=t["language"].where(t["language"].isin(keep), OTHER))
    table = t.pivot_table(index="source", columns="language", values="rows", aggfunc="sum", fill_value=0)
    table = table.reindex([s.name for s in result.manifest], fill_value=0)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.4 * len(table)))
    table.iloc[::-1].plot.barh(ax=ax, stacked=True, title=f"Rows per source and language ({step})")
    ax.set_xlabel("rows")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PoolConfig, argv)
    result = assemble(cfg, progress=True)
    print(result.summary().to_string())
    print({k: f"{result.rows[k]} rows -> {p}" for k, p in result.paths.items()})


if __name__ == "__main__":
    main()
