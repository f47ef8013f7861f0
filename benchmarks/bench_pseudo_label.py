"""Teacher scoring on N GPUs against 1: rows/s of the pseudo-label stage through ``accelerate launch``.

    python -m benchmarks.bench_pseudo_label --work /tmp/bpl --gpus 2 --rows 800

A random-weight classifier with real shapes (``benchmarks.bench_infer.SHAPES``, default Qwen2.5-14B, nf4 as the
stage loads it, no adapter) scores ``--rows`` demo rows at the competition's length profile, both A/B orders
(``tta``), in parts of ``--chunk-rows``: first ``python -m kaggle_utils.pseudo_label`` on GPU 0, then ``accelerate
launch --num_processes N -m kaggle_utils.pseudo_label`` on GPUs 0..N-1 into a fresh output (rank r scores parts
r, r+N, ...; rank 0 assembles). Each launch is timed from start to its output file, model loading included, so the
ratio understates the scoring speed-up by the load's share; the two outputs' logits are compared.

Ends with a ``pseudo-label:`` line. NCCL's NVLink multicast is kept off (``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_ddp import stage_command
from benchmarks.bench_infer import SHAPES, build
from kaggle_utils.config.cli import config_to_argv
from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data


def stage_args(args, out_file: Path) -> list[str]:
    """The pseudo-label stage's flags, the same for every launch."""
    return config_to_argv(
        {
            "model_path": args.work / args.shape,
            "adapter_dir": None,
            "input_file": args.work / "data/unlabeled.parquet",
            "out_file": out_file,
            "max_length": args.max_length,
            "batch_tokens": args.batch_tokens,
            "chunk_rows": args.chunk_rows,
            "tta": True,
        }
    )


def launch(args, gpus: int) -> tuple[float, pd.DataFrame]:
    """Seconds from start to the assembled output on ``gpus`` GPUs, and the output."""
    out_file = args.work / f"pseudo-{gpus}gpu-{int(time.time())}.parquet"  # new parts: nothing is resumed
    cmd, env = stage_command("kaggle_utils.pseudo_label", stage_args(args, out_file), gpus)
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0, pd.read_parquet(out_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("build/bench-pseudo-label"))
    ap.add_argument("--shape", default="qwen2.5-14b", choices=sorted(SHAPES))
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--chunk-rows", type=int, default=100, help="rows per part: parts are shared among the GPUs")
    ap.add_argument("--max-length", type=int, default=2500)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    args = ap.parse_args()
    build(args.shape, args.work / args.shape, "cuda" if torch.cuda.is_available() else "cpu")
    generate_demo_data(
        DemoDataConfig(out_dir=args.work / "data", n_train=8, n_test=8, n_unlabeled=args.rows, length_scale=1.0)
    )
    (one_s, one), (many_s, many) = launch(args, 1), launch(args, args.gpus)
    pair = one.set_index("id")[["logit_a", "logit_b"]].join(many.set_index("id")[["logit_a", "logit_b"]], rsuffix="_n")
    gap = float(np.abs(pair[["logit_a", "logit_b"]].to_numpy() - pair[["logit_a_n", "logit_b_n"]].to_numpy()).max())
    print(f"\n{'GPUs':>5}{'rows':>7}{'seconds':>9}{'rows/s':>8}")
    for gpus, seconds, out in ((1, one_s, one), (args.gpus, many_s, many)):
        print(f"{gpus:>5}{len(out):>7}{seconds:>9.1f}{len(out) / seconds:>8.2f}")
    print(
        f"pseudo-label: {args.gpus} GPUs {len(many) / many_s:.2f} rows/s vs 1 GPU {len(one) / one_s:.2f} "
        f"({one_s / many_s:.2f}x, loading included); max |logit difference| {gap:.2e}"
    )


if __name__ == "__main__":
    main()
