"""Host memory of the training rows' token ids at real scale: PairTokens against lists in both orientations.

    python -m benchmarks.bench_train_memory --pairs 560000 --max-length 2500

The train stage held ``fmt.encode(df)`` and ``fmt.encode(schema.swap_ab(df))``: two ``list[list[int]]``. Here:

1. **sample, real text** (``--sample`` rows of :func:`benchmarks.bench_inputs.synthetic_pairs`, docs/facts.md §1
   lengths, real Qwen2.5 tokenizer): the old lists and ``PromptFormatter.encode_pairs`` are each measured in a fresh
   process; the store's rows are checked equal to the lists in both orientations. The lists' bytes per token
   are extrapolated to ``--pairs`` rows (560K rows of lists would not fit in this machine's memory).
2. **``--pairs`` rows, generated ids**: field lengths drawn from the same docs/facts.md §1 profile, random ids in the
   vocabulary, cut by the formatter's own allocation (``PromptFormatter.cut_fields``) and packed by the same
   ``PairTokensBuilder`` that ``encode_pairs`` uses, ``CHUNK_ROWS`` rows at a time. Tokenising 560K rows takes
   ~6-15 min on 2 cores and is not what is measured here (``bench_inputs.py`` times it).
3. **a training epoch**: token-budget batches over all rows, each row in a random orientation, drawn with
   ``store.rows(idx, swapped)``; once with the store in memory, once memory-mapped from its saved folder.
   Padding to tensors is left out: it costs the same with either layout (≤ ``--batch-tokens`` × 16 bytes a
   batch) and twice the CPU time of drawing the rows, on a machine shared with other work.

Memory is the process's resident set from ``/proc/self/status`` (Linux): ``VmHWM`` (peak) is reset before each
phase by writing 5 to ``/proc/self/clear_refs``; "held" is the resident set after the phase minus before it.
Each phase runs in a forked child so phases do not see each other's garbage. The last line is
``train-memory: pairs=N tokens=T store_gb=… build_peak_gb=… epoch_peak_gb=… lists_gb=… ratio=…``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.bench_inputs import PROMPT_MU, PROMPT_SIGMA, RESPONSE_MU, RESPONSE_SIGMA, synthetic_pairs, vocab_pool
from kaggle_utils.data import schema
from kaggle_utils.inputs import formatter as inputs
from kaggle_utils.inputs.batching import token_budget_batches
from kaggle_utils.inputs.formatter import TEMPLATES, TRUNCATIONS, InputConfig, PromptFormatter
from kaggle_utils.inputs.tokens import PairTokens, PairTokensBuilder

GB = 1024**3


# --- memory of this process ------------------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def rss() -> int:
    return _status_bytes("VmRSS")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def peak() -> int:
    return _status_bytes("VmHWM")


def _in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child: it inherits this process's state, its garbage dies with it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        return ex.submit(fn, *args).result()


def _measure(fn):
    """(result, held bytes, peak bytes above the start, seconds) of ``fn()``."""
    reset_peak()
    before = rss()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, rss() - before, peak() - before, seconds


# --- phases (each in a child) ------------------------------------------------------------------------------------
def old_lists(fmt: PromptFormatter, df) -> dict:
    """The train stage before PairTokens: ids and ids_swapped as lists of lists."""

    def run():
        return fmt.encode(df), fmt.encode(schema.swap_ab(df))

    (ids, ids_swapped), held, top, seconds = _measure(run)
    return {"held": held, "peak": top, "seconds": seconds, "tokens": sum(map(len, ids)), "abs_peak": peak()}


def new_store_sample(fmt: PromptFormatter, df) -> dict:
    """``encode_pairs`` on the same rows; its rows checked equal to both orientations of ``encode``."""
    store, held, top, seconds = _measure(lambda: fmt.encode_pairs(df))
    idx = np.arange(len(store))
    ok = store.rows(idx) == fmt.encode(df) and store.rows(idx, np.ones(len(idx), bool)) == fmt.encode(
        schema.swap_ab(df)
    )
    return {"held": held, "peak": top, "seconds": seconds, "tokens": store.num_tokens, "nbytes": store.nbytes, "ok": ok}


def field_lengths(rng: np.random.Generator, n: int, cap: int) -> np.ndarray:
    """(n, 3) untruncated token counts of (prompt, a, b): the docs/facts.md §1 profile as ``synthetic_pairs`` draws
    it."""
    raw = np.stack(
        [
            rng.lognormal(PROMPT_MU, PROMPT_SIGMA, n),
            rng.lognormal(RESPONSE_MU, RESPONSE_SIGMA, n),
            rng.lognormal(RESPONSE_MU, RESPONSE_SIGMA, n),
        ],
        axis=1,
    )
    return np.clip(np.rint(raw), 1, cap).astype(np.int64)


def build_generated(fmt: PromptFormatter, n: int, vocab: int, seed: int, chunk: int, folder: Path) -> dict:
    """``n`` rows of generated field ids through the formatter's cut and the store builder; saved to ``folder``."""
    rng = np.random.default_rng(seed)

    def run():
        builder = PairTokensBuilder(fmt.prefix, fmt.pieces)
        for start in range(0, n, chunk):
            lens = field_lengths(rng, min(chunk, n - start), fmt.cfg.max_length)  # (rows, 3)
            flat = rng.integers(0, vocab, int(lens.sum())).tolist()  # this chunk's ids as Python ints, as tokenised
            ends = np.cumsum(lens.ravel()).tolist()
            segs = [flat[e - k : e] for e, k in zip(ends, lens.ravel().tolist(), strict=True)]
            builder.append_rows(*fmt.cut_fields(segs[0::3], segs[1::3], segs[2::3]))
            del flat, segs
        return builder.finish()

    store, held, top, seconds = _measure(run)
    t0 = time.perf_counter()
    store.save(folder)
    save_s = time.perf_counter() - t0
    return {
        "held": held, "peak": top, "seconds": seconds, "save_s": save_s, "tokens": store.num_tokens,
        "nbytes": store.nbytes, "lengths": np.asarray(store.lengths), "abs_peak": peak(),
    }  # fmt: skip


def epoch(folder: Path, mmap: bool, batch_tokens: int, max_rows: int, seed: int) -> dict:
    """Load the store and draw one epoch of token-budget batches, each row in a random orientation."""
    (store, load_held, _, load_s) = _measure(lambda: PairTokens.load(folder, mmap=mmap))
    rng = np.random.default_rng(seed)
    swapped = rng.random(len(store)) < 0.5  # (N,) this epoch's orientation per row
    batches = token_budget_batches(store.lengths, batch_tokens, max_rows, shuffle=True, seed=seed)

    def run():
        seen = 0
        for b in batches:
            seen += sum(map(len, store.rows(b, swapped[b])))
        return seen

    seen, held, top, seconds = _measure(run)
    return {
        "load_held": load_held, "load_s": load_s, "held": held, "peak": top, "seconds": seconds,
        "seen": seen, "batches": len(batches), "abs_peak": peak(), "rss_after": rss(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=560_000)
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--template", choices=TEMPLATES, default="tagged")
    ap.add_argument("--truncation", choices=TRUNCATIONS, default="right")
    ap.add_argument("--sample", type=int, default=5000, help="rows of real text for the lists-vs-store comparison")
    ap.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per batch in the epoch")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="folder for the saved store (default: a temporary folder)")
    args = ap.parse_args()

    from kaggle_utils.models.demo import build_qwen_tokenizer

    tok = build_qwen_tokenizer()
    fmt = PromptFormatter(
        tok, InputConfig(max_length=args.max_length, template=args.template, truncation=args.truncation)
    )
    pool = vocab_pool(tok)
    vocab = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    print(
        f"machine: {platform.node()} ({len(os.sched_getaffinity(0))} cores usable), pairs={args.pairs:,}, "
        f"max_length={args.max_length}, template={args.template}, truncation={args.truncation}, "
        f"sample={args.sample:,}; process resident at start {rss() / GB:.2f} GB (tokenizer, vocabulary pool)"
    )

    # 1. sample of real text: old lists vs the store, bytes per token
    df = synthetic_pairs(np.random.default_rng(args.seed + 1), args.sample, pool, args.max_length)
    old = _in_child(old_lists, fmt, df)
    new = _in_child(new_store_sample, fmt, df)
    assert new["ok"], "PairTokens rows differ from PromptFormatter.encode"
    per_token_old = old["held"] / old["tokens"]
    per_token_new = new["held"] / new["tokens"]
    del df

    # 2. all pairs from generated ids, saved; 3. an epoch from memory and memory-mapped
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.out) if args.out else Path(tmp) / "pairs"
        build = _in_child(build_generated, fmt, args.pairs, vocab, args.seed, inputs.CHUNK_ROWS, folder)
        ep_mem = _in_child(epoch, folder, False, args.batch_tokens, args.max_rows, args.seed)
        ep_map = _in_child(epoch, folder, True, args.batch_tokens, args.max_rows, args.seed)
        disk = sum(p.stat().st_size for p in folder.iterdir())
    lengths = build["lengths"]
    tokens = build["tokens"]
    assert ep_mem["seen"] == ep_map["seen"] == tokens, "an epoch must show every token once"
    lists_gb = per_token_old * tokens / GB

    def row(what, n, tok_count, held, top, seconds, note):
        return (
            f"| {what} | {n:,} | {tok_count / 1e6:,.1f}M | {held / GB:.2f} | {top / GB:.2f} | {seconds:.1f} | {note} |"
        )

    ep_mem_held, ep_mem_peak = ep_mem["load_held"] + ep_mem["held"], ep_mem["load_held"] + ep_mem["peak"]
    ep_map_held, ep_map_peak = ep_map["load_held"] + ep_map["held"], ep_map["load_held"] + ep_map["peak"]
    store_note = f"`nbytes` {build['nbytes'] / GB:.2f} GB; save {build['save_s']:.1f} s, {disk / GB:.2f} GB on disk"
    epoch_note = f"{ep_mem['batches']:,} batches of ≤ {args.batch_tokens:,} tokens; load {ep_mem['load_s']:.1f} s"
    table = [
        ("lists `ids` + `ids_swapped` (old train stage), real text", args.sample, old["tokens"], old["held"],
         old["peak"], old["seconds"], f"{per_token_old:.1f} bytes a token (both orientations held)"),
        ("`encode_pairs`, same rows", args.sample, new["tokens"], new["held"], new["peak"], new["seconds"],
         f"{per_token_new:.2f} bytes a token; rows equal `encode` both ways"),
        (f"store built from generated ids (cut + pack, chunks of {inputs.CHUNK_ROWS:,})", args.pairs, tokens,
         build["held"], build["peak"], build["seconds"], store_note),
        ("epoch: `rows(idx, swapped)`, store in memory", args.pairs, tokens, ep_mem_held, ep_mem_peak,
         ep_mem["seconds"], epoch_note),
        ("epoch: the same, store memory-mapped", args.pairs, tokens, ep_map_held, ep_map_peak, ep_map["seconds"],
         "resident = the file pages touched (page cache, evictable)"),
    ]  # fmt: skip
    print()
    print("| phase | rows | tokens (one orientation) | held GB | peak GB above start | seconds | note |")
    print("|---|---|---|---|---|---|---|")
    for what, n, tok_count, held, top, seconds, note in table:
        print(
            f"| {what} | {n:,} | {tok_count / 1e6:,.1f}M | {held / GB:.2f} | {top / GB:.2f} | {seconds:.1f} | {note} |"
        )
    print(
        f"| lists, **extrapolated** at {per_token_old:.1f} bytes a token | {args.pairs:,} | {tokens / 1e6:,.1f}M | "
        f"{lists_gb:.1f} | ≥ {lists_gb:.1f} | – | not run: the sample's rate × these tokens |"
    )
    print()
    print(
        f"rows: mean {lengths.mean():,.0f} tokens, {np.mean(lengths >= args.max_length - 1):.1%} at the cap; "
        f"whole-process peak resident: build {build['abs_peak'] / GB:.2f} GB, epoch in memory "
        f"{ep_mem['abs_peak'] / GB:.2f} GB, epoch memory-mapped {ep_map['abs_peak'] / GB:.2f} GB"
    )
    build_peak = build["peak"] / GB
    epoch_peak = max(ep_mem_peak, ep_map_peak) / GB
    print(
        f"train-memory: pairs={args.pairs} tokens={tokens} store_gb={build['nbytes'] / GB:.2f} "
        f"build_peak_gb={build_peak:.2f} epoch_peak_gb={epoch_peak:.2f} lists_gb={lists_gb:.1f} "
        f"ratio={lists_gb / (build['nbytes'] / GB):.1f}"
    )


if __name__ == "__main__":
    main()
