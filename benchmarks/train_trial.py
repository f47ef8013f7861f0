"""The T4 trial of notebook 03 rehearsed on one GPU: does the train stage end inside its time budget?

    python benchmarks/train_trial.py --work /tmp/trial --budget-minutes 4       # a CUDA GPU with >= 40 GB
    python benchmarks/train_trial.py --work /tmp/trial --tiny --budget-minutes 0.5   # the same path on a CPU

Builds a random-weight Gemma2-9B sequence classifier at its real shapes (saved with ``save_pretrained``, loaded by
the stage as real weights are), demo rows with the competition's length profile, then runs the train stage with
the ``student-gemma2-9b-2xt4-trial`` recipe as notebook 03 runs it on Kaggle, rehearsing a T4: fp16 forced and the
process capped at ``--cap-gib`` (15 GiB) by ``torch.cuda.set_per_process_memory_fraction``. Prints the budget's
parts: the evaluation's price before step 1 against its measured time, the steps, the whole run against the
budget, peak memory and tokens/s; and the trial's hours on two T4s, projected from the FLOPs of its rows at a T4's
sustained fp16 rate (a projection, not a measurement). ``--tiny`` swaps in the demo's tiny Gemma2 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_infer import build
from kaggle_utils.config import recipes
from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, train

GEMMA2_9B_PARAMS = 9.24e9
T4_SUSTAINED_FLOPS = 24e12  # fp16 tensor cores, sustained on transformer layers (docs/facts.md)


def model_dir(work: Path, tiny: bool) -> Path:
    if tiny:
        return build_demo_models(DemoModelsConfig(out_dir=work / "models"))["gemma2-tiny"]
    path = work / "gemma2-9b"
    build("gemma2-9b", path)
    return path


def trial_config(args: argparse.Namespace, model_path: Path, train_file: Path) -> TrainConfig:
    """The Kaggle trial recipe with this machine's paths; fp16 forced as on a T4."""
    overrides = {
        "model_path": str(model_path),
        "train_file": str(train_file),
        "out_dir": str(args.work / "student"),
        "time_budget_minutes": args.budget_minutes,
        "dtype": "fp16" if not args.tiny else "fp32",
        "device": "cuda:0" if not args.tiny else "cpu",
    }
    if args.tiny:
        overrides |= {"load_in_4bit": False, "max_length": 256, "batch_tokens": 256, "gradient_checkpointing": False}
    return recipes.load("student-gemma2-9b-2xt4-trial", TrainConfig, overrides)


def projection(history, total_steps: int, params: float) -> dict:
    """The whole trial's training hours on two T4s (data-parallel), from the tokens of its steps (the mean step's
    tokens x its total steps): QLoRA with checkpointing is ~6 x params FLOPs a token (forward, recomputed forward,
    backward to the inputs; the frozen base gets no weight gradient), at a T4's sustained rate. Evaluations and
    loading are not in it."""
    tokens = float(history["tokens"].mean()) * total_steps
    seconds_one_t4 = tokens * 6 * params / T4_SUSTAINED_FLOPS
    return {"trial_tokens (projected)": tokens, "trial_hours_on_two_t4 (projected)": seconds_one_t4 / 2 / 3600}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/trial"))
    ap.add_argument("--budget-minutes", type=float, default=4.0)
    ap.add_argument("--cap-gib", type=float, default=15.0)
    ap.add_argument("--rows", type=int, default=3000, help="demo training rows (a fifth are the held-out fold)")
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny Gemma2 on the CPU: the path, not the speed")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    t0 = time.time()
    path = model_dir(args.work, args.tiny)
    built = time.time() - t0
    generate_demo_data(DemoDataConfig(out_dir=args.work / "data", n_train=args.rows, n_test=8, n_unlabeled=8,
                                      length_scale=0.12 if args.tiny else 1.0))  # fmt: skip
    prepare(PrepareConfig(data_dir=args.work / "data", out_dir=args.work / "prepared"))
    if not args.tiny:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, 0)
        torch.cuda.reset_peak_memory_stats()
    cfg = trial_config(args, path, args.work / "prepared/train.parquet")
    t0 = time.time()
    result = train(cfg)
    wall = time.time() - t0
    hist, m = result.history, result.metrics
    steady = hist.iloc[1:] if len(hist) > 1 else hist
    figures = {
        "budget_s": args.budget_minutes * 60,
        "run_s (train stage after loading)": m["seconds"],
        "run / budget": m["seconds"] / (args.budget_minutes * 60),
        "wall_s (with loading)": round(wall, 1),
        "steps": m["steps"],
        "total_steps": m["total_steps"],
        "stopped_by_budget": m["stopped_by_budget"],
        "val_rows": m["val_rows"],
        "eval_priced_s": m.get("eval_priced_seconds"),
        "evals_s": result.evals["seconds"].tolist() if len(result.evals) else [],
        "step_s (mean after the first)": float(steady["seconds"].mean()),
        "tokens_per_s (after the first step)": float(steady["tokens"].sum() / steady["seconds"].sum()),
        "batch_tokens": cfg.optim.batch_tokens,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not args.tiny else float("nan"),
        "model_build_s": round(built, 1),
    } | projection(hist, m["total_steps"], GEMMA2_9B_PARAMS)
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) and np.isfinite(value) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
