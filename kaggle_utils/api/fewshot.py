"""Stage "fewshot": does showing a model k labelled examples make it a better judge? Accuracy against k.

The seed team tried 2 to 32 shots with GPT-3.5 and saw no gain (seed write-up); this stage repeats that measurement
with the accounting the fine-tuned judge uses (:mod:`kaggle_utils.api.judge`):

1. ``n_eval`` labelled rows are evaluated (seeded); the other rows are the shot pool.
2. Each evaluated row gets one ranked list of candidate shots from its own language (other languages fill in when
   it has too few): seeded at random (``selection = "language"``), or most similar prompt first by a character
   n-gram TF-IDF cosine (``"similarity"``, :func:`char_ngram_tfidf`; numpy only, hashed n-grams). The k shots are
   the list's first k, so the shots of k=4 are among those of k=8: k is the only thing that changes.
3. Shot answers alternate A, B, A, ... (a shot whose label disagrees is shown swapped through ``schema.swap_ab``):
   the examples teach no label prior. Shots sit between the system message and the question, most similar last.
4. Each row is asked in both A/B orders (``both_orders``); an answer that is not one letter counts ``invalid`` and
   wrong, a failed request ``failed`` and wrong, never dropped (:func:`kaggle_utils.api.judge.score_table`).

Outputs under ``out_dir``: ``table.csv`` (one row per k), ``by_language.csv``, ``answers.parquet``,
``accuracy_vs_k.png`` (:func:`plot_accuracy`), the resumable ``requests.jsonl`` and ``config.json``.

``python -m kaggle_utils.api.fewshot --recipe fewshot-gpt-4o-mini``
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.api.client import API_SECTION, ApiConfig, ChatClient, ChatResult, JsonlStore, RunSummary
from kaggle_utils.api.judge import (
    answers_frame,
    judge_messages,
    judge_requests,
    label_letters,
    score_table,
)
from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema

SELECTIONS = ("language", "similarity", "random")
# characters of a prompt read for its n-grams: similarity is about topic and language, the head says enough
NGRAM_CHARS = 2000


@dataclass
class FewShotConfig(ApiConfig):
    """Accuracy of a judge prompted with k labelled examples, for each k; every field is also a ``--flag``."""

    # the stage its recipes name (``stage = "fewshot"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "fewshot"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("input_file", "out_dir", "n_eval", "seed", "max_field_chars", "shot_max_chars"),
        "model": ("model", "temperature", "max_tokens"),
        "shots": ("selection", "shots", "ngram", "ngram_dim", "max_pool_per_language", "both_orders"),
        "api": API_SECTION,
    }

    # labelled rows in the competition schema (.parquet or .csv), with a ``language`` column
    input_file: Path = Path("output/prepared/train.parquet")
    # where the table, the plot, the answers and the resumable requests go
    out_dir: Path = Path("output/fewshot/gpt-4o-mini")
    # the judge model
    model: str = "gpt-4o-mini"
    # numbers of shots to evaluate, each even (A and B answers in equal numbers), e.g. [0, 2, 4, 8, 16, 32]
    shots: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16, 32])
    # rows evaluated at every k (the same rows for every k)
    n_eval: int = 200
    # how shots are chosen: "language" (same language, seeded), "similarity" (same language, most similar prompts by
    # char n-gram TF-IDF cosine) or "random" (any language, seeded)
    selection: str = "language"
    # character n-gram length for "similarity"
    ngram: int = 3
    # hashed feature columns for "similarity" (memory: pool rows x this x 4 bytes per language)
    ngram_dim: int = 8192
    # candidate shots considered per language (seeded sample of the pool): bounds the similarity matrix
    max_pool_per_language: int = 2000
    # ask each row in both A/B orders
    both_orders: bool = True
    # seed of the evaluated rows and of the shot order
    seed: int = 0
    # each text of an evaluated row is cut to this many characters (head and tail kept)
    max_field_chars: int = 4000
    # each text of a shot is cut shorter: 32 shots x 3 texts must fit the context window (and the budget)
    shot_max_chars: int = 800
    # a judge answers with one letter: greedy, a few tokens
    temperature: float | None = 0.0
    max_tokens: int = 5

    def __post_init__(self) -> None:
        ApiConfig.__post_init__(self)
        self.input_file = Path(self.input_file)
        self.out_dir = Path(self.out_dir)
        if not self.shots or any(k < 0 or k % 2 for k in self.shots):
            raise ValueError(f"shots={self.shots}: give one or more even numbers of shots, 0 or more (A/B balanced)")
        self.shots = sorted(set(self.shots))
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; expected one of {SELECTIONS}")
        for name in ("n_eval", "ngram", "ngram_dim", "max_pool_per_language", "max_field_chars", "shot_max_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        self.check_prices([self.model])


# --- similarity ----------------------------------------------------------------------------------------------------


def char_ngram_tfidf(texts: Sequence[str], n: int = 3, dim: int = 8192) -> np.ndarray:
    """L2-normalised TF-IDF rows of hashed character n-grams, shape (len(texts), dim), float32.

    Lower-cased, first :data:`NGRAM_CHARS` characters; term frequency ``1 + log(count)``; smoothed idf over
    ``texts``; n-grams hashed to ``dim`` columns with crc32 (stable across processes, unlike ``hash``).
    """
    x = np.zeros((len(texts), dim), dtype=np.float32)  # (N, dim)
    for i, text in enumerate(texts):
        text = text[:NGRAM_CHARS].lower()
        grams = Counter(text[j : j + n] for j in range(max(1, len(text) - n + 1)))
        cols = np.fromiter((zlib.crc32(g.encode()) % dim for g in grams), dtype=np.int64, count=len(grams))
        np.add.at(x[i], cols, 1 + np.log(np.fromiter(grams.values(), dtype=np.float32, count=len(grams))))
    df = (x > 0).sum(0)  # (dim,)
    x *= (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def rank_shots(eval_rows: pd.DataFrame, pool: pd.DataFrame, cfg: FewShotConfig) -> list[list[int]]:
    """Per evaluated row, up to ``max(shots)`` pool positions, best first (see the module docstring)."""
    need = max(cfg.shots)
    if need == 0:
        return [[] for _ in range(len(eval_rows))]
    rng = np.random.default_rng([cfg.seed, 1])
    if cfg.selection == "random":
        return [[int(p) for p in rng.permutation(len(pool))[:need]] for _ in range(len(eval_rows))]
    by_language = {}
    for lang, positions in pool.groupby("language").indices.items():
        by_language[lang] = rng.permutation(positions)[: cfg.max_pool_per_language]
    ranked = []
    sims_cache: dict[str, np.ndarray] = {}
    eval_languages = eval_rows["language"].to_numpy()
    for i, lang in enumerate(eval_languages):
        own = by_language.get(lang, np.array([], dtype=np.int64))
        if cfg.selection == "similarity" and len(own):
            if lang not in sims_cache:
                members = np.flatnonzero(eval_languages == lang)
                texts = [*eval_rows["prompt"].iloc[members], *pool["prompt"].iloc[own]]
                x = char_ngram_tfidf(texts, cfg.ngram, cfg.ngram_dim)  # (members + own, dim)
                sims = x[: len(members)] @ x[len(members) :].T  # (members, own)
                sims_cache[lang] = dict(zip(members, sims, strict=True))
            # stable sort: equal similarities keep the seeded order
            own = own[np.argsort(-sims_cache[lang][i], kind="stable")]
        else:
            own = np.random.default_rng([cfg.seed, 2, i]).permutation(own)
        picks = list(own[:need])
        if len(picks) < need:  # a rare language: fill from the others, seeded
            others = np.setdiff1d(np.arange(len(pool)), own)
            picks += list(np.random.default_rng([cfg.seed, 3, i]).permutation(others)[: need - len(picks)])
        ranked.append([int(p) for p in picks])
    return ranked


Turns = dict[int, list[list[dict[str, str]]]]


def shot_turns(pool: pd.DataFrame, positions: set[int], max_chars: int) -> Turns:
    """Per pool position used, its (user, assistant) turns shown both ways: [0] answers "A", [1] answers "B"."""
    rows = pool.iloc[sorted(positions)]
    swapped = schema.swap_ab(rows)
    turns: Turns = {}
    for j, (pos, letter) in enumerate(zip(sorted(positions), label_letters(rows), strict=True)):
        # the row as labelled, and swapped: whichever answers "A" goes first
        shown = [rows.iloc[j], swapped.iloc[j]][:: 1 if letter == "A" else -1]
        turns[pos] = [
            [
                judge_messages(s["prompt"], s["response_a"], s["response_b"], max_chars)[1],
                {"role": "assistant", "content": a},
            ]
            for s, a in zip(shown, ("A", "B"), strict=True)
        ]
    return turns


def shot_messages(ranked: list[int], k: int, turns: Turns) -> list[dict[str, str]]:
    """The k shots' turns: answers alternate A, B, ... by rank; the best-ranked shot comes last, by the question."""
    chosen = [turns[pos][rank % 2] for rank, pos in enumerate(ranked[:k])]
    return [message for pair in reversed(chosen) for message in pair]


# --- the stage -----------------------------------------------------------------------------------------------------


@dataclass
class FewShotResult:
    """One row per k (see :func:`kaggle_utils.api.judge.score_table`), per (k, language), every answer, the run."""

    table: pd.DataFrame
    by_language: pd.DataFrame
    answers: pd.DataFrame
    run: RunSummary
    counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = "\n".join(f"{k}: {v}" for k, v in self.counts.items())
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            table = self.table.to_string(index=False, float_format=lambda x: f"{x:.4f}")
        return f"{self.run}\n{counts}\n\n{table}"


def split_eval(df: pd.DataFrame, n_eval: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluated rows, shot pool), disjoint: no row, nor a repeat of its pair (either order), is its own example."""
    if len(df) <= n_eval:
        raise schema.DataError(f"{len(df)} labelled rows leave no shot pool beside n_eval={n_eval}")
    order = np.random.default_rng([seed, 0]).permutation(len(df))
    eval_rows, pool = df.iloc[order[:n_eval]].reset_index(drop=True), df.iloc[order[n_eval:]]
    # the same pair may be in the data twice (arena rows repeat): as a shot it would hand over the answer
    texts = list(zip(eval_rows["prompt"], eval_rows["response_a"], eval_rows["response_b"], strict=True))
    seen = {*texts, *((p, b, a) for p, a, b in texts)}
    repeat = np.array([t in seen for t in zip(pool["prompt"], pool["response_a"], pool["response_b"], strict=True)])
    if repeat.any():
        print(f"{int(repeat.sum())} pool rows repeat an evaluated pair: left out of the shots")
    return eval_rows, pool[~repeat].reset_index(drop=True) if len(pool) else pool.reset_index(drop=True)


def run_fewshot(cfg: FewShotConfig, after_each: Callable[[ChatResult], None] | None = None) -> FewShotResult:
    """Ask the model about the same rows with each k; write and return the tables."""
    df = schema.load(cfg.input_file, "train")
    df["language"] = df["language"].fillna("unknown").astype(str)
    eval_rows, pool = split_eval(df, cfg.n_eval, cfg.seed)
    ranked = rank_shots(eval_rows, pool, cfg)
    turns = shot_turns(pool, {int(p) for r in ranked for p in r}, cfg.shot_max_chars)
    print(
        f"{len(eval_rows)} rows x k in {cfg.shots} x {1 + cfg.both_orders} orders = "
        f"{len(eval_rows) * len(cfg.shots) * (1 + cfg.both_orders)} requests to {cfg.model}; "
        f"shots by {cfg.selection} from a pool of {len(pool)}"
    )
    client = ChatClient(cfg)
    store = JsonlStore(cfg.out_dir / "requests.jsonl")
    save_config(cfg, cfg.out_dir / "config.json")
    requests = []
    for k in cfg.shots:
        requests += judge_requests(
            client,
            eval_rows,
            [cfg.model],
            cfg.both_orders,
            cfg.max_field_chars,
            shots=lambda i, k=k: shot_messages(ranked[i], k, turns),
            tag=f"fewshot:{cfg.selection}:k{k}",
            k=k,
        )
    run = client.run(requests, store, desc="few-shot answers", after_each=after_each)
    answers = answers_frame(requests, store.load())
    answers["language"] = answers["row_id"].map(
        dict(zip(eval_rows["id"].astype(str), eval_rows["language"], strict=True))
    )
    table = score_table(answers, cfg.prices, by=["k"])
    by_language = score_table(answers, cfg.prices, by=["k", "language"])
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(cfg.out_dir / "table.csv", index=False)
    by_language.to_csv(cfg.out_dir / "by_language.csv", index=False)
    answers.to_parquet(cfg.out_dir / "answers.parquet", index=False)
    counts = {"evaluated rows": len(eval_rows), "shot pool": len(pool), "requests": len(requests)}
    return FewShotResult(table, by_language, answers, run, counts)


def plot_accuracy(table: pd.DataFrame, title: str = ""):
    """Accuracy against k (invalid answers counted wrong), accuracy over valid answers, and the invalid rate."""
    from matplotlib.figure import Figure  # no pyplot: nothing global changes, shown with display(fig)

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ks = table["k"].to_numpy()
    ax.plot(ks, table["accuracy"], "o-", label="accuracy (invalid = wrong)")
    ax.plot(ks, table["accuracy_valid"], "s--", label="accuracy of valid answers")
    ax.plot(ks, table["invalid_rate"], "x:", color="grey", label="invalid + failed rate")
    ax.axhline(0.5, color="black", lw=0.5)
    ax.set_xscale("symlog", base=2, linthresh=2)  # 0, 2, 4, ..., 32 evenly spaced
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 1)
    ax.set_xlabel("shots (k)")
    ax.set_ylabel("share of answers")
    ax.set_title(title or "few-shot judge: accuracy vs k")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(FewShotConfig, argv)
    result = run_fewshot(cfg)
    print(result)
    path = cfg.out_dir / "accuracy_vs_k.png"
    plot_accuracy(result.table, f"{cfg.model}, shots by {cfg.selection}").savefig(path, dpi=120)
    print(f"wrote {cfg.out_dir / 'table.csv'} and {path}")


if __name__ == "__main__":
    main()
