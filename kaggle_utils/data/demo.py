"""Deterministic SYNTHETIC demo data in the exact WSDM Cup (Multilingual Chatbot Arena) schema.

The real competition data cannot be redistributed and is far too large for a CPU smoke run, so this
module writes a small stand-in with the same files and columns::

    train.parquet          id (str), prompt, response_a, response_b, winner, model_a, model_b, language
    test.parquet           id (int64), prompt, response_a, response_b, scored (bool, all True)
    unlabeled.parquet      id (str), prompt, response_a, response_b, model_a, model_b, language
    sample_submission.csv  id, winner (every test id, winner "model_a")
    test_labels.csv        id, winner (answer key for test.parquet; the real competition has none)
    README.md              what the data is and how it was made

Every parquet file carries ``{b"synthetic": b"true", b"generator": b"kaggle_utils.data.demo"}`` in its
Arrow schema metadata, and every string id starts with ``syn-``.

Preference signal (what a model can learn)
------------------------------------------
Each pair holds one *good* and one *flawed* response, written from the same per-language word bank:

* the good response opens with a short structured lead in the row's language: a markdown heading
  (``## Answer``), a bold label (``**Answer:**``) or a numbered list (``1.`` / ``2.`` / ``3.`` lines), and
  is on average ~20% longer;
* the flawed response opens (first sentence) with one phrase from a small fixed set of refusal /
  apology / filler phrases in the row's language (``FLAW_MARKERS``, e.g. "I'm sorry, but I cannot help
  with that.", "Извините, но я не могу помочь с этим.", "抱歉，我无法帮助您。").

The good response sits at A or B with probability 1/2 each (so labels are balanced), the winner is the
good one, and then a ``label_noise`` fraction of labels is flipped at random. With ``label_noise=0`` the
rule "the response containing a flaw marker loses" is exactly right; with noise ``p`` it scores
about ``1 - p``, the ceiling for any model. Model names carry no signal.

Lengths follow the real token profile scaled down by ``length_scale``: prompt ~ lognormal(ln 39, 1.93),
each response ~ lognormal(ln 452, 0.60), counted in words (1 word ~ 1 token; for Chinese / Japanese a
"word" is a short phrase of a few characters), at least 3 prompt words and 8 response words, at most
400 and 300.

Only ``numpy.random.default_rng`` seeded from ``seed`` is used, so the same seed gives identical files.

Run ``python -m kaggle_utils.data.demo --out-dir demo/data`` (``--help`` lists the options).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kaggle_utils.config.cli import parse_config
from kaggle_utils.config.recipes import tomllib

SYNTHETIC_METADATA: dict[bytes, bytes] = {b"synthetic": b"true", b"generator": b"kaggle_utils.data.demo"}

# Chatbot names in the competition's style; two different ones per row, independent of the winner.
MODEL_NAMES: tuple[str, ...] = (
    "gpt-4o-2024-05-13",
    "gpt-4o-mini-2024-07-18",
    "claude-3-5-sonnet-20240620",
    "claude-3-haiku-20240307",
    "llama-3.1-70b-instruct",
    "llama-3.1-405b-instruct",
    "gemma-2-27b-it",
    "gemma-2-9b-it",
    "qwen2.5-72b-instruct",
    "mistral-large-2407",
    "gemini-1.5-pro-002",
    "deepseek-v2.5",
    "yi-lightning",
    "command-r-plus-08-2024",
)

# Language mix, roughly the real one (normalised when sampling); "unknown" rows use English text.
LANGUAGE_WEIGHTS: dict[str, float] = {
    "English": 0.50,
    "Russian": 0.13,
    "Chinese": 0.09,
    "Vietnamese": 0.06,
    "German": 0.03,
    "Japanese": 0.03,
    "Korean": 0.02,
    "Spanish": 0.02,
    "French": 0.015,
    "unknown": 0.02,
}

# The word tables (word banks, punctuation, openers, lead labels and flaw markers, per language) are data:
# demo_words.toml beside this module.
WORDS_FILE = Path(__file__).with_name("demo_words.toml")
_WORDS: dict[str, dict] = tomllib.loads(WORDS_FILE.read_text(encoding="utf-8"))
# a flawed response opens with one of these (refusal, AI disclaimer, apology, filler)
FLAW_MARKERS: dict[str, list[str]] = {lang: list(table["flaws"]) for lang, table in _WORDS.items()}
FLAW_MARKERS["unknown"] = list(FLAW_MARKERS["English"])

EMOJI: tuple[str, ...] = ("🙂", "😊", "🚀", "✅", "📌", "💡", "🔥", "👍", "✨", "🎉")

# Real token-length profile of the competition (before ``length_scale``).
PROMPT_MU, PROMPT_SIGMA = math.log(39.0), 1.93
RESPONSE_MU, RESPONSE_SIGMA = math.log(452.0), 0.60
GOOD_LENGTH_FACTOR = 1.2
MIN_PROMPT_WORDS, MAX_PROMPT_WORDS = 3, 400
MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS = 8, 300


@dataclass
class DemoDataConfig:
    """Write a small deterministic SYNTHETIC dataset in the WSDM Cup schema (train/test/unlabeled)."""

    # folder the files are written into (created if missing)
    out_dir: Path = Path("demo/data")
    # labelled training rows (train.parquet)
    n_train: int = 1200
    # test rows (test.parquet); their answers go to test_labels.csv, which the real competition does not have
    n_test: int = 300
    # unlabelled rows for pseudo-labelling (unlabeled.parquet)
    n_unlabeled: int = 600
    # seed: same seed -> identical files
    seed: int = 0
    # multiplies the real length profile (lognormal token lengths) so the demo stays CPU-sized
    length_scale: float = 0.12
    # fraction of labels flipped at random, so the signal is learnable but not perfect
    label_noise: float = 0.1

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("n_train", "n_test", "n_unlabeled"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not (math.isfinite(self.length_scale) and self.length_scale > 0):
            raise ValueError(f"length_scale must be a positive number, got {self.length_scale!r}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(
                f"label_noise must be in [0, 0.5) (0.5 or more would erase or invert the signal), "
                f"got {self.label_noise!r}"
            )


@dataclass(frozen=True)
class _Lang:
    """How to write text in one language: word bank, punctuation and the good-response leads."""

    words: tuple[str, ...]
    # joins words ("" for Chinese / Japanese)
    sep: str
    stop: str
    qmark: str
    # capitalise the first letter of each sentence
    caps: bool
    questions: tuple[str, ...]
    instructions: tuple[str, ...]
    # label words for the structured lead of a good response ("Answer", "Summary", ...)
    labels: tuple[str, ...]
    # Spanish opens questions with "¿"
    qopen: str = ""


def _w(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split("|") if w.strip())


def _lang(table: dict) -> _Lang:
    """One language's table of demo_words.toml: its |-joined lists split (the flaws go to FLAW_MARKERS)."""
    lists = ("words", "questions", "instructions", "labels")
    return _Lang(**{k: _w(v) if k in lists else v for k, v in table.items() if k != "flaws"})


_LANGS: dict[str, _Lang] = {lang: _lang(table) for lang, table in _WORDS.items()}
_LANGS["unknown"] = _LANGS["English"]

_LANG_NAMES: tuple[str, ...] = tuple(LANGUAGE_WEIGHTS)
_LANG_P = np.array([LANGUAGE_WEIGHTS[k] for k in _LANG_NAMES], dtype=float)
_LANG_P = _LANG_P / _LANG_P.sum()


class _Writer:
    """Samples text for one language from one shared ``numpy`` generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def pick(self, items: Sequence[str]) -> str:
        return items[int(self.rng.integers(len(items)))]

    def words(self, lang: _Lang, n: int) -> list[str]:
        """Bank entries adding up to ``n`` words (an entry such as "thời gian" counts as two)."""
        idx = self.rng.integers(len(lang.words), size=n)
        out: list[str] = []
        count = 0
        for i in idx:
            if count >= n:
                break
            out.append(lang.words[i])
            count += len(lang.words[i].split()) if lang.sep else 1
        return out

    def sentence(self, lang: _Lang, words: list[str], stop: str | None = None) -> str:
        text = lang.sep.join(words)
        if lang.caps:
            # capitalise the first letter, skipping a leading "**" of a bolded word
            j = next((k for k, ch in enumerate(text) if ch.isalpha()), None)
            if j is not None:
                text = text[:j] + text[j].upper() + text[j + 1 :]
        if self.rng.random() < 0.05:
            text += lang.sep + self.pick(EMOJI) if lang.sep else self.pick(EMOJI)
        return text + (lang.stop if stop is None else stop)

    def body(self, lang: _Lang, n_words: int) -> str:
        """``n_words`` words as sentences of 5-12 words in paragraphs, with markdown now and then."""
        words = self.words(lang, n_words)
        if lang.sep and self.rng.random() < 0.15:
            i = int(self.rng.integers(len(words)))
            words[i] = f"**{words[i]}**"
        sentences: list[str] = []
        pos = 0
        while pos < len(words):
            k = int(self.rng.integers(5, 13))
            chunk = words[pos : pos + k]
            pos += k
            if len(chunk) < 3 and sentences:
                # glue a short tail onto the previous sentence rather than emit a 1-2 word sentence
                prev = sentences.pop()
                prev_words = prev[: -len(lang.stop)] + lang.sep + lang.sep.join(chunk)
                sentences.append(prev_words + lang.stop)
                continue
            sentences.append(self.sentence(lang, chunk))
        paragraphs: list[str] = []
        i = 0
        while i < len(sentences):
            k = int(self.rng.integers(2, 5))
            para = sentences[i : i + k]
            i += k
            if len(para) >= 2 and self.rng.random() < 0.12:
                paragraphs.append("\n".join("- " + s for s in para))
            else:
                paragraphs.append((" " if lang.sep else "").join(para))
        return "\n\n".join(paragraphs)

    def prompt(self, lang: _Lang, n_words: int) -> str:
        is_question = self.rng.random() < 0.6
        head = self.pick(lang.questions if is_question else lang.instructions)
        n_head = max(1, len(head.split()))
        n_topic = max(1, min(n_words - n_head, int(self.rng.integers(2, 9))))
        topic = lang.sep.join(self.words(lang, n_topic))
        if is_question:
            first = f"{lang.qopen}{head}{lang.sep}{topic}{lang.qmark}"
        else:
            first = f"{head}{lang.sep}{topic}{lang.stop}"
        rest = n_words - n_head - n_topic
        if rest >= 3:
            context = self.body(lang, rest)
            # long prompts: context first, then the question, like most real long prompts
            text = context + "\n\n" + first
        else:
            text = first
        if self.rng.random() < 0.04:
            text += " " + self.pick(EMOJI)
        return text

    def good_response(self, lang: _Lang, n_words: int) -> str:
        style = int(self.rng.integers(3))
        label = self.pick(lang.labels)
        if style == 0:
            return f"## {label}\n\n" + self.body(lang, max(3, n_words - 1))
        if style == 1:
            return f"**{label}:** " + self.body(lang, max(3, n_words - 1))
        n_items = int(self.rng.integers(2, 5))
        items = []
        used = 0
        for j in range(n_items):
            k = int(self.rng.integers(3, 7))
            used += k
            items.append(f"{j + 1}. " + self.sentence(lang, self.words(lang, k)))
        lead = "\n".join(items)
        rest = n_words - used
        return lead if rest < 3 else lead + "\n\n" + self.body(lang, rest)

    def flawed_response(self, lang: _Lang, marker: str, n_words: int) -> str:
        n_marker = len(marker.split()) if lang.sep else 2
        rest = max(3, n_words - n_marker)
        return marker + (" " if lang.sep else "") + self.body(lang, rest)


def _lengths(rng: np.random.Generator, mu: float, sigma: float, scale: float, lo: int, hi: int, n: int) -> np.ndarray:
    raw = rng.lognormal(mean=mu, sigma=sigma, size=n) * scale
    return np.clip(np.rint(raw), lo, hi).astype(int)


def _make_rows(rng: np.random.Generator, n: int, cfg: DemoDataConfig) -> pd.DataFrame:
    """``n`` labelled rows: prompt, response_a/b, winner, model_a/b, language (all drawn from ``rng``)."""
    langs = rng.choice(len(_LANG_NAMES), size=n, p=_LANG_P)
    prompt_len = _lengths(rng, PROMPT_MU, PROMPT_SIGMA, cfg.length_scale, MIN_PROMPT_WORDS, MAX_PROMPT_WORDS, n)
    good_scale = cfg.length_scale * GOOD_LENGTH_FACTOR
    good_len = _lengths(rng, RESPONSE_MU, RESPONSE_SIGMA, good_scale, MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS, n)
    bad_len = _lengths(rng, RESPONSE_MU, RESPONSE_SIGMA, cfg.length_scale, MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS, n)
    good_is_a = rng.random(n) < 0.5
    flip = rng.random(n) < cfg.label_noise
    writer = _Writer(rng)
    records: dict[str, list[str]] = {k: [] for k in ("prompt", "response_a", "response_b", "winner")}
    records.update(model_a=[], model_b=[], language=[])
    for i in range(n):
        name = _LANG_NAMES[int(langs[i])]
        lang = _LANGS[name]
        markers = FLAW_MARKERS[name]
        marker = markers[int(rng.integers(len(markers)))]
        prompt = writer.prompt(lang, int(prompt_len[i]))
        good = writer.good_response(lang, int(good_len[i]))
        bad = writer.flawed_response(lang, marker, int(bad_len[i]))
        if any(m in good for m in markers):  # cannot happen with the banks above; guards future edits
            raise RuntimeError(f"a good {name} response contains a flaw marker: {good[:80]!r}")
        a_wins = bool(good_is_a[i]) != bool(flip[i])
        ma, mb = rng.choice(len(MODEL_NAMES), size=2, replace=False)
        records["prompt"].append(prompt)
        records["response_a"].append(good if good_is_a[i] else bad)
        records["response_b"].append(bad if good_is_a[i] else good)
        records["winner"].append("model_a" if a_wins else "model_b")
        records["model_a"].append(MODEL_NAMES[int(ma)])
        records["model_b"].append(MODEL_NAMES[int(mb)])
        records["language"].append(name)
    return pd.DataFrame(records)


def _string_ids(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique ids like ``syn-3f9a0c1d2b4e5f60``."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        for value in rng.integers(0, 2**63 - 1, size=n - len(ids), dtype=np.int64):
            sid = f"syn-{int(value):016x}"
            if sid not in seen:
                seen.add(sid)
                ids.append(sid)
    return ids


TRAIN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("winner", pa.string()),
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("language", pa.string()),
    ]
)
TEST_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("prompt", pa.string()),
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("scored", pa.bool_()),
    ]
)
UNLABELED_SCHEMA = pa.schema([f for f in TRAIN_SCHEMA if f.name != "winner"])


def _write_parquet(df: pd.DataFrame, schema: pa.Schema, path: Path) -> Path:
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata.update(SYNTHETIC_METADATA)
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def _readme(cfg: DemoDataConfig, train: pd.DataFrame) -> str:
    lang_counts = train["language"].value_counts()
    lang_lines = "\n".join(f"| {name} | {int(count)} |" for name, count in lang_counts.items())
    win_a = float((train["winner"] == "model_a").mean())
    return f"""# SYNTHETIC demo data (not the competition data)

Every row in this folder is **synthetic**: generated by `kaggle_utils.data.demo` with seed {cfg.seed}
(`python -m kaggle_utils.data.demo --seed {cfg.seed} --n-train {cfg.n_train} --n-test {cfg.n_test} \\
--n-unlabeled {cfg.n_unlabeled} --length-scale {cfg.length_scale} --label-noise {cfg.label_noise}`).
The same seed and options give identical files. The files follow the WSDM Cup - Multilingual Chatbot Arena
schema so that the whole pipeline can be exercised on a CPU; scores on this data say nothing about the
real competition. Parquet files carry `synthetic: true` in their Arrow schema metadata and string ids
start with `syn-`.

## Files

| file | rows | columns |
|---|---|---|
| train.parquet | {cfg.n_train} | id (str), prompt, response_a/b, winner, model_a/b, language |
| test.parquet | {cfg.n_test} | id (int64), prompt, response_a/b, scored (bool, all true) |
| unlabeled.parquet | {cfg.n_unlabeled} | id (str), prompt, response_a/b, model_a/b, language |
| sample_submission.csv | {cfg.n_test} | id, winner (all `model_a`) |
| test_labels.csv | {cfg.n_test} | id, winner: answer key for test.parquet (the real competition has none) |

## The preference signal

Each pair has one *good* and one *flawed* response built from the same per-language word bank.

- The **good** response opens with a short structured lead in the row's language: a markdown heading
  (`## Answer`), a bold label (`**Answer:**`) or a numbered list (`1.`, `2.`, ... lines), and is on
  average ~{round((GOOD_LENGTH_FACTOR - 1) * 100)}% longer.
- The **flawed** response opens (first sentence) with one of a few fixed refusal / apology / filler
  phrases in the row's language (`kaggle_utils.data.demo.FLAW_MARKERS`), e.g. "I'm sorry, but I cannot
  help with that.", "Извините, но я не могу помочь с этим.", "抱歉，我无法帮助您。".

The winner is the good response, placed at A or B with probability 1/2; then a fraction
{cfg.label_noise} of labels is flipped at random, so the best possible accuracy is about
{1 - cfg.label_noise:.2f}. Model names are drawn independently of the winner (no signal).
In train.parquet, `model_a` wins {win_a:.1%} of rows.

## Lengths

Word counts follow the real token-length profile times `length_scale` = {cfg.length_scale}: prompt ~
lognormal(ln 39, 1.93), each response ~ lognormal(ln 452, 0.60); prompts have
{MIN_PROMPT_WORDS}-{MAX_PROMPT_WORDS} words, responses {MIN_RESPONSE_WORDS}-{MAX_RESPONSE_WORDS}.
For Chinese and Japanese a "word" is a short phrase.

## Languages (train.parquet)

| language | rows |
|---|---|
{lang_lines}
"""


def generate_demo_data(cfg: DemoDataConfig) -> dict[str, Path]:
    """Write the synthetic train/test/unlabeled files into ``cfg.out_dir``; return their paths by name."""
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    # one independent stream per split, so e.g. changing n_unlabeled leaves train and test unchanged
    rng_train, rng_test, rng_unlabeled, rng_ids = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4)
    )

    train = _make_rows(rng_train, cfg.n_train, cfg)
    test = _make_rows(rng_test, cfg.n_test, cfg)
    unlabeled = _make_rows(rng_unlabeled, cfg.n_unlabeled, cfg).drop(columns="winner")

    string_ids = _string_ids(rng_ids, cfg.n_train + cfg.n_unlabeled)
    train.insert(0, "id", string_ids[: cfg.n_train])
    unlabeled.insert(0, "id", string_ids[cfg.n_train :])
    test_ids = rng_ids.choice(10**9, size=cfg.n_test, replace=False).astype(np.int64) + 10**9
    test.insert(0, "id", test_ids)
    test["scored"] = True

    paths = {
        "train": _write_parquet(train, TRAIN_SCHEMA, out / "train.parquet"),
        "test": _write_parquet(test, TEST_SCHEMA, out / "test.parquet"),
        "unlabeled": _write_parquet(unlabeled, UNLABELED_SCHEMA, out / "unlabeled.parquet"),
    }
    sample = pd.DataFrame({"id": test["id"], "winner": "model_a"})
    paths["sample_submission"] = out / "sample_submission.csv"
    sample.to_csv(paths["sample_submission"], index=False)
    paths["test_labels"] = out / "test_labels.csv"
    test[["id", "winner"]].to_csv(paths["test_labels"], index=False)
    paths["readme"] = out / "README.md"
    paths["readme"].write_text(_readme(cfg, train), encoding="utf-8")
    return paths


# ---- small files in the public formats: the pool stage's demo input (kaggle_utils.data.pool) ---------------------

# format (a key of kaggle_utils.data.sources.FORMATS) -> file or folder name under the public folder
PUBLIC_FILES: dict[str, str] = {
    "lmsys_55k": "lmsys_55k.csv",
    "arena_conversations": "arena_conversations.jsonl",
    "dpo": "dpo",
    "messages": "messages.jsonl",
    "unlabelled": "unlabelled.parquet",
}


def _conv(prompts: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    """A ``{role, content}`` conversation alternating user and assistant turns."""
    out = []
    for p, a in zip(prompts, answers, strict=True):
        out += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    return out


def _write_jsonl(records: list[dict], path: Path) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_public_formats(
    out_dir: Path | str, n_rows: int = 80, seed: int = 0, length_scale: float = 0.12, test_file: Path | None = None
) -> dict[str, Path]:
    """Small SYNTHETIC files in the public formats ``kaggle_utils.data.sources`` reads (docs/facts.md §2), ``n_rows``
    each.

    Rows are drawn like train.parquet's (same signal, same languages) and written in each format:
    ``lmsys_55k.csv`` (JSON turn lists, one-hot winner), ``arena_conversations.jsonl`` ({role, content} lists,
    language given), ``dpo/part-0.parquet`` + ``dpo/part-1.parquet`` (prompt, chosen, rejected: a folder),
    ``messages.jsonl`` (messages_a/_b, label A/B) and ``unlabelled.parquet``. Planted so that every pool step
    has something to count: ties (lmsys rows 0-5 by tenths, arena 9 and 10, messages 3), one truncated JSON
    prompt (lmsys row 9), two multi-turn rows (lmsys 1, arena 6), copies across sources (arena rows 0-4 are
    lmsys rows 10-14, A/B swapped on the even ones; dpo/part-0 rows 0-2 are lmsys rows 15-17) and, given
    ``test_file``, leaked test prompts (lmsys row 18 in another case and spacing, unlabelled rows 0-1 exactly);
    a too-short response (unlabelled row 2) and identical responses (messages row 6) for the quality filter.
    The same arguments give identical files.
    """
    if n_rows < 20:
        raise ValueError(f"n_rows={n_rows}: at least 20 rows per file hold the planted cases")
    out = Path(out_dir)
    (out / "dpo").mkdir(parents=True, exist_ok=True)
    cfg = DemoDataConfig(out_dir=out, seed=seed, length_scale=length_scale)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, 1]).spawn(len(PUBLIC_FILES))]
    lm, ar, dp, ms, un = (_make_rows(rng, n_rows, cfg) for rng in rngs)
    _plant_quality_cases(un, ms)
    _plant_leaks(lm, un, test_file)
    _plant_copies(lm, ar, dp)
    return {
        "lmsys_55k": _write_lmsys(lm, out / PUBLIC_FILES["lmsys_55k"]),
        "arena_conversations": _write_arena(ar, out / PUBLIC_FILES["arena_conversations"]),
        "dpo": _write_dpo(dp, out / PUBLIC_FILES["dpo"]),
        "messages": _write_messages(ms, out / PUBLIC_FILES["messages"]),
        "unlabelled": _write_unlabelled(un, out / PUBLIC_FILES["unlabelled"]),
    }


def _plant_quality_cases(un: pd.DataFrame, ms: pd.DataFrame) -> None:
    """What the quality filter drops: a too-short response (unlabelled row 2), identical responses (messages 6)."""
    un.loc[2, "response_b"] = "ok"  # too short
    ms.loc[6, "response_b"] = ms.loc[6, "response_a"]  # identical responses


def _plant_leaks(lm: pd.DataFrame, un: pd.DataFrame, test_file: Path | None) -> None:
    """Given ``test_file`` (3+ prompts): its prompts leaked into lmsys row 18 (respaced) and unlabelled rows 0-1."""
    test_prompts = pd.read_parquet(test_file, columns=["prompt"])["prompt"].tolist() if test_file else []
    if len(test_prompts) >= 3:
        variant = "  " + "   ".join(test_prompts[0].split()) + " "  # other spacing; other case where it round-trips
        lm.loc[18, "prompt"] = variant.upper() if variant.upper().lower() == variant.lower() else variant
        un.loc[[0, 1], "prompt"] = test_prompts[1:3]


def _plant_copies(lm: pd.DataFrame, ar: pd.DataFrame, dp: pd.DataFrame) -> None:
    """Copies across sources: the arena repeats lmsys pairs (A/B swapped on even rows), the DPO file others."""
    for k in range(5):
        src = lm.loc[10 + k]
        swap = k % 2 == 0
        ar.loc[k, ["prompt", "response_a", "response_b"]] = (
            [src["prompt"], src["response_b"], src["response_a"]]
            if swap
            else src[["prompt", "response_a", "response_b"]]
        )
        flipped = {"model_a": "model_b", "model_b": "model_a"}[src["winner"]]
        ar.loc[k, "winner"] = flipped if swap else src["winner"]
    for k in range(3):
        dp.loc[k, ["prompt", "response_a", "response_b", "winner"]] = lm.loc[
            15 + k, ["prompt", "response_a", "response_b", "winner"]
        ]


def _write_lmsys(lm: pd.DataFrame, path: Path) -> Path:
    """lmsys 55k's CSV: JSON lists of turns, one-hot winner columns; ties on rows 5, 15, ..., row 1 multi-turn,
    row 9's prompt a truncated JSON list."""
    import json

    n_rows = len(lm)
    turns = [[p] for p in lm["prompt"]]
    resp_a, resp_b = [[r] for r in lm["response_a"]], [[r] for r in lm["response_b"]]
    turns[1], resp_a[1], resp_b[1] = turns[1] + ["Tell me more."], resp_a[1] + ["More."], resp_b[1] + [None]
    winner = lm["winner"].to_numpy()
    tie = np.arange(n_rows) % 10 == 5
    lmsys = pd.DataFrame(
        {
            "id": np.arange(n_rows) + 1000,
            "model_a": lm["model_a"],
            "model_b": lm["model_b"],
            "prompt": [json.dumps(t, ensure_ascii=False) for t in turns],
            "response_a": [json.dumps(t, ensure_ascii=False) for t in resp_a],
            "response_b": [json.dumps(t, ensure_ascii=False) for t in resp_b],
            "winner_model_a": ((winner == "model_a") & ~tie).astype(int),
            "winner_model_b": ((winner == "model_b") & ~tie).astype(int),
            "winner_tie": tie.astype(int),
        }
    )
    lmsys.loc[9, "prompt"] = lmsys.loc[9, "prompt"][:-3]  # a truncated JSON list
    lmsys.to_csv(path, index=False)
    return path


def _write_arena(ar: pd.DataFrame, path: Path) -> Path:
    """Arena conversations as JSON lines: {role, content} turn lists, language given; ties on rows 9 and 10, row 6
    multi-turn."""
    arena = []
    for i, r in ar.iterrows():
        prompts, answers_a, answers_b = [r["prompt"]], [r["response_a"]], [r["response_b"]]
        if i == 6:
            prompts, answers_a, answers_b = prompts + ["And then?"], answers_a + ["Then this."], answers_b + ["That."]
        arena.append(
            {
                "question_id": f"q{i:05d}", "model_a": r["model_a"], "model_b": r["model_b"],
                "winner": {9: "tie", 10: "tie (bothbad)"}.get(i, r["winner"]), "judge": f"arena_user_{i % 7}",
                "conversation_a": _conv(prompts, answers_a), "conversation_b": _conv(prompts, answers_b),
                "turn": len(prompts), "anony": True, "language": r["language"], "tstamp": 1.7e9 + i,
            }
        )  # fmt: skip
    return _write_jsonl(arena, path)


def _write_dpo(dp: pd.DataFrame, folder: Path) -> Path:
    """A DPO folder of two parquet parts (prompt, chosen, rejected): the rows' first half, then the rest."""
    chosen_a = (dp["winner"] == "model_a").to_numpy()
    dpo = pd.DataFrame(
        {
            "prompt": dp["prompt"],
            "chosen": np.where(chosen_a, dp["response_a"], dp["response_b"]),
            "rejected": np.where(chosen_a, dp["response_b"], dp["response_a"]),
        }
    )
    half = len(dp) // 2
    schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
    for k, part in enumerate((dpo.iloc[:half], dpo.iloc[half:])):
        _write_parquet(part.reset_index(drop=True), schema, folder / f"part-{k}.parquet")
    return folder


def _write_messages(ms: pd.DataFrame, path: Path) -> Path:
    """Message pairs as JSON lines: messages_a / messages_b, label A or B; a tie on row 3."""
    labels = np.where(ms["winner"] == "model_a", "A", "B").astype(object)
    labels[3] = "tie"
    messages = [
        {
            "id": f"m{i:05d}",
            "messages_a": _conv([r["prompt"]], [r["response_a"]]),
            "messages_b": _conv([r["prompt"]], [r["response_b"]]),
            "label": labels[i],
        }
        for i, r in ms.iterrows()
    ]
    return _write_jsonl(messages, path)


def _write_unlabelled(un: pd.DataFrame, path: Path) -> Path:
    """Unlabelled pairs as parquet: ids ``syn-u00000``..., no winner column."""
    un.insert(0, "id", [f"syn-u{i:05d}" for i in range(len(un))])
    schema = pa.schema([(c, pa.string()) for c in ("id", "prompt", "response_a", "response_b", "model_a", "model_b")])
    return _write_parquet(un, schema, path)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_config(DemoDataConfig, argv)
    paths = generate_demo_data(cfg)
    # the pool stage's demo input (recipe demo-pool): small files in the public formats, beside the competition's
    paths |= write_public_formats(cfg.out_dir / "public", seed=cfg.seed, test_file=paths["test"])
    for name, p in paths.items():
        print(f"{name}: {p}")


if __name__ == "__main__":
    main()
