"""Format + tokenise synthetic pairs with the competition's length profile, then compare batching rules.

    python benchmarks/bench_inputs.py --pairs 560000          # make bench-inputs PAIRS=560000

Rows follow docs/facts.md §1: prompt ~ lognormal(ln 39, 1.93) tokens, each response ~ lognormal(ln 452, 0.60) tokens,
each capped at the max length. Text is made by joining random vocabulary entries of the real Qwen2.5
tokenizer (entries that decode to whole characters), so a field of n sampled entries re-tokenises to about n
tokens. Generation is timed apart from formatting: ``seconds`` in the last line is format + tokenise only
(``PromptFormatter.encode``: tokenise, allocate, cut, assemble ids), summed over chunks of ``--chunk`` rows,
which bound memory (560K rows of ids as Python lists would not fit in 24 GiB).

Batching: token-budget batches (length-sorted, ``--batch-tokens`` padded tokens, ≤ ``--max-rows`` rows) against
the public-notebook rule, a fixed batch of 8 over length-sorted rows, and (for scale) 8 unsorted rows.
The last line is ``inputs: pairs=N seconds=S padding_waste=P fixed8_waste=Q`` (wastes as fractions).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import pandas as pd

from kaggle_utils.inputs.batching import fixed_size_batches, padding_waste, token_budget_batches
from kaggle_utils.inputs.formatter import TEMPLATES, TRUNCATIONS, InputConfig, PromptFormatter
from kaggle_utils.models.demo import build_qwen_tokenizer

# docs/facts.md §1: token-length profile of the competition's fields
PROMPT_MU, PROMPT_SIGMA = np.log(39), 1.93
RESPONSE_MU, RESPONSE_SIGMA = np.log(452), 0.60


def vocab_pool(tokenizer) -> np.ndarray:
    """Decoded vocabulary entries that are whole characters (no partial UTF-8 bytes), as an object array."""
    n = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    special = set(tokenizer.all_special_ids)
    texts = [tokenizer.decode([i]) for i in range(n) if i not in special]
    return np.array([t for t in texts if t and "\ufffd" not in t], dtype=object)


def synthetic_pairs(rng: np.random.Generator, n: int, pool: np.ndarray, cap: int) -> pd.DataFrame:
    """``n`` rows of prompt / response_a / response_b with the docs/facts.md §1 lengths (in sampled vocabulary
    entries)."""
    lengths = {
        "prompt": rng.lognormal(PROMPT_MU, PROMPT_SIGMA, n),
        "response_a": rng.lognormal(RESPONSE_MU, RESPONSE_SIGMA, n),
        "response_b": rng.lognormal(RESPONSE_MU, RESPONSE_SIGMA, n),
    }
    cols = {"id": np.arange(n)}
    for name, raw in lengths.items():
        k = np.clip(np.rint(raw), 1, cap).astype(np.int64)
        pieces = pool[rng.integers(0, len(pool), int(k.sum()))].tolist()
        ends = np.cumsum(k)
        cols[name] = ["".join(pieces[e - m : e]) for e, m in zip(ends.tolist(), k.tolist(), strict=True)]
    return pd.DataFrame(cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=560_000)
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--template", choices=TEMPLATES, default="tagged")
    ap.add_argument("--truncation", choices=TRUNCATIONS, default="right")
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=20_000, help="rows generated and encoded at a time")
    ap.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per token-budget batch")
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline-rows", type=int, default=5000, help="rows also encoded with the Hugging Face BPE")
    ap.add_argument("--tokenizer", default="", help="a saved tokenizer folder (default: build the real Qwen2.5 one)")
    args = ap.parse_args()

    print(
        f"machine: {platform.node()} ({os.cpu_count()} cores), pairs={args.pairs}, max_length={args.max_length}, "
        f"template={args.template}, truncation={args.truncation}, num_proc={args.num_proc}, chunk={args.chunk}"
    )
    t0 = time.perf_counter()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = build_qwen_tokenizer()
    pool = vocab_pool(tok)
    setup_s = time.perf_counter() - t0
    cfg = InputConfig(
        max_length=args.max_length, template=args.template, truncation=args.truncation, num_proc=args.num_proc
    )
    fmt = PromptFormatter(tok, cfg)
    rng = np.random.default_rng(args.seed)

    print(f"bpe backend: {fmt.bpe_backend}, cores usable: {len(os.sched_getaffinity(0))}")

    # baseline in the same run: the same rows through the Hugging Face tokenizer (the formatter's fallback path)
    baseline = None
    if args.baseline_rows:
        df = synthetic_pairs(np.random.default_rng(args.seed + 1), args.baseline_rows, pool, args.max_length)
        hf = PromptFormatter(tok, InputConfig(**{**cfg.__dict__, "fast_bpe": False}))
        t_hf = time.perf_counter()
        rows_hf = hf.encode(df)
        t_fast = time.perf_counter()
        rows_fast = fmt.encode(df)
        t_end = time.perf_counter()
        assert rows_fast == rows_hf, "the fast path changed the ids"
        baseline = (t_fast - t_hf, t_end - t_fast)
    gen_s = enc_s = enc_cpu = 0.0
    lengths = np.zeros(args.pairs, dtype=np.int64)
    for start in range(0, args.pairs, args.chunk):
        n = min(args.chunk, args.pairs - start)
        tg = time.perf_counter()
        df = synthetic_pairs(rng, n, pool, args.max_length)
        te, ce = time.perf_counter(), time.process_time()
        rows = fmt.encode(df)
        tf = time.perf_counter()
        enc_cpu += time.process_time() - ce  # this process's CPU time, all threads (workers not counted)
        gen_s += te - tg
        enc_s += tf - te
        lengths[start : start + n] = PromptFormatter.lengths(rows)
        done = start + n
        print(f"  {done:>8,} rows  encode {enc_s:7.1f} s  ({done / enc_s:,.0f} rows/s, projected "
              f"{args.pairs / done * enc_s:,.0f} s for all)", flush=True)  # fmt: skip
    assert lengths.max() <= args.max_length

    tb = time.perf_counter()
    budget_batches = token_budget_batches(lengths, args.batch_tokens, args.max_rows)
    batch_s = time.perf_counter() - tb
    fixed_sorted = fixed_size_batches(lengths, 8)
    fixed_unsorted = fixed_size_batches(lengths, 8, sort=False)
    waste = padding_waste(lengths, budget_batches)
    waste8 = padding_waste(lengths, fixed_sorted)
    waste8_unsorted = padding_waste(lengths, fixed_unsorted)
    real_tokens = int(lengths.sum())

    print()
    print("| step | seconds | note |")
    print("|---|---|---|")
    print(f"| tokenizer + vocabulary pool | {setup_s:.1f} | {len(pool):,} whole-character entries |")
    print(f"| generate synthetic text | {gen_s:.1f} | not counted below |")
    print(
        f"| format + tokenise | {enc_s:.1f} | {args.pairs / enc_s:,.0f} rows/s, {real_tokens / enc_s / 1e6:.2f}M kept "
        f"tokens/s; mean row {lengths.mean():.0f} tokens, {np.mean(lengths >= args.max_length - 1):.1%} at the cap |"
    )
    print(
        f"| format + tokenise, CPU time of this process | {enc_cpu:.1f} | all threads; "
        f"{enc_cpu / enc_s:.2f} cores busy on average |"
    )
    if baseline:
        print(
            f"| baseline: {args.baseline_rows:,} rows, Hugging Face BPE vs {fmt.bpe_backend} | "
            f"{baseline[0]:.1f} vs {baseline[1]:.1f} | {baseline[0] / baseline[1]:.2f}x; identical ids |"
        )
    print(f"| token-budget batching | {batch_s:.2f} | {len(budget_batches):,} batches |")
    print()
    print("| batching | batches | padded tokens | padding waste |")
    print("|---|---|---|---|")
    for name, batches, w in (
        (f"token budget {args.batch_tokens:,}, ≤{args.max_rows} rows, sorted", budget_batches, waste),
        ("fixed 8, length-sorted", fixed_sorted, waste8),
        ("fixed 8, unsorted", fixed_unsorted, waste8_unsorted),
    ):
        padded = sum(len(b) * int(lengths[b].max()) for b in batches)
        print(f"| {name} | {len(batches):,} | {padded:,} | {w:.5f} |")
    print()
    print(f"inputs: pairs={args.pairs} seconds={enc_s:.1f} padding_waste={waste:.5f} fixed8_waste={waste8:.5f}")


if __name__ == "__main__":
    main()
