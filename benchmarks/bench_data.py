"""Benchmark of the data layer at competition scale: normalise + filter + dedup + leakage + language + folds.

Synthetic rows in the public formats (docs/facts.md §2), in the mix a medal solution aggregated (~560K pairs):
competition train, LMSYS arena-55k (JSON turn lists), chatbot_arena_conversations, DPO pairs as texts and
as conversations, messages pairs with an A/B label; a holdout of 25K test prompts of which some are
exact (case/space variants) or near (one edit) copies of training prompts; 2% swapped duplicate pairs.
Lengths follow the competition's profile (docs/facts.md §1): prompt ~ lognormal(ln 39, 1.93) tokens, response ~
lognormal(ln 452, 0.60) tokens, ~4 characters per token; languages ~55% English, 20% Russian, 15% Chinese,
10% German. Generating the data is not timed.

``python benchmarks/bench_data.py --pairs 560000`` (``make bench-data PAIRS=...``); prints one line per step
and ends with ``data: pairs=N seconds=S peak_gb=G`` (S: the timed steps; G: peak resident memory of the
process, generation included).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils.data import clean, sources
from kaggle_utils.prepare import assign_folds

# share of the pairs per format (the 55k and arena sets at their real size relative to ~560K)
MIX = {"competition": 0.09, "lmsys_55k": 0.10, "arena_conversations": 0.06, "dpo_text": 0.30, "dpo_conv": 0.30}
MIX["messages"] = 1 - sum(MIX.values())
LANGS = {"English": 0.55, "Russian": 0.20, "Chinese": 0.15, "German": 0.10}
# letters each language's pseudo-words are drawn from (CJK: common ideographs, words of one or two)
ALPHABETS = {
    "English": "abcdefghijklmnopqrstuvwxyz",
    "Russian": "абвгдежзийклмнопрстуфхцчшщыьэюя",
    "Chinese": "".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000)),
    "German": "abcdefghijklmnopqrstuvwxyzäöüß",
}


class Texts:
    """Random texts of a given length in a language: slices of one long random text per language.

    Each language has 5,000 pseudo-words, so distinct texts share few character 5-grams (as real ones do)
    and the language detector sees the right script.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.base, self.vocab = {}, {}
        for lang, letters in ALPHABETS.items():
            cjk = lang == "Chinese"
            sizes = rng.integers(1, 3, 5000) if cjk else rng.integers(2, 10, 5000)
            vocab = self.vocab[lang] = np.array(["".join(rng.choice(list(letters), k)) for k in sizes])
            self.base[lang] = ("" if cjk else " ").join(rng.choice(vocab, 600_000 if cjk else 250_000))

    def make_fresh(self, langs: np.ndarray, chars: np.ndarray) -> list[str]:
        """Texts of independently drawn words (for prompts: slices of one base would overlap by chance)."""
        words = np.maximum(chars // 6, 1)
        idx = self.rng.integers(0, 5000, int(words.sum()))
        ends = np.cumsum(words)
        return [
            ("" if lang == "Chinese" else " ").join(self.vocab[lang][idx[e - n : e]]) + "?"
            for lang, n, e in zip(langs, words, ends, strict=True)
        ]

    def make(self, langs: np.ndarray, chars: np.ndarray) -> list[str]:
        # CJK: about one character per token, others about four
        chars = np.where(langs == "Chinese", chars // 4, chars)
        starts = self.rng.integers(0, 900_000 - 20_000, len(chars))
        return [self.base[lang][s : s + n].strip() + "." for lang, s, n in zip(langs, starts, chars, strict=True)]


def lengths(rng: np.random.Generator, n: int, mu_tokens: float, sigma: float, cap: int) -> np.ndarray:
    return np.minimum(4 * rng.lognormal(np.log(mu_tokens), sigma, n), cap).astype(np.int64) + 8


def synthetic_pairs(rng: np.random.Generator, texts: Texts, n: int) -> pd.DataFrame:
    langs = rng.choice(list(LANGS), n, p=list(LANGS.values()))
    return pd.DataFrame(
        {
            "prompt": texts.make_fresh(langs, lengths(rng, n, 39, 1.93, 20_000)),
            "a": texts.make(langs, lengths(rng, n, 452, 0.60, 16_000)),
            "b": texts.make(langs, lengths(rng, n, 452, 0.60, 16_000)),
            "lang": langs,
            "a_wins": rng.random(n) < 0.5,
        }
    )


def to_format(fmt: str, p: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The pairs ``p`` written in a public format (with that format's ties where it has them)."""
    n = len(p)
    ids = [f"{fmt}-{i}" for i in range(n)]
    tie = rng.random(n) < 0.05
    if fmt == "competition":
        return pd.DataFrame(
            {"id": ids, "prompt": p["prompt"], "response_a": p["a"], "response_b": p["b"],
             "winner": np.where(p["a_wins"], "model_a", "model_b"), "model_a": "m1", "model_b": "m2",
             "language": p["lang"]}
        )  # fmt: skip
    if fmt == "lmsys_55k":
        dumps = (
            [json.dumps([t]) for t in p["prompt"]],
            [json.dumps([t]) for t in p["a"]],
            [json.dumps([t]) for t in p["b"]],
        )
        return pd.DataFrame(
            {"id": range(n), "model_a": "m1", "model_b": "m2", "prompt": dumps[0], "response_a": dumps[1],
             "response_b": dumps[2], "winner_model_a": (p["a_wins"] & ~tie).astype(int),
             "winner_model_b": (~p["a_wins"] & ~tie).astype(int), "winner_tie": tie.astype(int)}
        )  # fmt: skip

    def conv(prompts, answers):
        return [
            [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
            for q, r in zip(prompts, answers, strict=True)
        ]

    if fmt == "arena_conversations":
        winner = np.where(tie, "tie (bothbad)", np.where(p["a_wins"], "model_a", "model_b"))
        return pd.DataFrame(
            {"question_id": ids, "model_a": "m1", "model_b": "m2", "winner": winner, "judge": "u",
             "conversation_a": conv(p["prompt"], p["a"]), "conversation_b": conv(p["prompt"], p["b"]),
             "turn": 1, "anony": True, "language": p["lang"], "tstamp": 0.0}
        )  # fmt: skip
    if fmt == "dpo_text":
        return pd.DataFrame({"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]})
    if fmt == "dpo_conv":
        return pd.DataFrame({"chosen": conv(p["prompt"], p["a"]), "rejected": conv(p["prompt"], p["b"])})
    return pd.DataFrame(
        {"id": ids, "messages_a": conv(p["prompt"], p["a"]), "messages_b": conv(p["prompt"], p["b"]),
         "label": np.where(tie, "tie", np.where(p["a_wins"], "A", "B"))}
    )  # fmt: skip


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def write_files(out_dir: Path, n_pairs: int, n_holdout: int, seed: int) -> None:
    """The synthetic sources as parquet files in their formats, and ``holdout.parquet`` (test prompts)."""
    rng = np.random.default_rng(seed)
    texts = Texts(rng)
    prompts = []
    for fmt, share in MIX.items():
        pairs = synthetic_pairs(rng, texts, max(1, int(round(n_pairs * share))))
        if fmt.startswith("dpo"):  # 2% of a DPO set repeats earlier pairs in swapped order
            k = len(pairs) // 50
            pairs.iloc[-k:, [0, 1, 2]] = pairs.iloc[:k][["prompt", "b", "a"]].to_numpy()
        prompts.append(pairs["prompt"])
        to_format(fmt, pairs, rng).to_parquet(out_dir / f"{fmt}.parquet", row_group_size=50_000)
    # holdout: fresh prompts, plus exact (case/space) and near (one edit) copies of 1% of the training prompts each
    prompts = pd.concat(prompts, ignore_index=True)
    n_copy = min(len(prompts) // 100, n_holdout // 4)
    exact = rng.choice(len(prompts), n_copy, replace=False)
    near = rng.choice(np.flatnonzero(prompts.str.len().to_numpy() > 200), n_copy, replace=False)
    holdout = synthetic_pairs(rng, texts, n_holdout - len(exact) - len(near))["prompt"].tolist()
    holdout += ["  " + prompts.iloc[i].upper() for i in exact]
    holdout += [prompts.iloc[i][:100] + "X" + prompts.iloc[i][101:] for i in near]
    pd.DataFrame({"prompt": holdout}).to_parquet(out_dir / "holdout.parquet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=560_000, help="total pairs over all sources")
    parser.add_argument("--holdout", type=int, default=25_000, help="test prompts to check leakage against")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        # generated in a child process: its memory is not this process's peak, which measures the pipeline only
        t0 = time.perf_counter()
        child = multiprocessing.get_context("fork").Process(
            target=write_files, args=(tmp, args.pairs, args.holdout, args.seed)
        )
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"generating the synthetic files failed (exit code {child.exitcode})")
        size = sum(f.stat().st_size for f in tmp.iterdir()) / 1024**3
        print(f"generated {args.pairs:,} pairs in {len(MIX)} formats ({size:.2f} GB of parquet) in "
              f"{time.perf_counter() - t0:.1f} s (not timed)")  # fmt: skip
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        holdout = pd.read_parquet(tmp / "holdout.parquet")["prompt"].tolist()
        frames, report = [], sources.Report()
        for fmt in MIX:
            kind = "dpo" if fmt.startswith("dpo") else fmt
            frame, rep = sources.normalise(
                tmp / f"{fmt}.parquet", kind, source=fmt, **({"seed": 0} if kind == "dpo" else {})
            )
            frames.append(frame)
            report.extend(rep)
        df = pd.concat(frames, ignore_index=True)  # Arrow-backed columns: chunks are joined, not copied
        del frames, frame
        timings["normalise"] = time.perf_counter() - t0
        # the one reference to the table goes into clean(), which frees the input's responses as it takes the output's
        tables = [df]
        del df
        peaks: dict[str, float] = {"normalise": peak_gb()}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            timings[name], peaks[name], clock = time.perf_counter() - clock, peak_gb(), time.perf_counter()

        df, rep = clean.clean(tables.pop(), holdout, on_step=lap, keep_keys=True)
        report.extend(rep)
        df = df.assign(fold=assign_folds(df, args.folds))  # grouped by the cached prompt_key
        lap("folds")
        report.check_balanced()

        table = report.table()
        rows_in = table[(table["kind"] == "in")].groupby("step", sort=False)["rows"].sum()
        dropped = table[table["kind"] == "dropped"].groupby("step", sort=False)["rows"].sum()
        print(f"\n{'step':<10} {'seconds':>8} {'rows in':>10} {'dropped':>9} {'peak GB so far':>15}")
        for name, sec in timings.items():
            n_in = f"{int(rows_in[name]):,}" if name in rows_in else "-"
            print(f"{name:<10} {sec:>8.1f} {n_in:>10} {int(dropped.get(name, 0)):>9,} {peaks[name]:>15.2f}")
        print("\ndropped per reason:", report.dropped())
        print("rows per fold:", df["fold"].value_counts().sort_index().tolist())
        print(f"data: pairs={args.pairs} seconds={sum(timings.values()):.1f} peak_gb={peak_gb():.2f}")


if __name__ == "__main__":
    main()
