"""Cleaning the normalised table: quality filters, pair dedup, leakage control, language, A/B balance.

Every step takes a frame in :data:`kaggle_utils.data.sources.COLUMNS` and returns ``(frame, report)``; the
report counts rows in, rows out and rows dropped per reason and per source
(:class:`kaggle_utils.data.sources.Report`). :func:`clean` runs them in order with one :class:`CleanConfig`.

Keys are 64-bit xxh3 hashes. The prompt key hashes the *normalised* prompt (lower case, runs of whitespace
collapsed to one space, trimmed), so prompts differing only in case or spacing are one prompt for dedup,
leakage and folds. Responses are hashed as given (trimmed): re-normalising ~1M long responses costs
more than the rare whitespace-only variants it would catch. A pair key is order-insensitive: it hashes
``(prompt key, min(response keys), max(response keys))``, so (p, a, b) and (p, b, a) are one pair.

Near-duplicate leakage uses MinHash over character 5-grams of the normalised prompt's first
``near_max_chars`` characters, computed in numpy over the UTF-8 bytes (no per-prompt Python loop), with
LSH banding to find candidates and the signature agreement as the Jaccard estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from kaggle_utils.data.schema import swap_ab
from kaggle_utils.data.sources import Report

# ---- keys ----------------------------------------------------------------------------------------------------


def _pylist(texts: Iterable[str]) -> list[str]:
    """Python strings in one bulk conversion (iterating an Arrow-backed column costs ~5 us a row)."""
    if isinstance(texts, list):
        return texts
    if isinstance(texts, (pd.Series, pd.Index, np.ndarray)):
        return texts.tolist()
    return list(texts)


def normalise_text(texts: Iterable[str]) -> list[str]:
    """Lower case, whitespace runs collapsed to one space, trimmed: the form prompts are compared in."""
    return [" ".join(t.lower().split()) for t in _pylist(texts)]


def _hash(texts: Iterable[str]) -> np.ndarray:
    """xxh3-64 of each text's UTF-8 bytes. Shape (N,), uint64."""
    texts = _pylist(texts)
    return np.fromiter((xxhash.xxh3_64_intdigest(t.encode("utf-8")) for t in texts), dtype=np.uint64, count=len(texts))


_CHUNK = 50_000  # rows turned into Python strings at a time: bounds the memory a ~1 GB text column costs


def _chunked(texts: Iterable[str], fn) -> np.ndarray:
    if not isinstance(texts, (pd.Series, np.ndarray)):
        return fn(_pylist(texts))
    parts = [fn(texts[lo : lo + _CHUNK].tolist()) for lo in range(0, len(texts), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def prompt_keys(prompts: Iterable[str]) -> np.ndarray:
    """Hash of each normalised prompt. Shape (N,), uint64."""
    return _chunked(prompts, lambda chunk: _hash(normalise_text(chunk)))


def response_keys(responses: Iterable[str]) -> np.ndarray:
    """Hash of each trimmed response. Shape (N,), uint64."""
    return _chunked(responses, lambda chunk: _hash([r.strip() for r in chunk]))


# Cached key columns (uint64): computed once by `add_keys`, read by every step, dropped by `clean` at the end.
KEY_COLUMNS = ("prompt_key", "response_a_key", "response_b_key")


def add_keys(df: pd.DataFrame) -> pd.DataFrame:
    """The frame with :data:`KEY_COLUMNS` added, so that the steps after it hash each text once."""
    return df.assign(
        prompt_key=prompt_keys(df["prompt"]),
        response_a_key=response_keys(df["response_a"]),
        response_b_key=response_keys(df["response_b"]),
    )


def text_keys(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys of prompt, response A and response B: the cached columns where present, else computed."""
    if all(c in df.columns for c in KEY_COLUMNS):
        return tuple(df[c].to_numpy(dtype=np.uint64) for c in KEY_COLUMNS)
    return prompt_keys(df["prompt"]), response_keys(df["response_a"]), response_keys(df["response_b"])


def _combine(*cols: np.ndarray) -> np.ndarray:
    """One uint64 per row from several uint64 columns (order matters)."""
    return pd.util.hash_pandas_object(pd.DataFrame({i: c for i, c in enumerate(cols)}), index=False).to_numpy()


def pair_keys(df: pd.DataFrame) -> np.ndarray:
    """Order-insensitive key of (prompt, {response_a, response_b}). Shape (N,), uint64."""
    p, a, b = text_keys(df)
    return _combine(p, np.minimum(a, b), np.maximum(a, b))


# ---- quality filters -----------------------------------------------------------------------------------------


@dataclass
class QualityConfig:
    """Thresholds of :func:`quality_filter` (characters are Unicode code points)."""

    # a response shorter than this (after trimming) is dropped as too short; the seed team filtered short responses
    min_response_chars: int = 3
    # a prompt shorter than this (after trimming) is dropped as too short
    min_prompt_chars: int = 1
    # longer prompts are dropped as extreme (the competition's longest is ~30K tokens, ~100K characters)
    max_prompt_chars: int = 100_000
    # longer responses are dropped as extreme (the competition's longest is ~9K tokens)
    max_response_chars: int = 60_000
    # a text whose first `junk_window` characters are less than this share letters/digits is non-text junk
    min_alnum_share: float = 0.25
    # how many leading characters the junk test reads (enough to see what a text is, cheap at 1M texts)
    junk_window: int = 500

    def __post_init__(self) -> None:
        if not 0 <= self.min_alnum_share <= 1:
            raise ValueError(f"min_alnum_share={self.min_alnum_share} must be in [0, 1]")
        if self.min_response_chars < 0 or self.min_prompt_chars < 0:
            raise ValueError("minimum lengths must be >= 0")


def _arrow_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes and (N+1,) int64 offsets of a string array, without copying through Python."""
    arr = pc.cast(arr, pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(1, np.uint8)
    return data, offsets


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Count of true ``values`` in each [offsets[i], offsets[i+1]) segment (int32 running sum: < 2**31 bytes)."""
    csum = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(values, dtype=np.int32, out=csum[1:])
    return (csum[offsets[1:]] - csum[offsets[:-1]]).astype(np.int64)


def _arrow(texts: pd.Series) -> pa.Array | pa.ChunkedArray:
    """The column's Arrow data without a copy (``pa.array`` would join a concatenated table's chunks into one)."""
    data = getattr(texts.array, "_pa_array", None)  # pandas' Arrow-backed string arrays keep a ChunkedArray here
    return data if isinstance(data, pa.ChunkedArray) else pa.array(texts, type=pa.large_string())


def _trimmed_len(arr: pa.Array) -> np.ndarray:
    return pc.utf8_length(pc.utf8_trim_whitespace(arr)).to_numpy(zero_copy_only=False)


def text_stats(texts: pd.Series, window: int = 500, chunk: int = 50_000) -> pd.DataFrame:
    """Per text: ``chars``, ``stripped_chars``, ``alnum_share`` and ``control`` (the last two of the first ``window``).

    Letters/digits are counted on the UTF-8 bytes: ASCII letters and digits, plus every non-ASCII character
    (their lead bytes), since in the scripts this competition sees (Cyrillic, CJK, ...) those are letters.
    """
    arr = _arrow(texts)
    # a slice of rows at a time: the byte-level temporaries (~10 bytes per byte of head) stay ~0.5 GB
    parts = [_text_stats(arr.slice(lo, chunk), window) for lo in range(0, len(arr), chunk)] or [
        _text_stats(arr, window)
    ]
    return pd.DataFrame({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, index=texts.index)


def _text_stats(arr: pa.Array | pa.ChunkedArray, window: int) -> dict[str, np.ndarray]:
    """:func:`text_stats` of one slice of rows."""
    chars = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    head = pc.utf8_slice_codeunits(arr, 0, window)  # a copy of the heads only, not of ~1 GB of responses
    # characters after trimming, only compared with small thresholds: exact for texts up to `window` long and
    # for longer ones whose head is blank; a longer text with a non-blank head counts its full length
    trimmed_head = _trimmed_len(head)
    stripped = np.where(chars <= window, trimmed_head, chars)
    blank_head = np.flatnonzero((trimmed_head == 0) & (chars > window))
    if len(blank_head):
        stripped[blank_head] = _trimmed_len(pc.take(arr, pa.array(blank_head)))
    data, offsets = _arrow_bytes(head)
    data, offsets = data[offsets[0] : offsets[-1]], offsets - offsets[0]
    ascii_alnum = ((data >= 48) & (data <= 57)) | ((data | 32) >= 97) & ((data | 32) <= 122)
    lead = data >= 0xC0  # first byte of a non-ASCII character
    is_char = (data < 0x80) | lead  # continuation bytes 0x80-0xBF are not characters
    control = (data < 32) & (data != 9) & (data != 10) & (data != 13)
    head_chars = _segment_sums(is_char, offsets)
    alnum = _segment_sums(ascii_alnum | lead, offsets)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(head_chars > 0, alnum / np.maximum(head_chars, 1), 0.0)
    return {
        "chars": chars,
        "stripped_chars": stripped,
        "alnum_share": share,
        "control": _segment_sums(control, offsets),
    }


def _take_freeing(column: pd.Series, rows: np.ndarray) -> pd.Series | pd.api.extensions.ExtensionArray:
    """``column``'s values at ascending positions ``rows``, built one Arrow chunk at a time while each input
    chunk is released: the peak is the output plus one chunk, not plus the whole input column."""
    data = _arrow(column)
    if not isinstance(data, pa.ChunkedArray) or len(rows) and np.any(np.diff(rows) < 0):
        return column.array.take(rows)
    dtype = column.dtype
    chunks = data.chunks
    del column, data  # from here on `chunks` holds the only references this function has
    out, start = [], 0
    for i in range(len(chunks)):
        end = start + len(chunks[i])
        lo, hi = np.searchsorted(rows, [start, end])
        out.append(chunks[i].take(pa.array(rows[lo:hi] - start)))
        chunks[i] = None
        start = end
    return pd.array(pa.chunked_array(out, type=out[0].type if out else pa.large_string()), dtype=dtype)


def _select(df: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """Rows where ``keep``, index reset; no copy of the (large) text columns when every row is kept."""
    return df.reset_index(drop=True) if keep.all() else df[keep].reset_index(drop=True)


def quality_filter(df: pd.DataFrame, cfg: QualityConfig | None = None) -> tuple[pd.DataFrame, Report]:
    """Drop empty, whitespace-only, too short, identical, non-text and extreme-length rows; count each reason.

    A row is counted under the first reason (in that order) that applies to any of its three texts.
    """
    keep, report = quality_mask(df, cfg)
    return _select(df, keep), report


def quality_mask(df: pd.DataFrame, cfg: QualityConfig | None = None) -> tuple[np.ndarray, Report]:
    """:func:`quality_filter`'s verdict without applying it: the (N,) bool mask of rows kept, and the report."""
    cfg = cfg or QualityConfig()
    report = Report()
    step, src = "quality", df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    stats = {
        c: text_stats(df[c].reset_index(drop=True), cfg.junk_window) for c in ("prompt", "response_a", "response_b")
    }
    resp = ("response_a", "response_b")
    if all(c in df.columns for c in KEY_COLUMNS):
        key_a, key_b = df["response_a_key"].to_numpy(dtype=np.uint64), df["response_b_key"].to_numpy(dtype=np.uint64)
    else:
        key_a, key_b = response_keys(df["response_a"]), response_keys(df["response_b"])
    reasons = {
        "empty": np.logical_or.reduce([s["chars"].to_numpy() == 0 for s in stats.values()]),
        "whitespace_only": np.logical_or.reduce([s["stripped_chars"].to_numpy() == 0 for s in stats.values()]),
        "too_short": (stats["prompt"]["stripped_chars"].to_numpy() < cfg.min_prompt_chars)
        | np.logical_or.reduce([stats[c]["stripped_chars"].to_numpy() < cfg.min_response_chars for c in resp]),
        "identical_responses": key_a == key_b,
        "non_text": np.logical_or.reduce(
            [
                (s["alnum_share"].to_numpy() < cfg.min_alnum_share) | (s["control"].to_numpy() > 0)
                for s in stats.values()
            ]
        ),
        "extreme_length": (stats["prompt"]["chars"].to_numpy() > cfg.max_prompt_chars)
        | np.logical_or.reduce([stats[c]["chars"].to_numpy() > cfg.max_response_chars for c in resp]),
    }
    dropped = np.zeros(len(df), dtype=bool)
    for reason, mask in reasons.items():
        report.add_by_source(step, "dropped", reason, mask & ~dropped, src)
        dropped |= mask
    report.add_by_source(step, "out", "", ~dropped, src)
    return ~dropped, report


# ---- dedup ---------------------------------------------------------------------------------------------------


def dedup(df: pd.DataFrame) -> tuple[pd.DataFrame, Report]:
    """Keep the first row of every order-insensitive pair, within and across sources.

    Put the most trusted source first: its copy is the one kept. A dropped copy counts as
    ``duplicate_pair`` (same A/B order as the kept row) or ``duplicate_pair_swapped``; copies whose label
    disagrees with the kept row (after aligning A/B) are also counted as the note ``label_conflict``.
    """
    report = Report()
    step, src = "dedup", df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    p, a, b = text_keys(df)
    key = _combine(p, np.minimum(a, b), np.maximum(a, b))
    keys = pd.Series(key)
    dup = keys.duplicated().to_numpy()
    first = pd.Series(np.arange(len(df))).groupby(keys).transform("first").to_numpy()
    same_order = a == a[first]
    report.add_by_source(step, "dropped", "duplicate_pair", dup & same_order, src)
    report.add_by_source(step, "dropped", "duplicate_pair_swapped", dup & ~same_order, src)
    if "winner" in df.columns:
        w = df["winner"].to_numpy(dtype=object)
        flipped = np.where(w == "model_a", "model_b", np.where(w == "model_b", "model_a", w))
        aligned = np.where(same_order, w, flipped)
        conflict = dup & pd.notna(w) & pd.notna(w[first]) & (aligned != w[first])
        report.add_by_source(step, "note", "label_conflict", conflict, src)
    report.add_by_source(step, "out", "", ~dup, src)
    return _select(df, ~dup), report


# ---- leakage -------------------------------------------------------------------------------------------------

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (splitmix64 finaliser), vectorised; wraps modulo 2**64 by design."""
    with np.errstate(over="ignore"):
        x = x + _MIX
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def minhash(
    texts: list[str], num_perm: int = 32, ngram: int = 5, max_chars: int = 300, chunk: int = 50_000
) -> np.ndarray:
    """MinHash signatures of character ``ngram``-grams of each text's first ``max_chars`` chars. (N, num_perm) uint32.

    A text shorter than ``ngram`` bytes is one shingle (itself, zero-padded); an empty text gets all-ones.
    """
    rng = np.random.default_rng(12345)  # fixed: signatures must agree between calls and processes
    # h -> a*h + b mod 2**32 with odd a is a permutation of the 32-bit hashes: one per signature column
    mult = (rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)).astype(np.uint32)
    add = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for lo in range(0, len(texts), chunk):
        arr = pa.array([t[:max_chars] for t in texts[lo : lo + chunk]], type=pa.large_string())
        data, offsets = _arrow_bytes(arr)
        lengths = np.diff(offsets)
        n = len(lengths)
        # each doc padded with ngram zero bytes: no shingle spans two docs, an empty doc still has one
        padded_len = lengths + ngram
        starts = np.concatenate([[0], np.cumsum(padded_len)[:-1]])
        buf = np.zeros(int(padded_len.sum()), dtype=np.uint64)
        doc_of_byte = np.repeat(np.arange(n), lengths)
        within = np.arange(len(doc_of_byte)) - np.repeat(offsets[:-1] - offsets[0], lengths)
        buf[starts[doc_of_byte] + within] = data[offsets[0] : offsets[-1]]
        # shingle value at position i: bytes i..i+ngram-1 packed into one integer
        width = len(buf) - (ngram - 1)
        val = np.zeros(width, dtype=np.uint64)
        for k in range(ngram):
            val |= buf[k : k + width] << np.uint64(8 * k)
        # valid positions: the first max(len, 1) of each padded doc
        n_shingles = np.maximum(lengths, 1)
        pos = np.repeat(starts, n_shingles) + (
            np.arange(n_shingles.sum()) - np.repeat(np.cumsum(n_shingles) - n_shingles, n_shingles)
        )
        h = (_splitmix(val[pos]) >> np.uint64(32)).astype(np.uint32)  # (shingles,) uint32
        seg = np.concatenate([[0], np.cumsum(n_shingles)[:-1]])
        sig = np.empty((n, num_perm), dtype=np.uint32)
        with np.errstate(over="ignore"):
            for p in range(num_perm):
                sig[:, p] = np.minimum.reduceat(h * mult[p] + add[p], seg)
        sig[lengths == 0] = np.iinfo(np.uint32).max
        out[lo : lo + n] = sig
    return out


@dataclass
class LeakConfig:
    """Options of :func:`drop_leaks`."""

    # also drop near-duplicate prompts (MinHash); False: exact matches after normalisation only
    near: bool = True
    # estimated Jaccard similarity of character 5-gram sets at or above which a prompt is a near duplicate
    threshold: float = 0.7
    # prompts shorter than this (normalised) are matched exactly only: a few shared 5-grams are not a leak
    near_min_chars: int = 30
    # MinHash reads this many leading characters of each prompt (a copy with edits further on still matches)
    near_max_chars: int = 300
    # signature length = bands * rows; a pair becomes a candidate when one band agrees
    bands: int = 8
    rows: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")


def drop_leaks(
    df: pd.DataFrame, holdout_prompts: Iterable[str], cfg: LeakConfig | None = None
) -> tuple[pd.DataFrame, Report, pd.DataFrame]:
    """Drop training rows whose prompt matches a validation/test prompt: exactly (normalised) or nearly.

    Returns the kept rows, the report (``leak_exact`` / ``leak_near`` per source) and the dropped rows with
    the matched holdout prompt's index (``holdout_index``) and the estimated similarity.
    """
    cfg = cfg or LeakConfig()
    report = Report()
    step, src = "leakage", df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    hold = pd.Series(list(holdout_prompts), dtype=object)
    hold_norm = normalise_text(hold)
    tk, hk = (df["prompt_key"].to_numpy(dtype=np.uint64) if "prompt_key" in df.columns else None), _hash(hold_norm)
    # MinHash reads the head of each normalised prompt, and only prompts long enough can be near duplicates:
    # normalising heads (4x the characters read, enough unless whitespace runs are long) bounds the memory
    train_norm = [""] * len(df)
    lengths = pc.utf8_length(_arrow(df["prompt"])).to_numpy(zero_copy_only=False)
    long_enough = np.flatnonzero(lengths >= cfg.near_min_chars)
    heads = df["prompt"].iloc[long_enough].str.slice(0, 4 * cfg.near_max_chars)
    for i, t in zip(long_enough, normalise_text(heads), strict=True):
        train_norm[i] = t[: cfg.near_max_chars]
    if tk is None:
        tk = prompt_keys(df["prompt"])
    first_hold = pd.Series(np.arange(len(hk)), index=hk).groupby(level=0).first()
    exact = np.isin(tk, hk)
    match = np.full(len(df), -1, dtype=np.int64)
    match[exact] = first_hold.reindex(tk[exact]).to_numpy()
    similarity = np.where(exact, 1.0, 0.0)
    near = np.zeros(len(df), dtype=bool)
    if cfg.near and len(hold_norm) and len(df):
        near, near_match, near_sim = _near_matches(train_norm, tk, hold_norm, hk, ~exact, cfg)
        match[near], similarity[near] = near_match[near], near_sim[near]
    report.add_by_source(step, "dropped", "leak_exact", exact, src)
    report.add_by_source(step, "dropped", "leak_near", near, src)
    leak = exact | near
    report.add_by_source(step, "out", "", ~leak, src)
    dropped = df[leak].assign(holdout_index=match[leak], similarity=similarity[leak]).reset_index(drop=True)
    return _select(df, ~leak), report, dropped


def _near_matches(train_norm, tk, hold_norm, hk, eligible, cfg: LeakConfig):
    """For each eligible training prompt: is it near a holdout prompt, which one, how similar (estimated)."""
    n = len(train_norm)
    lengths = np.fromiter((len(t) for t in train_norm), dtype=np.int64, count=n)
    eligible = eligible & (lengths >= cfg.near_min_chars)
    # one signature per distinct prompt on each side
    t_idx = np.flatnonzero(eligible)
    t_uni, t_first, t_inv = np.unique(tk[t_idx], return_index=True, return_inverse=True)
    h_long = np.flatnonzero(np.fromiter((len(t) >= cfg.near_min_chars for t in hold_norm), bool, len(hold_norm)))
    h_uni, h_first = np.unique(hk[h_long], return_index=True)
    best_sim = np.zeros(len(t_uni))
    best_hold = np.full(len(t_uni), -1, dtype=np.int64)
    if len(t_uni) and len(h_uni):
        num_perm = cfg.bands * cfg.rows
        t_sig = minhash([train_norm[i] for i in t_idx[t_first]], num_perm, max_chars=cfg.near_max_chars)
        h_rows = h_long[h_first]
        h_sig = minhash([hold_norm[i] for i in h_rows], num_perm, max_chars=cfg.near_max_chars)
        cand = []
        for band in range(cfg.bands):
            cols = slice(band * cfg.rows, (band + 1) * cfg.rows)
            t_band = _combine(*t_sig[:, cols].T.astype(np.uint64))
            h_band = _combine(*h_sig[:, cols].T.astype(np.uint64))
            m = pd.DataFrame({"k": t_band, "t": np.arange(len(t_band))}).merge(
                pd.DataFrame({"k": h_band, "h": np.arange(len(h_band))}), on="k"
            )
            cand.append(m[["t", "h"]])
        pairs = pd.concat(cand).drop_duplicates()
        if len(pairs):
            ti, hi = pairs["t"].to_numpy(), pairs["h"].to_numpy()
            sim = (t_sig[ti] == h_sig[hi]).mean(axis=1)
            order = np.lexsort((-sim, ti))  # per training prompt, its most similar holdout prompt first
            ti, hi, sim = ti[order], hi[order], sim[order]
            firsts = np.r_[True, ti[1:] != ti[:-1]]
            best_sim[ti[firsts]] = sim[firsts]
            best_hold[ti[firsts]] = h_rows[hi[firsts]]
    near = np.zeros(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    sim_out = np.zeros(n)
    near[t_idx] = best_sim[t_inv] >= cfg.threshold
    match[t_idx] = best_hold[t_inv]
    sim_out[t_idx] = best_sim[t_inv]
    return near, match, sim_out


# ---- language ------------------------------------------------------------------------------------------------

# py3langid's ISO 639-1 codes to the language names the competition's `language` column uses
LANGUAGE_NAMES = {
    "en": "English", "ru": "Russian", "zh": "Chinese", "vi": "Vietnamese", "de": "German", "ja": "Japanese",
    "ko": "Korean", "es": "Spanish", "fr": "French", "pt": "Portuguese", "it": "Italian", "uk": "Ukrainian",
    "pl": "Polish", "tr": "Turkish", "ar": "Arabic", "id": "Indonesian", "nl": "Dutch", "fa": "Persian",
    "th": "Thai", "hi": "Hindi", "cs": "Czech", "sv": "Swedish", "he": "Hebrew", "hu": "Hungarian",
    "el": "Greek", "ro": "Romanian", "bn": "Bengali", "fi": "Finnish", "da": "Danish", "no": "Norwegian",
    "bg": "Bulgarian", "ms": "Malay", "sr": "Serbian", "hr": "Croatian", "sk": "Slovak", "ca": "Catalan",
}  # fmt: skip


def detect_language(texts: Iterable[str], head_chars: int = 100, progress: bool = False) -> list[str]:
    """Language name of each text from its first ``head_chars`` characters (py3langid: model inside the wheel)."""
    import py3langid
    from tqdm.auto import tqdm

    texts = list(texts)
    out = []
    for t in tqdm(texts, desc="detect language", disable=not progress, mininterval=1.0):
        code = py3langid.classify(t[:head_chars])[0] if t.strip() else "unknown"
        out.append(LANGUAGE_NAMES.get(code, code))
    return out


def fill_language(df: pd.DataFrame, progress: bool = False) -> tuple[pd.DataFrame, Report]:
    """Keep given ``language`` labels; detect the missing ones from the prompt (once per distinct prompt)."""
    report = Report()
    step, src = "language", df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    lang = df["language"].astype(object).to_numpy(dtype=object) if "language" in df.columns else None
    if lang is None:
        lang = np.full(len(df), None, dtype=object)
    missing = pd.isna(lang) | (lang == "")
    if missing.any():
        # once per distinct prompt, reading only the head of one row per prompt
        rows = np.flatnonzero(missing)
        keys = df["prompt_key"].to_numpy()[rows] if "prompt_key" in df.columns else prompt_keys(df["prompt"].iloc[rows])
        inv, uniq = pd.factorize(keys)
        first = rows[pd.Series(np.arange(len(rows))).groupby(inv).first().to_numpy()]
        heads = df["prompt"].iloc[first].str.slice(0, 100).tolist()
        lang = lang.copy()
        lang[missing] = np.asarray(detect_language(heads, progress=progress), dtype=object)[inv]
    report.add_by_source(step, "note", "language_detected", missing, src)
    report.add_by_source(step, "out", "", np.ones(len(df), bool), src)
    return df.assign(language=lang), report


# ---- A/B balance ---------------------------------------------------------------------------------------------


def ab_balance(df: pd.DataFrame) -> pd.DataFrame:
    """Per source: labelled rows, rows won by A and by B, and the share won by A."""
    lab = df[df["winner"].isin(["model_a", "model_b"])]
    t = lab.groupby("source", sort=False)["winner"].value_counts().unstack(fill_value=0)
    t = t.reindex(columns=["model_a", "model_b"], fill_value=0).rename(
        columns={"model_a": "a_wins", "model_b": "b_wins"}
    )
    t.insert(0, "rows", t["a_wins"] + t["b_wins"])
    t["share_a"] = (t["a_wins"] / t["rows"]).round(4)
    return t.rename_axis(index="source", columns=None).reset_index()


def balance_ab(df: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, Report]:
    """Swap A and B (``data.swap_ab``) on random rows of the majority side, per source, until A wins half.

    After it, each source's A-wins and B-wins differ by at most one; unlabelled rows are left as they are.
    """
    report = Report()
    step, src = "balance", df["source"].reset_index(drop=True)
    report.add_by_source(step, "in", "", np.ones(len(df), bool), src)
    df = df.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    swap = np.zeros(len(df), dtype=bool)
    winner = df["winner"].to_numpy(dtype=object)
    for source in pd.unique(src):
        in_src = (src == source).to_numpy()
        a_rows = np.flatnonzero(in_src & (winner == "model_a"))
        b_rows = np.flatnonzero(in_src & (winner == "model_b"))
        excess = (len(a_rows) - len(b_rows)) // 2
        pool = a_rows if excess > 0 else b_rows
        swap[rng.choice(pool, size=abs(excess), replace=False)] = True
    out = df.copy()
    if swap.any():
        swapped = swap_ab(df.loc[swap])
        if "response_a_key" in swapped.columns:  # cached keys follow their texts
            swapped["response_a_key"], swapped["response_b_key"] = (
                df.loc[swap, "response_b_key"].to_numpy(),
                df.loc[swap, "response_a_key"].to_numpy(),
            )
        out.loc[swap] = swapped
    report.add_by_source(step, "note", "swapped", swap, src)
    report.add_by_source(step, "out", "", np.ones(len(df), bool), src)
    return out, report


# ---- all steps -----------------------------------------------------------------------------------------------


@dataclass
class CleanConfig:
    """What :func:`clean` runs; each step's own options sit in its config."""

    # thresholds of the quality filters
    quality: QualityConfig | None = None
    # leakage control against the holdout prompts (exact always; near duplicates per its `near` field)
    leak: LeakConfig | None = None
    # drop duplicate pairs (order-insensitive) within and across sources
    dedup: bool = True
    # detect a language where the source gave none
    fill_language: bool = True
    # swap A/B on random rows so that every source's labels are balanced
    balance: bool = False
    # seed of the balancing swaps
    seed: int = 0

    def __post_init__(self) -> None:
        self.quality = self.quality or QualityConfig()
        self.leak = self.leak or LeakConfig()


def clean(
    df: pd.DataFrame,
    holdout_prompts: Iterable[str] = (),
    cfg: CleanConfig | None = None,
    progress: bool = False,
    on_step: Callable[[str], None] | None = None,
    keep_keys: bool = False,
) -> tuple[pd.DataFrame, Report]:
    """Quality filters, dedup, leakage control, language fill and (optionally) A/B balancing, in that order.

    Memory: the responses (most of the bytes) are hashed once, set aside while the other steps filter a slim
    frame, and taken once at the end, one column at a time. Pass a frame nothing else refers to (e.g.
    ``clean(frames.pop(), ...)``) and the input's responses are freed column by column as the output's are
    made. ``on_step(name)`` is called as each step ends (for timing and memory); ``keep_keys`` keeps the
    :data:`KEY_COLUMNS` for a later step (``prepare.assign_folds`` reads ``prompt_key``).
    """
    from tqdm.auto import tqdm

    cfg = cfg or CleanConfig()
    report = Report()
    holdout_prompts = list(holdout_prompts)
    columns = list(df.columns)
    bar = tqdm(total=4 + cfg.dedup + cfg.fill_language + cfg.balance, desc="clean", disable=not progress)

    def lap(name: str) -> None:
        if on_step is not None:
            on_step(name)
        bar.set_postfix_str(name)
        bar.update()

    df = add_keys(df)
    lap("keys")
    keep, rep = quality_mask(df, cfg.quality)
    report.extend(rep)
    responses = {c: df.pop(c) for c in ("response_a", "response_b")}
    slim = _select(df.assign(_row=np.arange(len(df))), keep)
    del df
    lap("quality")
    if cfg.dedup:
        slim, rep = dedup(slim)
        report.extend(rep)
        lap("dedup")
    slim, rep, _ = drop_leaks(slim, holdout_prompts, cfg.leak)
    report.extend(rep)
    lap("leakage")
    if cfg.fill_language:
        slim, rep = fill_language(slim, progress=progress)
        report.extend(rep)
        lap("language")
    rows = slim.pop("_row").to_numpy()
    for c in ("response_a", "response_b"):
        slim[c] = _take_freeing(responses.pop(c), rows)
    out = slim[columns + [c for c in KEY_COLUMNS if c not in columns]]
    lap("take")
    if cfg.balance:
        out, rep = balance_ab(out, cfg.seed)
        report.extend(rep)
        lap("balance")
    bar.close()
    return (out if keep_keys else out.drop(columns=[c for c in KEY_COLUMNS if c not in columns])), report
