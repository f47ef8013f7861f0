"""Data-parallel scaling of the train stage: tokens/s on N GPUs through ``accelerate launch`` against 1 GPU.

    python -m benchmarks.bench_train --work /tmp/bt --only "one row/step, ckpt"   # builds the model and rows
    python -m benchmarks.bench_ddp --work /tmp/bt --gpus 2 --minutes 1.5

Runs ``python -m kaggle_utils.train`` on one GPU, then ``accelerate launch --config_file
kaggle_utils/recipes/accelerate/ddp.yaml --num_processes N -m kaggle_utils.train`` with the same settings, on the
model and rows ``benchmarks.bench_train`` left in ``--work`` (Qwen2.5-14B shapes, random weights, nf4 + LoRA r16,
the competition's length profile). Each process trains ``grad_accum`` micro-batches a step, so a step on N GPUs
holds N times the rows. Figures over the steps after the first (``history.csv``: every process's tokens, rank 0's
step time):

* ``tokens/s``: real tokens per second of the whole launch;
* ``efficiency``: tokens/s on N GPUs over N x tokens/s on 1 GPU (1.0: perfect scaling).

Ends with a ``ddp:`` line. NCCL's NVLink multicast is kept off (``NCCL_NVLS_ENABLE=0``) for every process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from kaggle_utils.config.cli import config_to_argv

DDP_YAML = Path(__file__).resolve().parents[1] / "kaggle_utils/recipes/accelerate/ddp.yaml"


def train_args(args, out_dir: Path) -> list[str]:
    """The train stage's flags, the same for every launch."""
    return config_to_argv(
        {
            "model_path": args.work / args.shape,
            "train_file": args.work / "prepared/train.parquet",
            "out_dir": out_dir,
            "max_length": args.max_length,
            "batch_tokens": args.batch_tokens,
            "max_rows": args.max_rows,
            "packing": args.packing,
            "gradient_checkpointing": args.checkpointing,
            "lora_r": 16,
            "time_budget_minutes": args.minutes,
            "save_every": 0,
            "val_fold": -1,
            "seed": 0,
        }
    )


def stage_command(module: str, argv: list[str], gpus: int, config: Path | None = None) -> tuple[list[str], dict]:
    """The command and environment that run stage ``module`` on GPU 0 (plain python), or on GPUs 0..gpus-1
    through ``accelerate launch`` (with ``config``, else accelerate's multi-GPU defaults); multicast off."""
    stage = ["-m", module, *argv]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TQDM_DISABLE": "1"}
    if gpus == 1:
        return [sys.executable, *stage], {**env, "CUDA_VISIBLE_DEVICES": "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    cmd += (
        ["--config_file", str(config)]
        if config
        else ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    )
    return [*cmd, "--gpu_ids", ",".join(map(str, range(gpus))), *stage], env


def launch(args, gpus: int) -> dict:
    """Train on ``gpus`` GPUs; the launch's tokens/s over the steps after the first."""
    out_dir = args.work / f"ddp-{gpus}"
    cmd, env = stage_command("kaggle_utils.train", train_args(args, out_dir), gpus, DDP_YAML)
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    hist = pd.read_csv(out_dir / "history.csv").iloc[1:]
    if hist.empty:
        raise SystemExit(f"{out_dir}: one step only in {args.minutes} minutes; raise --minutes")
    return {"gpus": gpus, "steps": len(hist), "tokens/s": hist["tokens"].sum() / hist["seconds"].sum()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("build/bench-train"), help="bench_train's --work")
    ap.add_argument("--shape", default="qwen2.5-14b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=1.5, help="training time per launch")
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    one, many = launch(args, 1), launch(args, args.gpus)
    efficiency = many["tokens/s"] / (args.gpus * one["tokens/s"])
    print(f"\n{'GPUs':>5}{'steps':>7}{'tokens/s':>10}")
    for r in (one, many):
        print(f"{r['gpus']:>5}{r['steps']:>7}{r['tokens/s']:>10,.0f}")
    print(f"ddp: {args.gpus} GPUs {many['tokens/s']:,.0f} tokens/s, efficiency {efficiency:.2f} against 1 GPU")


if __name__ == "__main__":
    main()
