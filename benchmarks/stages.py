"""Run every stage once, end to end, on whatever device is found (GPU if any), and print a table.

    python benchmarks/stages.py --work /tmp/stages            # CPU here, CUDA on a GPU machine

Builds the demo data and tiny models, then prepare → teacher → pseudo-labels → two students →
budgeted cascade inference, all through the shell-facing stage functions with the device left on "auto".
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.infer import InferConfig, infer
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.models.loading import pick_device
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.pseudo_label import PseudoLabelConfig, pseudo_label
from kaggle_utils.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/stages"))
    ap.add_argument("--max-length", type=int, default=384)
    args = ap.parse_args()
    w, L = args.work, args.max_length
    rows: list[tuple[str, float, str]] = []

    def timed(name, fn, note=lambda r: ""):
        t0 = time.time()
        result = fn()
        rows.append((name, time.time() - t0, note(result)))
        return result

    dev = pick_device()
    print(
        f"device: {dev} ({torch.cuda.get_device_name(0) if dev.type == 'cuda' else platform.processor()}), "
        f"torch {torch.__version__}"
    )
    files = timed("demo data", lambda: generate_demo_data(DemoDataConfig(out_dir=w / "data")))
    models = timed("demo models", lambda: build_demo_models(DemoModelsConfig(out_dir=w / "models")))
    timed(
        "prepare",
        lambda: prepare(PrepareConfig(data_dir=w / "data", out_dir=w / "prepared")),
        lambda f: f"{len(f['train'])} train rows",
    )
    common = dict(max_length=L, batch_tokens=4096, lr=2e-3, epochs=3.0, save_every=0)
    teacher = timed(
        "train teacher (qwen2, nf4)",
        lambda: train(
            TrainConfig.flat(
                model_path=models["qwen2-tiny"],
                train_file=w / "prepared/train.parquet",
                out_dir=w / "teacher",
                **common,
            )
        ),
        lambda r: f"val acc {r.metrics['val']['accuracy']:.3f}",
    )
    timed(
        "pseudo-label (tta)",
        lambda: pseudo_label(
            PseudoLabelConfig.flat(
                model_path=models["qwen2-tiny"],
                adapter_dir=teacher.adapter_dir,
                input_file=w / "prepared/unlabeled.parquet",
                out_file=w / "pseudo.parquet",
                max_length=L,
            )
        ),
        lambda df: f"{len(df)} rows",
    )
    students = {}
    for name in ("qwen2-tiny", "gemma2-tiny"):
        students[name] = timed(
            f"train student {name} (mixed)",
            lambda name=name: train(
                TrainConfig.flat(
                    model_path=models[name],
                    train_file=w / "prepared/train.parquet",
                    extra_files=[str(w / "pseudo.parquet")],
                    out_dir=w / name,
                    loss="mixed",
                    **common,
                )
            ),
            lambda r: f"val acc {r.metrics['val']['accuracy']:.3f}",
        )
    timed(
        "infer (cascade)",
        lambda: infer(
            InferConfig.flat(
                test_file=w / "data/test.parquet",
                primary_model=models["qwen2-tiny"],
                primary_adapter=students["qwen2-tiny"].adapter_dir,
                secondary_model=models["gemma2-tiny"],
                secondary_adapter=students["gemma2-tiny"].adapter_dir,
                max_length=L,
                out_dir=w / "submission",
                labels_file=files["test_labels"],
                started_at=time.time(),
            )
        ),
        lambda p: f"{len(p)} rows",
    )
    report = json.loads((w / "submission/report.json").read_text())
    print(f"\n{'stage':<36}{'seconds':>9}  note")
    for name, sec, note in rows:
        print(f"{name:<36}{sec:>9.1f}  {note}")
    print(f"test accuracy {report['accuracy']['accuracy']:.3f}; report: {json.dumps(report)}")


if __name__ == "__main__":
    main()
