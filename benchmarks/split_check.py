"""Placement on two GPUs: a dense fp16 Gemma2-9B (17 GiB of weights) under a 15 GiB cap per GPU is split across
both; the same model in nf4 gets one copy per GPU. Both through the infer stage, 2,500 tokens, measured budgets.

    python benchmarks/split_check.py --work /tmp/split --rows 200     # a machine with two CUDA GPUs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.bench_infer import build
from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.infer import InferConfig, infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/split"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--cap-gib", type=float, default=15.0)
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs two CUDA GPUs")
        return
    data = generate_demo_data(
        DemoDataConfig(out_dir=args.work / "data", n_train=8, n_test=args.rows, n_unlabeled=8, length_scale=1.0)
    )
    model = args.work / "gemma2-9b"
    build("gemma2-9b", model)
    for i in range(2):
        total = torch.cuda.get_device_properties(i).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(args.cap_gib / total, i)
    for name, four_bit in (("dense-fp16", False), ("nf4", True)):
        cfg = InferConfig.flat(
            test_file=data["test"], primary_model=model, out_dir=args.work / name, load_in_4bit=four_bit,
            dtype="fp16", devices="cuda:0,cuda:1", batch_tokens=0, max_batch_tokens=16384, max_length=2500,
            tta_fraction=0.0, fail_soft=True,
        )  # fmt: skip
        for i in range(2):
            torch.cuda.reset_peak_memory_stats(i)
        t0 = time.time()
        infer(cfg)
        report = json.loads((cfg.data.out_dir / "report.json").read_text())
        peaks = [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(2)]
        keys = ("placement", "token_budget", "sources", "primary", "errors")
        print(json.dumps({"run": name, "wall_s": round(time.time() - t0, 1), "peak_gib": peaks} | {
            k: report.get(k) for k in keys
        }, default=str), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
