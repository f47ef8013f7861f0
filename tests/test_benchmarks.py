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


def test_the_packed_fused_variants_pair_each_budget_with_and_without_the_fp32_residual():
    by_name = {v.name: v for v in variants(2500)}
    for k in (10, 12):
        upcast = by_name[f"{k}K packed, no ckpt, drop 0, fused"]
        half = by_name[f"{k}K packed, no ckpt, drop 0, fused, bf16 residual"]
        assert (upcast.fp32_residual, half.fp32_residual) == (True, False)
        assert upcast.__dict__ | {"name": "", "fp32_residual": False} == half.__dict__ | {"name": ""}
        assert (upcast.batch_tokens, upcast.packing, upcast.fused_kernels, upcast.checkpointing) == (
            k * 1024, True, True, False,
        )  # fmt: skip
        # rows average ~930 tokens at the competition's profile: the row cap must not bind before the budget
        assert upcast.max_rows * 930 > 2 * upcast.batch_tokens


def test_the_stage_config_carries_every_option_of_a_variant(tmp_path):
    import argparse

    from benchmarks.bench_train import stage_config

    v = {v.name: v for v in variants(2500)}["12K packed, no ckpt, drop 0, fused, bf16 residual"]
    args = argparse.Namespace(work=tmp_path, device="cpu", max_length=2500, minutes=0.5, compile_minutes=1.0)
    o = stage_config(v, args, tmp_path / "train.parquet", tmp_path / "m").optim
    assert (o.batch_tokens, o.max_rows, o.packing, o.fused_kernels, o.fp32_residual) == (12288, 32, True, True, False)
    assert (o.gradient_checkpointing, o.compile_layers, o.fused_lora) == (False, False, False)
    lora = {v.name: v for v in variants(2500)}["10K packed, no ckpt, drop 0, fused, bf16 residual, fused LoRA"]
    cfg = stage_config(lora, args, tmp_path / "train.parquet", tmp_path / "m")
    o = cfg.optim
    assert (o.batch_tokens, o.packing, o.fp32_residual, o.fused_lora, cfg.lora.lora_dropout) == (
        10240,
        True,
        False,
        True,
        0,
    )


@pytest.fixture(scope="module")
def bench_rows(tmp_path_factory):
    """The bench's rows (the competition's length profile) and the tiny model, built as the bench builds them."""
    import argparse

    from benchmarks.bench_train import prepare_rows

    work = tmp_path_factory.mktemp("bench")
    build("qwen2-tiny", work / "m", "cpu")
    args = argparse.Namespace(work=work, rows=40, device="cpu", max_length=2500, minutes=0.02, compile_minutes=0.0)
    return args, prepare_rows(args), work / "m"


def test_the_bare_loop_trains_the_stage_micro_batches_packed(bench_rows, monkeypatch):
    """For a packed variant the bare loop runs the stage's schedule (same packs, same order) through packing
    attention, with the variant's fp32 residual setting, and reports its figures."""
    import benchmarks.bench_train as bench
    from kaggle_utils.train import setup
    from kaggle_utils.training.schedule import schedule

    args, data, model_dir = bench_rows
    v = {v.name: v for v in variants(2500)}["10K packed, no ckpt, drop 0, fused, bf16 residual"]
    seen, original = [], bench._bare_forward

    def recording(model, rows, pad_id, device, packing):
        seen.append((sorted(len(r) for r in rows), packing, model.config._attn_implementation))
        return original(model, rows, pad_id, device, packing)

    monkeypatch.setattr(bench, "_bare_forward", recording)
    from kaggle_utils.models import loading

    loads, load = [], loading.load_classifier
    monkeypatch.setattr(loading, "load_classifier", lambda *a, **kw: loads.append(kw) or load(*a, **kw))
    args.minutes = 10.0  # the whole epoch: every pack is compared
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    row = bench.bare_loop(v, args, data, model_dir, config | {"num_key_value_heads": 2}, 1e12)
    run = setup(bench.stage_config(v, args, data, model_dir))
    steps = schedule(run.cfg.batching, run.data.lengths)
    stage = [sorted(int(run.data.lengths[i]) for i in next(steps)[2][0]) for _ in seen]
    assert [s[0] for s in seen] == stage and len(stage) > 1
    assert all(packing and attention == "packed_sdpa" for _, packing, attention in seen)
    assert row["status"] == "ok" and row["steps"] == len(seen) - 1 and row["tokens/s"] > 0
    assert [(kw["packing"], kw["fp32_residual"]) for kw in loads] == [(True, False)]


def test_bench_train_runs_on_the_cpu_with_a_bare_packed_loop_and_a_profile(bench_rows, monkeypatch, capsys):
    """The whole bench on the tiny model: the bare loop first, the variant, the table; the profile says that a CPU
    records nothing. A misspelt variant stops it before the model is built."""
    import sys

    import benchmarks.bench_train as bench

    args, _, _ = bench_rows
    v = "12K packed, no ckpt, drop 0, fused, bf16 residual"
    argv = ["bench_train", "--work", str(args.work), "--shape", "qwen2-tiny", "--device", "cpu", "--rows", "40"]
    argv += ["--minutes", "0.02", "--warmup-minutes", "0.01", "--only", v, "--bare", v, "--profile", v, "--bare-again"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    warm, table = out.split("\nvariant")
    assert f"warm-up: the stage's {v!r} for 0.01 min, untimed" in warm  # before the timed runs, not a row
    first, again = (i for i, line in enumerate(table.splitlines()) if line.startswith(f"bare loop: {v}"))
    stage = next(i for i, line in enumerate(table.splitlines()) if line.startswith(v))
    assert first < stage < again and table.count(f"\n{v}") == 1  # the bare loop brackets the stage's runs
    assert f"profile of {v!r}:\nprofile: cpu is not a CUDA device; nothing recorded" in out
    monkeypatch.setattr(sys, "argv", [*argv[:-2], "10K packed, fused"])
    with pytest.raises(SystemExit, match=r"unknown variant\(s\) \['10K packed, fused'\]"):
        bench.main()


def test_phase_peaks_read_the_allocator_at_the_end_of_forward_backward_and_step():
    """The allocator's counters stand in for a GPU's: each phase's peak is what was allocated since the last reset,
    the max over the steps, and the phases end where the forward returns and the optimiser starts and ends."""
    from benchmarks.train_profile import PhasePeaks

    state = {"peak": 0, "held": 0}
    peaks = PhasePeaks(lambda: state["peak"], lambda: state.update(peak=state["held"]), lambda: state["held"])

    def allocate(n: int) -> None:
        state["held"] += n
        state["peak"] = max(state["peak"], state["held"])

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters())
    model.register_forward_pre_hook(lambda *_: allocate(100))  # the forward's activations
    opt.register_step_pre_hook(lambda *_: allocate(-100 + 7))  # backward frees them, the gradients stay
    opt.register_step_post_hook(lambda *_: allocate(30))  # AdamW's moments
    peaks.attach(model, opt)
    for _ in range(2):
        model(torch.ones(2, 4)).sum().backward()
        allocate(50)  # a transient of the backward
        allocate(-50)
        opt.step()
    peaks.detach()
    # step 2 starts holding step 1's 7 + 30: forward 37 + 100, backward's transient + 50, AdamW 37 + 7 + 30
    assert peaks.peak == {"forward": 137, "loss + backward": 187, "optimizer": 74}
    assert peaks.held == {"forward": 137, "loss + backward": 44, "optimizer": 74}
    model(torch.ones(2, 4))  # detached: no more readings
    assert peaks.peak["forward"] == 137
    assert peaks.table().splitlines()[0].split() == ["phase", "peak", "GiB", "held", "GiB"]


def test_top_kernels_count_kernels_only_and_their_share_of_the_wall_time():
    from types import SimpleNamespace

    from benchmarks.train_profile import kernel_table, top_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, us, device=cuda, count=4):
        return SimpleNamespace(key=key, count=count, self_device_time_total=us, device_type=device)

    events = [event("gemm", 600_000), event("aten::mm", 600_000, cpu), event("rmsnorm", 100_000), event("idle", 0)]
    events += [event(f"k{i}", 1_000) for i in range(20)]
    rows, busy = top_kernels(events, wall_us=1_000_000, n=3)
    assert rows == [("gemm", 4, 600.0, 0.6), ("rmsnorm", 4, 100.0, 0.1), ("k0", 4, 1.0, 0.001)]
    assert busy == pytest.approx(0.72)  # 600 + 100 + 20 x 1 ms of 1 s; the operator's row is not counted again
    table = kernel_table(rows, busy, steps=2).splitlines()
    assert table[1].split() == ["gemm", "2", "300.0", "60.0%"] and table[-1].endswith("72.0%")
