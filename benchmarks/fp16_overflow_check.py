"""fp16 overflow on a real-shape Gemma2 classifier in nf4: the rows rescored in fp32, and their error.

    python benchmarks/fp16_overflow_check.py                     # a CUDA GPU; ~10 GiB with the default 2 layers
    python benchmarks/fp16_overflow_check.py --layers 4 --rows 32 --max-len 2500
    python benchmarks/fp16_overflow_check.py --smoke             # tiny shapes on the CPU: checks the script only

Builds a random-weight Gemma2-9B sequence classifier with the real layer shapes (hidden 3584, 16 query / 8 key-value
heads of 256, MLP 14,336, vocab 256,000; ``--layers`` of the 42), saves it in fp16 and loads it twice through
``load_classifier``: nf4 with fp16 compute (the T4 setting) and nf4 with fp32 compute holding the first load's very
4-bit codes (``copy_weights``): the reference, the same weights in fp32 arithmetic.

Random weights do not overflow, so two tokens are made to, the two ways fp16 overflows in practice:

* ``channel``: a massive activation in one channel (as trained LLMs have): only this token writes channel 0, and
  layer 0's MLP amplifies that channel past 65,504;
* ``embedding``: Gemma2 multiplies its embeddings by sqrt(3584) = 59.9 in the weights' dtype: a row of 2,000
  becomes 1.2e5, inf in fp16.

Rows are random token ids with the competition's length profile (docs/facts.md §1) capped at ``--max-len``; every 4th
row gets the channel token, the next one the embedding token. The rows are scored by ``score_batch`` in token-budget
batches (fp16, non-finite rows rescored alone in fp32 compute), then each rescored row is run again in the safe path and
in the reference to compare logits. Prints one table: rows that overflowed (and any that overflowed on their own),
rescored, left NaN, max |Δ logit| of the safe path against the reference and, as the baseline, of plain fp16 on the rows
that did not overflow; seconds per row and peak memory of the fp16 pass and the safe path.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.models.precision import copy_weights, fp32_compute
from kaggle_utils.scoring.predict import score_batch

# Gemma2-9B's shapes (config.json of google/gemma-2-9b; benchmarks/bench_infer.py uses the same)
GEMMA2_9B = dict(
    vocab_size=256_000, hidden_size=3584, intermediate_size=14_336, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
)  # fmt: skip
SMOKE = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, query_pre_attn_scalar=16, sliding_window=256, attn_logit_softcapping=50.0,
)  # fmt: skip
FP16_MAX = 65_504.0
CHANNEL_TOKEN, EMBEDDING_TOKEN = 7, 11  # ids the random rows never use (they draw from 100 upwards)


def build(path: Path, shapes: dict, layers: int, device: str) -> None:
    """Random Gemma2 classifier with the two overflow tokens, saved in fp16 (every value then exact in fp32)."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    cfg = Gemma2Config(**shapes, num_hidden_layers=layers, num_labels=2, pad_token_id=0, max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForSequenceClassification(cfg).half()
    layer = model.model.layers[0]
    hidden, units = cfg.hidden_size, cfg.intermediate_size
    # channel: after the pre-MLP norm channel 0 of the hot token is ~ sqrt(hidden) / 1.85 (32 at 3584); gate and
    # up multiply it by `gain` each and down_proj sums the products over all units: make that ~16 x FP16_MAX
    # (0.5 at the real shapes: a power of two, kept exactly by nf4 as its block's absmax)
    gain = float(2.0 ** np.ceil(np.log2(np.sqrt(16 * FP16_MAX / units) * 1.85 / np.sqrt(hidden))))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (vocab, hidden)
        emb[:, 0] = 0  # only CHANNEL_TOKEN writes channel 0 ...
        emb[CHANNEL_TOKEN, 0] = 1.0
        layer.self_attn.o_proj.weight[0] = 0  # ... attention does not either
        layer.mlp.gate_proj.weight[:, 0] = gain
        layer.mlp.up_proj.weight[:, 0] = gain
        layer.mlp.down_proj.weight[0] = 1.0
        # embedding: Gemma2 multiplies by sqrt(hidden) in fp16: 4 x FP16_MAX
        emb[EMBEDDING_TOKEN] = 4 * FP16_MAX / np.sqrt(hidden)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def make_rows(n: int, max_len: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], dict[str, list[int]]]:
    """Random ids with the §1 length profile (prompt + 2 responses), capped; hot tokens in every 4th / 4th+1 row."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(39), 1.93, n) + rng.lognormal(np.log(452), 0.6, (2, n)).sum(0)
    lengths = np.clip(lengths.astype(int), 16, max_len)
    rows = [rng.integers(100, vocab, int(t)).tolist() for t in lengths]
    hot = {"channel": list(range(0, n, 4)), "embedding": list(range(1, n, 4))}
    for name, token in (("channel", CHANNEL_TOKEN), ("embedding", EMBEDDING_TOKEN)):
        for i in hot[name]:
            rows[i][len(rows[i]) // 2] = token
    return rows, hot


def logits_of(model, row: list[int], device: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in pad([row], 0).items()}).logits.float().cpu()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (Gemma2-9B has 42)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=None, help="folder for the saved model (default: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    args = ap.parse_args()

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("fp16_overflow_check: no CUDA GPU visible, nothing measured (run it on a GPU, or --smoke on the CPU)")
        return
    if device == "cpu":
        torch.set_num_threads(2)
    shapes = SMOKE if args.smoke else GEMMA2_9B
    work = args.work or Path(tempfile.mkdtemp(prefix="fp16-overflow-"))
    path = work / f"gemma2-{args.layers}l-overflow"

    t0 = time.time()
    build(path, shapes, args.layers, device)
    build_s = time.time() - t0
    nf4 = load_classifier(ModelConfig(model_path=path, load_in_4bit=True, device=device, dtype="fp16"), 0)
    reference = load_classifier(ModelConfig(model_path=path, load_in_4bit=True, device=device, dtype="fp32"), 0)
    copy_weights(nf4, reference)  # the same 4-bit codes: the two differ in compute dtype alone

    rows, hot = make_rows(args.rows, args.max_len, shapes["vocab_size"])
    real_tokens = sum(map(len, rows))

    # the fp16 pass, as the infer stage runs it: token-budget batches, OOM split, overflow rescue
    stats: dict = {}
    lengths = np.array([len(r) for r in rows])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    probs = np.full((len(rows), 2), np.nan, dtype=np.float32)
    for idx in token_budget_batches(lengths, args.batch_tokens, max_rows=64):
        probs[idx] = score_batch(nf4, rows, idx, 0, device, stats)
    pass_s = time.time() - t0
    pass_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    # which rows overflowed in plain fp16, and the fp16 error on the others (the baseline)
    fp16_logits = [logits_of(nf4, r, device) for r in rows]
    ref_logits = [logits_of(reference, r, device) for r in rows]
    overflowed = [i for i, x in enumerate(fp16_logits) if not torch.isfinite(x).all()]
    planted = set(hot["channel"]) | set(hot["embedding"])
    finite = [i for i in range(len(rows)) if i not in overflowed]
    fp16_err = max((float((fp16_logits[i] - ref_logits[i]).abs().max()) for i in finite), default=float("nan"))

    # the safe path on each overflowed row: time, peak memory, error against the reference
    safe_err, safe_s, safe_peak = [], [], float("nan")
    with fp32_compute(nf4) as switched:
        for i in overflowed:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            x = logits_of(nf4, rows[i], device)
            safe_s.append(time.time() - t0)
            if device == "cuda":
                safe_peak = np.nanmax([safe_peak, torch.cuda.max_memory_allocated() / 2**30])
            if torch.isfinite(x).all():
                safe_err.append(float((x - ref_logits[i]).abs().max()))
    ref_finite = sum(bool(torch.isfinite(ref_logits[i]).all()) for i in overflowed)
    in_batch_ok = all(np.isfinite(probs[i]).all() == bool(torch.isfinite(ref_logits[i]).all()) for i in overflowed)

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    fp16_row_s = pass_s / len(rows)
    mean_safe_s = float(np.mean(safe_s)) if safe_s else float("nan")
    lines = [
        f"{datetime.date.today()} · {name} · torch {torch.__version__} · Gemma2 real shapes, {args.layers} layers, "
        f"nf4, {len(rows)} rows / {real_tokens} tokens (max {lengths.max()}){' · SMOKE' if args.smoke else ''}",
        f"build + save {build_s:.1f} s",
        "| figure | value |",
        "|---|---|",
        f"| rows overflowing in fp16 (planted {len(planted)}) | {len(overflowed)} "
        f"(not planted: {len(set(overflowed) - planted)}) |",
        f"| rescored by score_batch / left NaN | {stats.get('overflow_rescored', 0)} / "
        f"{stats.get('overflow_rows', 0) - stats.get('overflow_rescored', 0)} |",
        f"| score_batch stats | {stats} |",
        f"| reference (fp32 compute) finite on those rows | {ref_finite} / {len(overflowed)} |",
        f"| score_batch's rescued rows finite exactly where the reference is | {in_batch_ok} |",
        f"| max abs Δ logit, safe path vs reference (rescored rows) | {max(safe_err, default=float('nan')):.3g} |",
        f"| max abs Δ logit, plain fp16 vs reference (other rows; baseline) | {fp16_err:.3g} |",
        f"| fp16 pass: s/row (incl. rescue), peak GiB | {fp16_row_s:.3f}, {pass_peak:.2f} |",
        f"| safe path: s/row, peak GiB | {mean_safe_s:.3f}, {safe_peak:.2f} |",
        f"| safe path s/row ÷ fp16 s/row | {mean_safe_s / fp16_row_s:.1f} |",
        f"| switched to fp32 | {switched.quantized_layers} 4-bit layers, {switched.streamed_linears} streamed "
        f"linears, {switched.upcast_tensors} tensors upcast (+{switched.upcast_bytes / 2**20:.1f} MiB) |",
    ]
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
