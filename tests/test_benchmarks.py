"""The benchmarks' own arithmetic, checked on the CPU (the benchmarks themselves run on a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.bench_infer import SHAPES, build
from benchmarks.bench_train import model_flops, variants


def test_model_flops_match_a_flop_counter_on_the_real_structure(tmp_path):
    """model_flops' linear term is twice the forward's counted linear FLOPs (4N: forward + backward to the
    activations) and its attention term 1.5x the forward's counted full-square QK^T and AV (causal half, x3)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForSequenceClassification

    build("qwen2-tiny", tmp_path / "m", "cpu")
    config = json.loads((tmp_path / "m/config.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", attn_implementation="eager")

    def counted(t: int) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=torch.ones(1, t, dtype=torch.long))
        return counter.get_total_flops()

    t1, t2 = 32, 64
    f1, f2 = counted(t1), counted(t2)
    # counted(t) = a t + b t^2: a = linear layers + the score head (2 labels), b = eager attention's matmuls
    b = (f2 / t2 - f1 / t1) / (t2 - t1)
    a = f1 / t1 - b * t1
    head = 2 * config["hidden_size"] * 2
    assert model_flops(config, 1, 0) == pytest.approx(2 * (a - head), rel=1e-6)
    assert model_flops(config, 0, 1) == pytest.approx(1.5 * b, rel=1e-6)


def test_the_baseline_runs_first_and_every_variant_fits_the_stage():
    vs = variants(2500)
    assert (vs[0].max_rows, vs[0].batch_tokens) == (1, 2500)
    assert all(v.batch_tokens >= 2500 for v in vs) and len({v.name for v in vs}) == len(vs)
    assert set(SHAPES) >= {"qwen2.5-14b", "gemma2-9b", "qwen2-tiny"}


def test_the_speed_options_ride_on_the_best_variant_and_reach_the_stage(monkeypatch, tmp_path):
    """Each speed option is the best measured variant with that option alone changed, passed into the stage's config;
    one that fails is a row of the table, not the end of the run."""
    import argparse

    import pandas as pd

    import benchmarks.bench_train as bench

    by_name = {v.name: v for v in variants(2500)}
    best = by_name["4K padded, no ckpt, drop 0"]
    options = {"compiled": (False, True), "fused": (True, False), "fused, compiled": (True, True)}
    for suffix, (fused, compiled) in options.items():
        v = by_name[f"{best.name}, {suffix}"]
        assert (v.fused_kernels, v.compile_layers) == (fused, compiled)
        assert (v.batch_tokens, v.max_rows, v.checkpointing, v.lora_dropout) == (4096, 16, False, 0.0)

    seen = []

    def fake_train(cfg):
        seen.append((cfg.optim.fused_kernels, cfg.optim.compile_layers))
        if cfg.optim.compile_layers:
            raise RuntimeError("compile failed\nsecond line")
        hist = pd.DataFrame({"seconds": [9.0, 1.0, 1.0], "tokens": [4000, 4000, 4000], "tokens_sq": [4e6] * 3})
        return type("R", (), {"history": hist})()

    monkeypatch.setattr(bench, "train", fake_train)
    args = argparse.Namespace(work=tmp_path, device="cpu", max_length=2500, minutes=0.1, compile_minutes=1.0)
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    config["num_key_value_heads"] = 2
    ok = bench.run_variant(by_name[f"{best.name}, fused"], args, tmp_path, tmp_path, config, 1e12)
    failed = bench.run_variant(by_name[f"{best.name}, compiled"], args, tmp_path, tmp_path, config, 1e12)
    assert seen == [(True, False), (False, True)]
    assert ok["status"] == "ok" and ok["steps"] == 2 and ok["tokens/s"] == pytest.approx(4000.0)
    assert failed == {"variant": f"{best.name}, compiled", "status": "failed: RuntimeError: compile failed"}
