"""The train stage's speed at real shapes: tokens/s and model-FLOP utilisation against a same-run baseline.

    python -m benchmarks.bench_train --work /tmp/bench-train                 # Qwen2.5-14B shapes, needs a CUDA GPU
    python -m benchmarks.bench_train --work /tmp/bench-train --shape qwen2-tiny --device cpu --minutes 0.3
    python -m benchmarks.bench_train --work /tmp/bt --only "$V" --bare "$V" --profile "$V"   # V: a variant's name

A random-weight model with the real shapes (``benchmarks.bench_infer.SHAPES``, saved with ``save_pretrained`` and
loaded through the stage's own path: nf4 weights on a GPU, QLoRA r16 on every linear layer), trained by the train
stage (``kaggle_utils.train.train``) on rows with the competition's length profile at max length 2,500. Each variant
runs for ``--minutes`` of steps; its figures are taken after the first step (warm-up):

* ``tokens/s``: real (unpadded) tokens per second through the whole step: forward, backward, optimiser;
* ``MFU``: model FLOPs per second over the GPU's matmul peak measured in the same run (bf16 on sm_80+, fp16 below,
  fp32 on the CPU). Model FLOPs per row of T tokens: ``4 * N_linear * T`` for a frozen 4-bit base (forward 2N,
  backward to the activations 2N, no weight gradients; LoRA's own FLOPs, under 1 %, are left out) plus causal
  attention ``6 * L * H * T^2`` (QK^T and AV, forward 2LHT^2 with the causal half, backward twice that; H = heads x
  head dim). Recomputation under gradient checkpointing is work the GPU does but not model FLOPs, so it lowers MFU;
* ``x baseline``: tokens/s over the first row of the table measured in the same run: the bare loop when ``--bare``
  names a variant (that variant's micro-batches in the stage's order, padded or packed, and its model setup: nf4,
  LoRA, dropout, recomputation, packing attention, fused kernels, fp32 residual; trained by a plain loop written
  here, no stage machinery; ``compile_layers`` is not applied there, and the rows are not A/B-swapped), else the
  one-row-per-step variant.

``--profile VARIANT`` then sets that variant's run up through the stage and records ``--profile-steps`` of its steps,
after two warm-up steps, with ``torch.profiler`` (:mod:`benchmarks.train_profile`): the top kernels by self CUDA time
with their share of the steps' wall time, the GPU's busy share, and the allocator's peak after the forward, the
backward and the optimiser step; the profiler's table goes to ``<work>/profile-<variant>.txt``. On a CPU it prints
that nothing was recorded.

A variant that runs out of memory or fails (a speed option that cannot run here) is reported as such and the next
one runs; each row is printed as it ends (``bench row:``), the table at the end. Ends with a ``train:`` line.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_infer import SHAPES, build
from benchmarks.gpu_clocks import GpuSampler
from benchmarks.train_profile import profile_stage
from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.models.fused import restore_torch_rope
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, train


@dataclass(frozen=True)
class Variant:
    """One way of batching the same rows: the train stage's memory and speed knobs."""

    name: str
    batch_tokens: int  # padded tokens per micro-batch (packed: the rows' own tokens)
    max_rows: int
    checkpointing: bool
    packing: bool = False
    lora_dropout: float = 0.05  # the recipes' default; 0 skips a dropout copy of every linear layer's input
    fused_kernels: bool = False  # liger-kernel's RMSNorm, gated activation and RoPE (kaggle_utils.models.fused)
    compile_layers: bool = False  # torch.compile of each decoder layer
    fp32_residual: bool = True  # embeddings and norms in fp32 (peft's upcast); False: in the compute dtype
    recompute_every: int = 1  # with checkpointing: one decoder layer in this many recomputed
    fused_lora: bool = False  # the LoRA update in the base GEMM's epilogue (kaggle_utils.models.fused_lora)


def variants(max_length: int) -> list[Variant]:
    """The baseline first (one row per step, as the public notebooks train), then larger batches, padded or packed,
    with and without recomputation."""
    return [
        Variant("one row/step, ckpt", max_length, 1, True),
        Variant("16K padded, ckpt", 16384, 16, True),
        Variant("16K packed, ckpt", 16384, 64, True, packing=True),
        Variant("16K packed, ckpt, drop 0", 16384, 64, True, packing=True, lora_dropout=0.0),
        Variant("16K padded, ckpt, drop 0", 16384, 16, True, lora_dropout=0.0),
        Variant("4K padded, no ckpt", 4096, 16, False),
        Variant("4K padded, no ckpt, drop 0", 4096, 16, False, lora_dropout=0.0),
        Variant("8K padded, no ckpt, drop 0", 8192, 16, False, lora_dropout=0.0),
        Variant("8K packed, no ckpt", 8192, 64, False, packing=True),
        # issue 22, part 2: the best measured so far with each speed option
        *(
            Variant(
                f"4K padded, no ckpt, drop 0, {name}",
                4096,
                16,
                False,
                lora_dropout=0.0,
                fused_kernels=f,
                compile_layers=c,
            )
            for name, f, c in (("fused", True, False), ("compiled", False, True), ("fused, compiled", True, True))
        ),
        # the memory the fused kernels free, spent on twice the tokens per micro-batch
        Variant("8K padded, no ckpt, drop 0, fused", 8192, 16, False, lora_dropout=0.0, fused_kernels=True),
        # issue 22, part 4: packed (no padding) with the fused kernels at ~8K to ~16K real tokens, with and
        # without the fp32 residual stream; rows average ~930 tokens here, so 32 rows never bind before the token budget
        *(
            _packed_fused(
                f"{k}K packed, no ckpt, drop 0, fused{'' if fp32 else ', bf16 residual'}", k, fp32_residual=fp32
            )
            for k, fp32 in ((8, False), (10, True), (10, False), (12, True), (12, False), (16, False))
        ),
        # selective recomputation: one layer in k recomputed, the memory of the others' activations bought back as
        # 16K real tokens a micro-batch
        *(
            _packed_fused(
                f"16K packed, ckpt 1/{k}, drop 0, fused, bf16 residual",
                16,
                checkpointing=True,
                fp32_residual=False,
                recompute_every=k,
            )  # fmt: skip
            for k in (2, 4)
        ),
        # the LoRA update inside the base GEMM (addmm) on the best packed variants
        *(
            _packed_fused(
                f"{k}K packed, no ckpt, drop 0, fused, bf16 residual, fused LoRA",
                k,
                fp32_residual=False,
                fused_lora=True,
            )  # fmt: skip
            for k in (8, 10)
        ),
    ]


def _packed_fused(name: str, k: int, checkpointing: bool = False, **options) -> Variant:
    """A packed variant of ``k`` K real tokens (at most 32 rows), dropout 0, fused kernels, and ``options``."""
    return Variant(name, k * 1024, 32, checkpointing, packing=True, lora_dropout=0.0, fused_kernels=True, **options)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of a square matmul of side ``n`` in ``dtype``: the peak the utilisation is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (kernel selection)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def model_flops(config: dict, tokens: float, tokens_sq: float) -> float:
    """Model FLOPs of one training pass over rows of ``tokens`` tokens in all, ``tokens_sq`` = the sum of each row's
    length squared (see the module docstring)."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    linear = layers * (d * q + 2 * d * kv + q * d + 3 * d * inter)  # q, k, v, o and the gated MLP
    return 4 * linear * tokens + 6 * layers * q * tokens_sq


def slug(v: Variant) -> str:
    """The variant's name as a folder or file name."""
    return v.name.replace(" ", "_").replace("/", "-").replace(",", "")


def stage_config(v: Variant, args, data: Path, model_dir: Path) -> TrainConfig:
    """The train stage's config for variant ``v``: its batching and speed options, ``--minutes`` of steps."""
    return TrainConfig.flat(
        model_path=model_dir,
        train_file=data,
        out_dir=args.work / "runs" / slug(v),
        device=args.device,
        max_length=args.max_length,
        batch_tokens=v.batch_tokens,
        max_rows=v.max_rows,
        gradient_checkpointing=v.checkpointing,
        packing=v.packing,
        lora_r=16,
        lora_dropout=v.lora_dropout,
        fused_kernels=v.fused_kernels,
        compile_layers=v.compile_layers,
        fp32_residual=v.fp32_residual,
        recompute_every=v.recompute_every,
        fused_lora=v.fused_lora,
        # compiling is done in the first steps, inside the budget: it gets its own minutes on top
        time_budget_minutes=args.minutes + (args.compile_minutes if v.compile_layers else 0.0),
        epochs=1.0,
        save_every=0,
        val_fold=-1,
        seed=0,
    )


def run_variant(v: Variant, args, data: Path, model_dir: Path, config: dict, peak: float) -> dict:
    """Train for ``args.minutes`` with this variant's settings; figures over the steps after the first."""
    cfg = stage_config(v, args, data, model_dir)
    shutil.rmtree(cfg.data.out_dir, ignore_errors=True)  # a run left by an earlier bench would be resumed, not timed
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if not v.fused_kernels:
        restore_torch_rope()  # a fused variant before this one routed RoPE to liger for the whole process
    try:
        hist = train(cfg).history.iloc[1:]
    except torch.OutOfMemoryError:
        return {"variant": v.name, "status": "out of memory"}
    except Exception as err:  # a speed option that fails here (liger missing, compile on 4-bit) is a result too
        return {"variant": v.name, "status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:150]}"}
    finally:
        if v.compile_layers:
            torch._dynamo.reset()  # the compiled layers' code and guards hold the model: free it for the next
    slow = hist["seconds"] > 3 * hist["seconds"].median()
    if slow.any():  # recompiles (a new shape) land in the timed steps; said, not hidden
        print(f"{v.name}: {int(slow.sum())} steps over 3x the median step, {hist['seconds'][slow].sum():.1f} s")
    if hist.empty:
        return {"variant": v.name, "status": "one step only: raise --minutes"}
    seconds = float(hist["seconds"].sum())
    flops = model_flops(config, float(hist["tokens"].sum()), float(hist["tokens_sq"].sum()))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    return {
        "variant": v.name,
        "status": "ok",
        "steps": len(hist),
        "tokens/s": float(hist["tokens"].sum()) / seconds,
        "MFU": flops / seconds / peak,
        "peak GiB": peak_gib,
    }


def bare_loop(v: Variant, args, data: Path, model_dir: Path, config: dict, peak: float) -> dict:
    """The variant's micro-batches trained by a plain loop written here (no stage machinery): forward under autocast,
    cross-entropy, backward, clip, AdamW. What the stage's variant ``v`` is held to.

    The same micro-batches in the same order as the stage's first epoch (its own schedule, ``epoch_batches``, on the
    same rows), the rows as written (the stage shows half of them A/B-swapped: the same lengths to a few tokens);
    the same model setup: nf4, LoRA r16 with the variant's dropout, recomputation, packing attention (rows packed
    end to end, logits at each row's last token), fused kernels and fp32 residual. Not applied: ``compile_layers``.
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, rows, labels, batches, pad_id = _bare_setup(v, args, data, model_dir)
    lengths = np.array([len(r) for r in rows])
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens, tokens_sq, seconds, steps = 0.0, 0.0, 0.0, 0
    for i, idx in enumerate(batches):
        t0 = time.perf_counter()
        logits = _bare_forward(model, [rows[j] for j in idx], pad_id, device, v.packing)
        torch.nn.functional.cross_entropy(logits.float(), labels[idx].to(device)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step is the warm-up, as for the stage
            seconds += time.perf_counter() - t0
            tokens, tokens_sq, steps = tokens + lengths[idx].sum(), tokens_sq + (lengths[idx] ** 2).sum(), steps + 1
        if seconds > args.minutes * 60:
            break
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stage's variants load their own copy next
    return {
        "variant": f"bare loop: {v.name}",
        "status": "ok",
        "steps": steps,
        "tokens/s": tokens / seconds,
        "MFU": model_flops(config, tokens, tokens_sq) / seconds / peak,
        "peak GiB": peak_gib,
    }


def _bare_setup(v: Variant, args, data: Path, model_dir: Path):
    """The bare loop's model (the stage's setup for ``v``), rows, labels and micro-batches (the stage's schedule)."""
    from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
    from kaggle_utils.models.fused import apply_fused_kernels
    from kaggle_utils.models.fused_lora import apply_fused_lora
    from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier, load_tokenizer
    from kaggle_utils.training.schedule import BatchSettings, epoch_batches

    tok = load_tokenizer(model_dir)
    df = pd.read_parquet(data)
    rows = PromptFormatter(tok, InputConfig(max_length=args.max_length)).encode(df)
    labels = torch.tensor((df["winner"] == "model_b").to_numpy(), dtype=torch.long)
    lengths = np.array([len(r) for r in rows])
    settings = BatchSettings(data, 0, 0.5, v.batch_tokens, v.max_rows, 1, v.packing)  # the stage's, seed 0
    batches = epoch_batches(settings, lengths, 0)[1]
    model = load_classifier(
        ModelConfig(model_path=model_dir, device=args.device), tok.pad_token_id,
        lora=LoraSettings(16, 32, v.lora_dropout), gradient_checkpointing=v.checkpointing, packing=v.packing,
        fp32_residual=v.fp32_residual, recompute_every=v.recompute_every,
    )  # fmt: skip
    if v.fused_kernels:
        apply_fused_kernels(model, torch.device(args.device))
    else:
        restore_torch_rope()  # a fused variant before this one routed RoPE to liger for the whole process
    if v.fused_lora:
        apply_fused_lora(model)
    return model, rows, labels, batches, tok.pad_token_id


def _bare_forward(model, rows: list, pad_id: int, device: torch.device, packing: bool) -> torch.Tensor:
    """Logits (rows, 2) of one micro-batch under autocast: packed into one sequence, or padded."""
    from kaggle_utils.inputs.batching import pad
    from kaggle_utils.models.loading import compute_dtype
    from kaggle_utils.models.packing import classifier_head, pack, packed_logits

    dtype = compute_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if packing:  # input_ids, position_ids: (1, T); the rows' bounds stay on the CPU
            enc, ends = pack(rows)
            enc = {k: t.to(device) if k in ("input_ids", "position_ids") else t for k, t in enc.items()}
            return packed_logits(model, classifier_head(model), enc, ends)
        enc = {k: t.to(device) for k, t in pad(rows, pad_id).items()}  # (B, T), T = the longest row
        return model(**enc).logits


def prepare_rows(args) -> Path:
    """Demo rows at the competition's length profile (``length_scale`` 1), folded by the prepare stage."""
    generate_demo_data(
        DemoDataConfig(out_dir=args.work / "data", n_train=args.rows, n_test=8, n_unlabeled=8, length_scale=1.0)
    )
    prepare(PrepareConfig(data_dir=args.work / "data", out_dir=args.work / "prepared"))
    return args.work / "prepared/train.parquet"


def print_table(rows: list[dict], base: float) -> None:
    print(f"\n{'variant':<62}{'steps':>6}{'tokens/s':>10}{'MFU':>7}{'x base':>8}{'peak GiB':>10}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']:<62}  {r['status']}")
            continue
        ratio, speed = r["tokens/s"] / base, r["tokens/s"]
        print(f"{r['variant']:<62}{r['steps']:>6}{speed:>10,.0f}{r['MFU']:>7.3f}{ratio:>8.2f}{r['peak GiB']:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("build/bench-train"))
    ap.add_argument("--shape", default="qwen2.5-14b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--rows", type=int, default=1200, help="training rows drawn (enough for every variant's minutes)")
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--minutes", type=float, default=2.0, help="training time per variant")
    ap.add_argument("--compile-minutes", type=float, default=1.0, help="added to --minutes for compiled variants")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--bare", default="", help="a variant name: also train it by a bare loop, the ratio's reference")
    ap.add_argument(
        "--bare-again", action="store_true",
        help="run the bare loop once more after the stage's variants: a run's place in the process, bracketed",
    )  # fmt: skip
    ap.add_argument("--profile", default="", help="a variant name: after the table, profile its steps (CUDA only)")
    ap.add_argument(
        "--warmup-minutes", type=float, default=0.5,
        help="train the first run's variant this long, untimed, before any timed run (cuBLAS, Triton, allocator)",
    )  # fmt: skip
    ap.add_argument("--profile-steps", type=int, default=2, help="steps recorded by --profile, after 2 warm-up steps")
    args = ap.parse_args()
    device = torch.device(args.device)
    model_dir = args.work / args.shape
    build(args.shape, model_dir, device.type)
    config = json.loads((model_dir / "config.json").read_text())
    data = prepare_rows(args)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        dtype = torch.float16
    peak = matmul_peak(device, dtype, n=8192 if device.type == "cuda" else 1024)
    print(
        f"{args.shape} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"{dtype} matmul peak {peak / 1e12:.1f} TFLOP/s"
    )
    named = {v.name: v for v in variants(args.max_length)}
    unknown = [n for n in [*(args.only or []), args.bare, args.profile] if n and n not in named]
    if unknown:  # checked before the model is built: a typo costs seconds, not a GPU run
        raise SystemExit(f"unknown variant(s) {unknown}; the variants: {list(named)}")
    chosen = [v for v in named.values() if not args.only or v.name in args.only]
    bare = named.get(args.bare)
    runs = ([(bare_loop, bare)] if bare is not None else []) + [(run_variant, v) for v in chosen]
    if bare is not None and args.bare_again:
        runs.append((bare_loop, bare))
    if args.warmup_minutes > 0:  # else the first timed run alone pays the process's first steps
        warm = runs[0][1]
        print(f"warm-up: the stage's {warm.name!r} for {args.warmup_minutes} min, untimed", flush=True)
        run_variant(
            warm, argparse.Namespace(**{**vars(args), "minutes": args.warmup_minutes}), data, model_dir, config, peak
        )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for run, v in runs:
        with GpuSampler(device.index or 0, enabled=device.type == "cuda") as gpu:
            rows.append(run(v, args, data, model_dir, config, peak))
        rows[-1].update(gpu.summary())  # the card's clocks over the run: a slowdown that is the card's shows here
        print(f"bench row: {json.dumps(rows[-1])}", flush=True)  # each row as it ends: a cut-off run keeps its rows
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r["tokens/s"] for r in rows if r["status"] == "ok"), float("nan"))
    print_table(rows, base)
    best = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["MFU"], default=None)
    if best:
        print(
            f"train: best {best['variant']!r} {best['tokens/s']:,.0f} tokens/s, MFU {best['MFU']:.3f}, "
            f"{best['tokens/s'] / base:.2f}x {rows[0]['variant']!r}"
        )
    if args.profile:
        profile_variant(named[args.profile], args, data, model_dir)


def profile_variant(v: Variant, args, data: Path, model_dir: Path) -> None:
    """``--profile``: the variant's stage steps under ``torch.profiler`` (:mod:`benchmarks.train_profile`)."""
    if not v.fused_kernels:
        restore_torch_rope()
    print(f"\nprofile of {v.name!r}:")
    cfg = stage_config(v, args, data, model_dir).replace(out_dir=args.work / "runs" / f"profile-{slug(v)}")
    shutil.rmtree(cfg.data.out_dir, ignore_errors=True)
    try:
        profile_stage(cfg, args.work / f"profile-{slug(v)}.txt", steps=args.profile_steps)
    except torch.OutOfMemoryError:
        print("profile: out of memory")


if __name__ == "__main__":
    main()
