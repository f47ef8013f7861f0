"""The stages at real size on a GPU: Qwen2.5-14B's shapes with random weights, max length 2,500.

    python benchmarks/real_shapes.py --work /tmp/real      # needs a CUDA GPU with >= 40 GB

Builds a random-weight Qwen2.5-14B sequence classifier (the real config: 48 layers, hidden 5120, GQA 40/8,
vocab 152,064) with the real Qwen2.5 tokenizer, saves it with ``save_pretrained``, then runs the train stage
(QLoRA nf4, gradient checkpointing, max length 2,500) and the infer stage on demo rows with the real length
profile — the same calls a user makes with real weights. Prints a table of seconds, tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kaggle_utils.data.demo import DemoDataConfig, generate_demo_data
from kaggle_utils.infer import InferConfig, infer
from kaggle_utils.models.demo import build_qwen_tokenizer
from kaggle_utils.prepare import PrepareConfig, prepare
from kaggle_utils.train import TrainConfig, train


def build_qwen14b(path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    cfg = Qwen2Config(
        vocab_size=152_064,
        hidden_size=5120,
        intermediate_size=13_824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        max_position_embeddings=32_768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        num_labels=2,
        pad_token_id=151_643,
    )
    with torch.device("cuda"):
        model = Qwen2ForSequenceClassification(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    build_qwen_tokenizer(path)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/real"))
    ap.add_argument("--train-rows", type=int, default=48)
    ap.add_argument("--test-rows", type=int, default=96)
    args = ap.parse_args()
    w = args.work
    table = []
    t0 = time.time()
    build_qwen14b(w / "qwen2.5-14b-random")
    table.append(("build + save 14B (bf16)", time.time() - t0, ""))
    files = generate_demo_data(
        DemoDataConfig(
            out_dir=w / "data", n_train=args.train_rows * 2, n_test=args.test_rows, n_unlabeled=8, length_scale=1.0
        )
    )
    prepare(PrepareConfig(data_dir=w / "data", out_dir=w / "prepared"))

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train(
        TrainConfig.flat(
            model_path=w / "qwen2.5-14b-random",
            train_file=w / "prepared/train.parquet",
            out_dir=w / "student",
            max_length=2500,
            batch_tokens=5000,
            max_rows=2,
            epochs=1.0,
            max_train_rows=args.train_rows,
            gradient_checkpointing=True,
            save_every=0,
            lr=1e-4,
            val_fold=-1,
        )
    )
    sec = time.time() - t0
    hist = result.history
    peak = torch.cuda.max_memory_allocated() / 2**30
    table.append(("train stage (load nf4 + QLoRA steps)", sec, f"{result.metrics['steps']} steps, peak {peak:.1f} GiB"))
    # the first step includes warm-up; tokens/s over the rest
    steady = hist.iloc[1:]
    table.append(
        (
            "  training steps after the first",
            float(steady["seconds"].sum()),
            f"{steady['tokens'].sum() / steady['seconds'].sum():,.0f} real tokens/s, "
            f"{steady['tokens'].mean():,.0f} tokens/step",
        )
    )

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    infer(
        InferConfig.flat(
            test_file=w / "data/test.parquet",
            primary_model=w / "qwen2.5-14b-random",
            primary_adapter=result.adapter_dir,
            max_length=2500,
            batch_tokens=16384,
            out_dir=w / "submission",
            labels_file=files["test_labels"],
            time_budget_minutes=30,
            reserve_minutes=1,
            started_at=time.time(),
        )
    )
    report = json.loads((w / "submission/report.json").read_text())
    table.append(
        (
            "infer stage (load nf4 + score)",
            time.time() - t0,
            f"{report['primary']['scored']} rows scored in {report['primary']['seconds']} s, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
        )
    )
    print(f"\n{'step':<40}{'seconds':>9}  note")
    for name, s, note in table:
        print(f"{name:<40}{s:>9.1f}  {note}")
    print("report:", json.dumps(report))


if __name__ == "__main__":
    main()
