"""The inference engine at real shapes on one GPU rehearsing a T4: fp16, memory capped, max length 2,500.

    python benchmarks/bench_infer.py --work /tmp/bench-infer      # a CUDA GPU; builds random-weight models

For Qwen2.5-14B's and Gemma2-9B's shapes (random weights, saved with ``save_pretrained``, loaded nf4 through the
same path as real weights), on rows drawn with the competition's length profile:

* engine: the infer stage's scoring pass (:func:`kaggle_utils.infer.score_model`: queue of token-budget batches,
  OOM split-and-retry, deadline checks, parts on disk);
* public: the public notebooks' recipe on the same loaded model: rows sorted by length, a fixed batch of 4;
* ideal: equal-length rows (the mean length of the set, rounded to 128) in batches of the same token budget: no
  padding and no length mix, the bound a batching scheme can approach.

Everything runs in fp16 (a T4 has no bf16) with ``torch.cuda.set_per_process_memory_fraction`` capping the process
at ``--cap-gib`` (15 GiB: what a 16 GB T4 leaves usable). Prints one table: real tokens/s (padding not counted),
ratios to ideal and to public, peak memory, out-of-memory splits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.data.schema import read_test
from kaggle_utils.infer import InferConfig, score_model
from kaggle_utils.inputs.batching import token_budget_batches
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.models.demo import build_qwen_tokenizer
from kaggle_utils.models.loading import ModelConfig, load_classifier, load_tokenizer
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.predict import score_batch

SHAPES = {
    "qwen2.5-14b": dict(
        model_type="qwen2", vocab_size=152_064, hidden_size=5120, intermediate_size=13_824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, rope_theta=1_000_000.0, tie_word_embeddings=False,
    ),
    "gemma2-9b": dict(
        model_type="gemma2", vocab_size=256_000, hidden_size=3584, intermediate_size=14_336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
}  # fmt: skip


def build(name: str, path: Path) -> None:
    """A random-weight sequence classifier with the real shapes, saved in bf16, with the Qwen2.5 tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if (path / "config.json").is_file():
        return  # built by an earlier run on this machine
    spec = dict(SHAPES[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), num_labels=2, pad_token_id=151_643, **spec)
    with torch.device("cuda"):
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    build_qwen_tokenizer(path)  # the demo tokenizer: ids within both vocabularies
    del model
    torch.cuda.empty_cache()


@torch.no_grad()
def timed(model, rows: list[list[int]], batches: list[np.ndarray], pad_id: int) -> tuple[float, int]:
    """Seconds and real tokens to score ``batches`` once (after one warm-up batch)."""
    score_batch(model, rows, batches[0], pad_id, "cuda:0")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for idx in batches:
        score_batch(model, rows, idx, pad_id, "cuda:0")
    torch.cuda.synchronize()
    return time.perf_counter() - t0, int(sum(len(rows[i]) for b in batches for i in b))


def bench(name: str, model_dir: Path, test_file: Path, out: Path, batch_tokens: int, max_rows: int) -> dict:
    cfg = InferConfig(
        test_file=test_file, primary_model=model_dir, out_dir=out, max_length=2500, batch_tokens=batch_tokens,
        max_rows=max_rows, devices="cuda:0", dtype="fp16", checkpoint_seconds=1e9,
    )  # fmt: skip
    test, _ = read_test(test_file)
    # a warm-up pass on a few rows first (CUDA and bitsandbytes kernels initialise), as public and ideal get one
    score_model(cfg, model_dir, None, test.head(16), Deadline(None), desc=f"{name} warm-up")
    torch.cuda.reset_peak_memory_stats()
    result = score_model(cfg, model_dir, None, test, Deadline(None), desc=name)
    tok = load_tokenizer(model_dir)
    rows = PromptFormatter(tok, cfg).encode(test)
    real = int(sum(len(r) for r in rows))
    engine_s = result.seconds - sum(result.load_seconds.values())
    peak = torch.cuda.max_memory_allocated() / 2**30
    model = load_classifier(ModelConfig(model_path=model_dir, device="cuda:0", dtype="fp16"), tok.pad_token_id)
    order = np.argsort([-len(r) for r in rows], kind="stable")
    public = [order[i : i + 4] for i in range(0, len(order), 4)]
    public_s, _ = timed(model, rows, public, tok.pad_token_id)
    length = max(128, int(round(np.mean([len(r) for r in rows]) / 128)) * 128)
    flat = [r[:length] + [r[-1]] * (length - len(r)) for r in rows]  # every row exactly `length` tokens
    ideal_s, ideal_tokens = timed(model, flat, token_budget_batches(np.full(len(flat), length), batch_tokens, 32), 0)
    del model
    torch.cuda.empty_cache()
    return {
        "model": f"{name} r{max_rows}",
        "rows": len(rows),
        "real_tokens": real,
        "engine_tok_s": real / engine_s,
        "public_tok_s": real / public_s,
        "ideal_tok_s": ideal_tokens / ideal_s,
        "peak_gib": peak,
        "scored": int(result.scored.sum()),
        "oom": result.oom,
        "errors": result.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-infer"))
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--cap-gib", type=float, default=15.0, help="per-process GPU memory cap (a T4 leaves ~15 GiB)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-rows", default="32,128", help="the engine's most rows per batch; several: one run each")
    ap.add_argument("--models", default="qwen2.5-14b,gemma2-9b")
    args = ap.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    data = generate_demo_data(
        DemoDataConfig(out_dir=args.work / "data", n_train=8, n_test=args.rows, n_unlabeled=8, length_scale=1.0)
    )
    out = []
    for name in args.models.split(","):
        t0 = time.time()
        build(name, args.work / name)
        print(f"{name}: built in {time.time() - t0:.0f} s", flush=True)
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib / total))
        for max_rows in map(int, args.max_rows.split(",")):
            work = args.work / f"out-{name}-{max_rows}"
            out.append(bench(name, args.work / name, data["test"], work, args.batch_tokens, max_rows))
            print(json.dumps(out[-1]), flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"\n{torch.cuda.get_device_name(0)} · fp16 · cap {args.cap_gib} GiB · max length 2500 · {args.rows} rows")
    print(f"{'model':17} {'engine':>8} {'public':>8} {'ideal':>8} {'eng/ideal':>9} {'eng/pub':>8} {'peak GiB':>8} oom")
    for r in out:
        print(
            f"{r['model']:17} {r['engine_tok_s']:8.0f} {r['public_tok_s']:8.0f} {r['ideal_tok_s']:8.0f} "
            f"{r['engine_tok_s'] / r['ideal_tok_s']:9.3f} {r['engine_tok_s'] / r['public_tok_s']:8.2f} "
            f"{r['peak_gib']:8.1f} {r['oom']}"
        )


if __name__ == "__main__":
    main()
