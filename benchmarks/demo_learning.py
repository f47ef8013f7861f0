"""Do both tiny demo students learn? Validation accuracy of demo-student-qwen2 and demo-student-gemma2 over seeds and
held-out folds, on the CPU.

Each run is the student's demo recipe with ``seed``, ``val_fold`` and ``out_dir`` overridden (and ``epochs`` when
given), on tiny models freshly built by ``kaggle_utils.models.demo`` (so the builder under test is the one measured).
Rows: ``--work``'s ``prepared/train.parquet`` and ``pseudo.parquet`` when ``make demo`` left them (the recipes as
the demo runs them), else freshly generated demo data with no pseudo-labels (``extra_files = []``: labels only).

Chance is 0.5; with ~240 held-out rows its standard error is 0.032, so 0.60 is ~3 SE above it. The labels carry 10%
noise: ~0.90 is the ceiling.

``python benchmarks/demo_learning.py [--seeds 0 1 2] [--folds 0 1 2] [--epochs 2] [--models qwen2 gemma2]
[--lora-dropouts 0.05 0]`` (each dropout a run of its own on the same seeds and folds, side by side in the table)
(about 1 min a run on 2 idle cores at 2 epochs; prints a table on stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from kaggle_utils.config import recipes
from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, train

RECIPES = {"qwen2": ("demo-student-qwen2", "qwen2-tiny"), "gemma2": ("demo-student-gemma2", "gemma2-tiny")}
ABOVE_CHANCE = 0.60


def rows(work: Path, tmp: Path) -> tuple[Path, list[str]]:
    """The prepared training file and the extra files the runs use."""
    prepared, pseudo = work / "prepared" / "train.parquet", work / "pseudo.parquet"
    if prepared.is_file():
        return prepared, [str(pseudo)] if pseudo.is_file() else []
    files = generate_demo_data(DemoDataConfig(out_dir=tmp / "data"))
    prepare(PrepareConfig(data_dir=files["train"].parent, out_dir=tmp / "prepared"))
    return tmp / "prepared" / "train.parquet", []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=0.0, help="0: the recipe's")
    parser.add_argument("--lora-dropouts", nargs="+", type=float, default=[], help="LoRA dropouts to compare")
    parser.add_argument("--work", type=Path, default=Path("demo/work"), help="make demo's work folder, if any")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared 2-core machine (tests/conftest.py)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with contextlib.redirect_stdout(io.StringIO()):
            models = build_demo_models(DemoModelsConfig(out_dir=tmp / "models"))
        train_file, extras = rows(args.work, tmp)
        print(f"# {date.today()} · {platform.node()} · torch {torch.__version__} · rows {train_file} · extras {extras}")
        print("model\tdropout\tseed\tfold\taccuracy\tlog_loss\tloss first→last 20%\tseconds")
        dropouts = args.lora_dropouts or [None]
        results: dict[tuple[str, float | None], list[float]] = {(m, d): [] for m in args.models for d in dropouts}
        for (model, dropout), accs in results.items():
            recipe, folder = RECIPES[model]
            for seed in args.seeds:
                for fold in args.folds:
                    name = f"{model}-{dropout}-{seed}-{fold}"
                    overrides = {
                        "model_path": str(models[folder]), "train_file": str(train_file), "extra_files": extras,
                        "out_dir": str(tmp / "runs" / name), "seed": seed, "val_fold": fold, "save_every": 0,
                    }  # fmt: skip
                    if args.epochs:
                        overrides["epochs"] = args.epochs
                    if dropout is not None:
                        overrides["lora_dropout"] = dropout
                    cfg = recipes.load(recipe, TrainConfig, overrides)
                    t0 = time.monotonic()
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        result = train(cfg)
                    loss = result.history["loss"]
                    k = max(1, len(loss) // 5)
                    val = result.metrics["val"]
                    accs.append(val["accuracy"])
                    print(
                        f"{model}\t{cfg.lora.lora_dropout}\t{seed}\t{fold}\t{val['accuracy']:.3f}\t"
                        f"{val['log_loss']:.3f}\t{loss.iloc[:k].mean():.3f}→{loss.iloc[-k:].mean():.3f}\t"
                        f"{time.monotonic() - t0:.0f}",
                        flush=True,
                    )
        for (model, dropout), accs in results.items():
            above = sum(a > ABOVE_CHANCE for a in accs)
            label = model if dropout is None else f"{model}, lora_dropout {dropout}"
            print(
                f"# {label}: accuracy mean {sum(accs) / len(accs):.3f}, min {min(accs):.3f}, max {max(accs):.3f}; "
                f"{above}/{len(accs)} runs above {ABOVE_CHANCE}"
            )


if __name__ == "__main__":
    main()
