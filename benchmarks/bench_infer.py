"""The inference engine at real shapes on one GPU rehearsing a T4: fp16, memory capped, max length 2,500.

    python benchmarks/bench_infer.py --work /tmp/bench-infer                 # engine vs public vs ideal, capped
    python benchmarks/bench_infer.py --work /tmp/bench-infer --formats       # nf4 vs int8 vs fp16 dense, uncapped
    python benchmarks/bench_infer.py --work /tmp/bench-infer --rehearse 300  # the stage's --rehearse, capped

For Qwen2.5-14B's and Gemma2-9B's shapes (random weights, saved with ``save_pretrained``, loaded through the same
path as real weights), on rows drawn with the competition's length profile:

* engine: the infer stage's own pass (``Cascade.score``: device copies, a queue of token-budget batches, the cost
  model's deadline gate, OOM split-and-retry, parts on disk) at a fixed budget (``--batch-tokens``) and at the budget
  the stage measures from free memory (``batch_tokens = 0``, :mod:`kaggle_utils.scoring.memory`);
* public: the public notebooks' recipe on the same loaded model: rows sorted by length, a fixed batch of 4;
* ideal: equal-length rows (the set's mean length, rounded to 128) in batches of the same budget: no padding and no
  length mix; ideal-mix: the same rows cut to a multiple of 64 tokens and batched by exact length: no padding, the
  real length mix (attention's share grows with length, so this is the bound for these rows).

Everything runs in fp16 (a T4 has no bf16) with ``torch.cuda.set_per_process_memory_fraction`` capping the process
at ``--cap-gib`` (15 GiB: what a 16 GB T4 leaves usable), except ``--formats`` (a dense fp16 14B does not fit a T4;
the layer split over two is the engine's answer there). Prints one table per mode.
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
from kaggle_utils.infer import Cascade, InferConfig, Role, encode, infer
from kaggle_utils.inference.roles import role_inputs
from kaggle_utils.inputs.batching import token_budget_batches
from kaggle_utils.models.demo import build_qwen_tokenizer
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.planner import CostModel
from kaggle_utils.scoring.pool import DeviceCopies
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
    # Llama-3.3-70B (the 70B teacher); its 128,256-row vocabulary cannot hold the demo tokenizer's ids (up to
    # 151,645): benchmarks that tokenise with it build it with vocab_size=151_936 and say what that adds
    "llama3.3-70b": dict(
        model_type="llama", vocab_size=128_256, hidden_size=8192, intermediate_size=28_672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rope_theta=500_000.0, tie_word_embeddings=False,
    ),
    # Llama's structure at a CPU's size
    "llama-tiny": dict(
        model_type="llama", vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500_000.0, tie_word_embeddings=False,
    ),
    # Qwen2.5-14B's structure at a CPU's size: the benchmarks' code paths checked without a GPU
    "qwen2-tiny": dict(
        model_type="qwen2", vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0, tie_word_embeddings=False,
    ),
}  # fmt: skip


def build(name: str, path: Path, device: str = "cuda", **overrides) -> None:
    """A random-weight sequence classifier with the real shapes, saved in bf16, with the Qwen2.5 tokenizer;
    ``overrides`` replace fields of the shape (``num_hidden_layers=4``: a shallow copy of a deep model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return  # built by an earlier run on this machine (the tokenizer is written last)
    spec = dict(SHAPES[name]) | overrides
    cfg = AutoConfig.for_model(spec.pop("model_type"), num_labels=2, pad_token_id=151_643, **spec)
    with torch.device(device):
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


def int8_loader(model_dir: Path):
    """bitsandbytes LLM.int8 straight from the bf16 folder (what ``merge --export-int8`` saves), head dense."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    def load(device: str):
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, dtype=torch.float16, quantization_config=quant, device_map={"": device}
        )
        model.config.pad_token_id, model.config.use_cache = 151_643, False
        return model.eval()

    return load


def load_role(cfg: InferConfig, model_dir: Path, loader=None) -> Role:
    """The model loaded as the stage loads it (one copy on cuda:0), or with ``loader``."""
    role = Role("primary", model_dir, None, CostModel(cfg.safety.first_batch_seconds_per_token))
    deadline = Deadline(None)
    if loader is None:
        pad_id = encode(
            role_inputs(cfg.inputs, None, "bench"), model_dir, read_test(cfg.data.test_file)[0].head(1)
        ).tokenizer.pad_token_id
        role.start_loading(cfg.models, cfg.budget.activation_reserve_gib, pad_id, ["cuda:0"], deadline)
    else:
        role.copies = DeviceCopies(loader, ["cuda:0"], deadline.clock)
    if role.copies.wait(0, deadline) is None:
        raise RuntimeError(f"{model_dir}: {role.copies.errors}")
    return role


def engine(cfg: InferConfig, role: Role, test, desc: str) -> dict:
    """The stage's primary pass on ``test`` with ``role``'s loaded copy, after its budget is set and a warm-up."""
    run = Cascade(cfg, test, {}, Deadline(None))
    enc = encode(role_inputs(cfg.inputs, role.adapter, role.name), role.model_path, test)
    model = role.copies.models[0]
    run.measure_budget(role, enc)  # batch_tokens = 0: the probe (which also warms the kernels up)
    score_batch(model, enc.rows, np.argsort(enc.lengths)[-4:], enc.tokenizer.pad_token_id, "cuda:0")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run.score(role, enc, desc)
    seconds = time.perf_counter() - t0
    return {
        "variant": desc,
        "batch_tokens": role.batch_tokens,
        "tok_s": int(enc.lengths.sum()) / seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "scored": int(result.scored.sum()),
        "oom": result.oom,
        "errors": result.errors,
        "enc": enc,
    }


def baselines(model, enc, batch_tokens: int) -> dict[str, float]:
    """Tokens/s of the public recipe, the equal-length ideal and the no-padding ideal on the same loaded model."""
    rows, pad_id = enc.rows, enc.tokenizer.pad_token_id
    order = np.argsort(-enc.lengths, kind="stable")
    public_s, real = timed(model, rows, [order[i : i + 4] for i in range(0, len(order), 4)], pad_id)
    length = max(128, int(round(enc.lengths.mean() / 128)) * 128)
    flat = [r[:length] + [r[-1]] * (length - len(r)) for r in rows]  # every row exactly `length` tokens
    ideal_s, ideal_tokens = timed(model, flat, token_budget_batches(np.full(len(flat), length), batch_tokens, 32), 0)
    cut = [r[: max(64, len(r) // 64 * 64)] for r in rows]  # lengths in steps of 64: batches of one exact length
    cut_lengths = np.array([len(r) for r in cut])
    mix_s, mix_tokens = timed(model, cut, token_budget_batches(cut_lengths, batch_tokens, 32), 0)
    return {"public": real / public_s, "ideal": ideal_tokens / ideal_s, "ideal_mix": mix_tokens / mix_s}


def bench_engine(name: str, model_dir: Path, test_file: Path, out: Path, args) -> list[dict]:
    cfg = InferConfig.flat(
        test_file=test_file, primary_model=model_dir, out_dir=out, max_length=2500, batch_tokens=args.batch_tokens,
        max_rows=args.max_rows, devices="cuda:0", dtype="fp16", checkpoint_seconds=1e9, tta_fraction=0.0,
        max_batch_tokens=args.max_batch_tokens,
    )  # fmt: skip
    test, _ = read_test(test_file)
    role, rows = load_role(cfg, model_dir), []
    for variant, tokens in (("fixed", args.batch_tokens), ("measured", 0)):
        run_cfg = cfg.replace(batch_tokens=tokens, out_dir=out / f"{name}-{variant}")
        r = engine(run_cfg, role, test, f"{name} {variant}")
        if variant == "fixed":
            base = baselines(role.copies.models[0], r["enc"], args.batch_tokens)
        rows.append({k: v for k, v in r.items() if k != "enc"} | base | {"model": name})
        print(json.dumps(rows[-1], default=str), flush=True)
    role.close()
    return rows


def bench_formats(name: str, model_dir: Path, test_file: Path, out: Path, args) -> list[dict]:
    """nf4 (as trained) vs int8 vs dense fp16 through the same engine pass, uncapped, at the fixed budget."""
    cfg = InferConfig.flat(
        test_file=test_file, primary_model=model_dir, out_dir=out, max_length=2500, batch_tokens=args.batch_tokens,
        max_rows=args.max_rows, devices="cuda:0", dtype="fp16", checkpoint_seconds=1e9, tta_fraction=0.0,
    )  # fmt: skip
    test, _ = read_test(test_file)
    rows = []
    for fmt in ("nf4", "int8", "fp16"):
        t0 = time.perf_counter()
        run_cfg = cfg.replace(load_in_4bit=fmt == "nf4", out_dir=out / f"{name}-{fmt}")
        role = load_role(run_cfg, model_dir, int8_loader(model_dir) if fmt == "int8" else None)
        weights = torch.cuda.memory_allocated() / 2**30
        r = engine(run_cfg, role, test, f"{name} {fmt}")
        role.close()
        keep = {k: v for k, v in r.items() if k != "enc"}
        rows.append(keep | {"model": name, "format": fmt, "weights_gib": weights, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def rehearse(work: Path, test_file: Path, args) -> None:
    """The stage's ``--rehearse`` with both models on one capped GPU: the projection of a 25K-row run."""
    cfg = InferConfig.flat(
        test_file=test_file, primary_model=work / "qwen2.5-14b", secondary_model=work / "gemma2-9b",
        out_dir=work / "reh",
        max_length=2500, batch_tokens=0, max_batch_tokens=args.max_batch_tokens, max_rows=args.max_rows,
        devices=args.devices, dtype="fp16", rehearse=args.rehearse, rehearse_minutes=args.rehearse_minutes,
        tta_fraction=0.25, fail_soft=True,
    )  # fmt: skip
    infer(cfg)
    report = json.loads((work / "reh" / "rehearsal" / "report.json").read_text())
    print(json.dumps({k: report.get(k) for k in ("sources", "token_budget", "plans", "errors")}, default=str))
    print(report["projection"]["table"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-infer"))
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--cap-gib", type=float, default=15.0, help="per-process GPU memory cap (a T4 leaves ~15 GiB)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="the fixed budget; the measured one is also run")
    ap.add_argument("--max-batch-tokens", type=int, default=32_768, help="ceiling of the measured budget")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--models", default="qwen2.5-14b,gemma2-9b")
    ap.add_argument("--formats", action="store_true", help="nf4 vs int8 vs fp16 dense instead, uncapped")
    ap.add_argument("--rehearse", type=int, default=0, help="instead: the stage's rehearsal on this many rows")
    ap.add_argument("--rehearse-minutes", type=float, default=3.0)
    ap.add_argument(
        "--devices", default="cuda:0", help="the rehearsal's devices; cuda:0,cuda:0 = two copies (two T4s' threads)"
    )
    args = ap.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    data = generate_demo_data(
        DemoDataConfig(out_dir=args.work / "data", n_train=8, n_test=args.rows, n_unlabeled=8, length_scale=1.0)
    )
    for name in args.models.split(","):
        t0 = time.time()
        build(name, args.work / name)
        print(f"{name}: built in {time.time() - t0:.0f} s", flush=True)
    cap = 1.0 if args.formats else min(1.0, args.cap_gib / total)
    torch.cuda.set_per_process_memory_fraction(cap)
    head = f"{torch.cuda.get_device_name(0)} · fp16 · cap {cap * total:.0f} GiB · max length 2500 · {args.rows} rows"
    if args.rehearse:
        print(head)
        return rehearse(args.work, data["test"], args)
    bench = bench_formats if args.formats else bench_engine
    out = [r for name in args.models.split(",") for r in bench(name, args.work / name, data["test"], args.work, args)]
    print(f"\n{head}")
    if args.formats:
        print(
            f"{'model':12} {'format':6} {'tok/s':>8} {'vs nf4':>7} {'weights GiB':>11} {'peak GiB':>8} "
            f"{'load+run s':>10}"
        )
        nf4 = {r["model"]: r["tok_s"] for r in out if r["format"] == "nf4"}
        for r in out:
            print(
                f"{r['model']:12} {r['format']:6} {r['tok_s']:8.0f} {r['tok_s'] / nf4[r['model']]:7.2f} "
                f"{r['weights_gib']:11.1f} {r['peak_gib']:8.1f} {r['wall_s']:10.0f}"
            )
        return
    print(
        f"{'model':12} {'budget':>14} {'engine':>8} {'public':>8} {'ideal':>8} {'mix':>8} {'eng/ideal':>9} "
        f"{'eng/mix':>7} {'eng/pub':>7} {'peak GiB':>8} oom"
    )
    for r in out:
        print(
            f"{r['model']:12} {r['variant'].split()[-1] + ' ' + format(r['batch_tokens'], ','):>14} {r['tok_s']:8.0f} "
            f"{r['public']:8.0f} {r['ideal']:8.0f} {r['ideal_mix']:8.0f} {r['tok_s'] / r['ideal']:9.3f} "
            f"{r['tok_s'] / r['ideal_mix']:7.3f} {r['tok_s'] / r['public']:7.2f} {r['peak_gib']:8.1f} {r['oom']}"
        )


if __name__ == "__main__":
    main()
