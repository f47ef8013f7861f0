"""Sharded QLoRA training (FSDP2) of a 70B-shaped classifier: per-GPU peak memory and seconds per step.

    accelerate launch --config_file kaggle_utils/recipes/accelerate/fsdp.yaml --num_processes 2 \\
        -m benchmarks.fsdp_step --work /tmp/fsdp --layers 2 4              # Llama-3.3-70B shapes, 2 GPUs
    accelerate launch --config_file kaggle_utils/recipes/accelerate/fsdp.yaml --num_processes 2 \\
        -m benchmarks.fsdp_step --work /tmp/fsdp-cpu --shape tiny --device cpu   # the code path, on the CPU

Llama-3.3-70B's layer shapes (``benchmarks.bench_infer.SHAPES``: hidden 8192, MLP 28,672, 64 heads, 8 KV heads) at a
few depths (``--layers``), random weights saved in bf16 by rank 0 (the other ranks wait for its marker file), trained
by the train stage itself (``kaggle_utils.train.train``) under the launch's FSDP config: nf4 base, QLoRA r16 on every
linear layer, gradient checkpointing, rows of the competition's length profile cut at ``--max-length`` 2,500, the
longest rows first, then one evaluation of fold 0 (the sharded evaluation, every rank in lockstep). Per depth it
prints, per GPU, the peak allocated while loading and sharding the model (every rank holds the whole nf4 model before
it is sharded, rank 0 reading it from the files and sending it to the others: see fsdp.yaml) and the peak while
training and evaluating, the seconds per step after the first, and the evaluation's seconds. The last lines are a
linear fit of both peaks over the depths, evaluated at the full 80 layers: a **projection**, not a measurement.

The demo tokenizer's ids reach 151,645, past Llama's 128,256 rows: the embedding is built with 151,936 rows, and the
fp32 copy peft's kbit preparation makes of it adds (151,936 - 128,256) x 8,192 x 4 bytes over all GPUs; the projection
subtracts that share.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import kaggle_utils.train as train_module
from benchmarks.bench_infer import build
from benchmarks.bench_train import prepare_rows
from kaggle_utils.scoring.shards import Shard
from kaggle_utils.train import TrainConfig

SHAPES = {"llama3.3-70b": "llama3.3-70b", "tiny": "llama-tiny"}  # --shape: the name in bench_infer.SHAPES
VOCAB = 151_936  # rows of the embedding: the demo tokenizer's ids (up to 151,645) must index it
FULL_LAYERS = 80


def wait_for(marker: Path, shard: Shard, minutes: float = 10.0) -> None:
    """Rank 0 writes the inputs; the others wait for its marker file (no process group exists yet)."""
    deadline = time.monotonic() + minutes * 60
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {shard.rank}: {marker} did not appear in {minutes} min; see rank 0's output")
        time.sleep(2)


def inputs(args, shard: Shard) -> tuple[Path, dict[int, Path]]:
    """The training rows and one model folder per depth, written by rank 0."""
    marker = args.work / f"inputs-{'-'.join(map(str, args.layers))}.done"
    folders = {n: args.work / f"{args.shape}-{n}-layers" for n in args.layers}
    if shard.is_main and not marker.is_file():
        t0 = time.monotonic()
        prepare_rows(argparse.Namespace(work=args.work, rows=args.rows))
        for n, folder in folders.items():
            device = "cuda:0" if args.device == "cuda" else "cpu"
            build(SHAPES[args.shape], folder, device, num_hidden_layers=n, vocab_size=VOCAB)
        marker.write_text("done\n")
        print(f"rows and {len(folders)} model(s) written in {time.monotonic() - t0:.0f} s", flush=True)
    wait_for(marker, shard)
    return args.work / "prepared/train.parquet", folders


class PeakAfterSetup:
    """``train.setup`` wrapped: the peak of loading and sharding is read when it returns, then the counter reset,
    so the peak read after ``train`` is the training loop's."""

    def __init__(self) -> None:
        self.setup, self.load_peak = train_module.setup, float("nan")

    def __call__(self, cfg: TrainConfig):
        run = self.setup(cfg)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
            self.load_peak = torch.cuda.max_memory_allocated(run.device) / 2**30
            torch.cuda.reset_peak_memory_stats(run.device)
        return run


def one_depth(args, data: Path, folder: Path, layers: int) -> dict:
    """Train one depth for ``args.steps`` steps, then evaluate fold 0 (the sharded evaluation, in lockstep);
    this rank's peaks (GiB), the steps' seconds and the evaluation's."""
    n_rows = int((pd.read_parquet(data, columns=["fold"])["fold"] != 0).sum())
    shard = Shard.from_env()
    gpu = torch.device(f"cuda:{shard.local_rank}") if args.device == "cuda" else None
    cfg = TrainConfig.flat(
        model_path=folder,
        train_file=data,
        out_dir=args.work / f"run-{layers}-layers",
        device="cpu" if args.device == "cpu" else "auto",
        load_in_4bit=args.device != "cpu",  # bitsandbytes 4-bit under FSDP is for GPUs
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        max_rows=max(1, args.batch_tokens // args.max_length),
        gradient_checkpointing=True,
        lora_r=16,
        # one epoch holds len(rows) micro-batches of one row: this share of it is --steps steps, the longest rows first
        epochs=args.steps * shard.world / n_rows,
        save_every=0,
        val_fold=0,  # evaluated once, after the last step
        seed=0,
    )
    if gpu is not None:
        torch.cuda.set_device(gpu)  # initialises CUDA on a rank that has not touched it yet (reset_peak needs it)
    before = torch.cuda.memory_allocated(gpu) / 2**30 if gpu is not None else float("nan")  # an earlier depth's left
    if gpu is not None:
        torch.cuda.reset_peak_memory_stats(gpu)  # rank 0's build is not the run's
    peaks = PeakAfterSetup()
    train_module.setup = peaks
    try:
        train_module.train(cfg)
    finally:
        train_module.setup = peaks.setup
    train_peak = torch.cuda.max_memory_allocated(gpu) / 2**30 if gpu is not None else float("nan")
    history = pd.read_csv(cfg.data.out_dir / "history.csv")  # rank 0 wrote it before the run's last barrier
    evaluation = json.loads((cfg.data.out_dir / "metrics.json").read_text())["val"]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "layers": layers,
        "before": before,
        "load_peak": peaks.load_peak,
        "train_peak": train_peak,
        "eval_rows": evaluation["rows"],
        "eval_seconds": evaluation["seconds"],
        "history": history,
    }


def projection(depths: list[int], values: list[float]) -> float:
    """The linear fit of ``values`` over ``depths``, at the full depth (a projection)."""
    slope, intercept = np.polyfit(depths, values, 1)
    return float(intercept + slope * FULL_LAYERS)


def report(results: list[list[dict]], args) -> None:
    """Rank 0: the per-GPU table, then the projection to 80 layers."""
    world = len(results)
    extra = (VOCAB - 128_256) * 8192 * 4 / world / 2**30 if args.shape == "llama3.3-70b" else 0.0
    head = f"{'layers':>6}{'rank':>6}{'before GiB':>11}{'load peak GiB':>15}{'train peak GiB':>16}{'s/step':>9}"
    print(f"\n{head}{'tokens/step':>13}")
    for i, layers in enumerate(args.layers):
        hist = results[0][i]["history"]
        after = hist.iloc[1:] if len(hist) > 1 else hist
        for rank in range(world):
            r = results[rank][i]
            print(
                f"{layers:>6}{rank:>6}{r['before']:>11.2f}{r['load_peak']:>15.2f}{r['train_peak']:>16.2f}"
                f"{after['seconds'].mean():>9.2f}{after['tokens'].mean():>13,.0f}"
            )
    if len(args.layers) < 2:
        print("one depth only: no projection (pass two or more --layers)")
        return
    for key in ("load_peak", "train_peak"):
        worst = [max(results[rank][i][key] for rank in range(world)) for i in range(len(args.layers))]
        at_full = projection(args.layers, worst) - extra
        print(
            f"PROJECTION (linear fit over {args.layers} layers, not a measurement): {key.replace('_', ' ')} at "
            f"{FULL_LAYERS} layers ≈ {at_full:.1f} GiB per GPU on {world} GPU(s) (less {extra:.2f} GiB of the "
            "oversized embedding)"
        )
    for r in results[0]:
        print(f"{r['layers']} layers: evaluation of {r['eval_rows']} rows x 2 orientations in {r['eval_seconds']} s")
    secs = [float(results[0][i]["history"]["seconds"].iloc[1:].mean()) for i in range(len(args.layers))]
    print(f"PROJECTION: seconds per step at {FULL_LAYERS} layers ≈ {projection(args.layers, secs):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fsdp"))
    ap.add_argument("--shape", default="llama3.3-70b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="depths built and trained")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per depth (the first is not timed)")
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--batch-tokens", type=int, default=2500, help="padded tokens per micro-batch and GPU")
    ap.add_argument("--rows", type=int, default=400, help="rows drawn; the longest are trained first")
    args = ap.parse_args()
    shard = Shard.from_env()
    if shard.world < 2:
        raise SystemExit("launch with accelerate launch --config_file kaggle_utils/recipes/accelerate/fsdp.yaml ...")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; pass --shape tiny --device cpu to check the code path")
    args.work.mkdir(parents=True, exist_ok=True)
    data, folders = inputs(args, shard)
    mine = [one_depth(args, data, folders[n], n) for n in args.layers]
    results: list = [None] * shard.world
    torch.distributed.all_gather_object(results, mine)  # train's launch set up the process group
    if shard.is_main:
        report(results, args)
        summary = [{k: v for k, v in r.items() if k != "history"} for r in results[0]]
        print("fsdp_step:", json.dumps(summary))


if __name__ == "__main__":
    main()
