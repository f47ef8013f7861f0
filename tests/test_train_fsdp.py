"""kaggle_utils.train under ``accelerate launch`` with the shipped fsdp.yaml: 2 sharded processes (FSDP2, gloo,
CPU) train what 1 process trains. accelerate shards only on accelerators; on the CPU
kaggle_utils.training.parallel shards with the same fsdp2_prepare_model (full precision for most tests here; one
4-bit nf4 run). Only rank 0 reads the base's weight files: at full precision rank 1 builds the model on the meta
device and receives rank 0's weights while it is sharded; in 4-bit it receives rank 0's quantised model whole while
loading (tests/models/test_broadcast.py compares it tensor by tensor)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kaggle_utils.config.cli import config_to_argv
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.train import TrainConfig, train
from kaggle_utils.training.parallel import Parallel, check_fsdp_dtypes

# launches processes: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

ACCELERATE = Path(sys.executable).with_name("accelerate")
FSDP_CONFIG = Path(__file__).resolve().parents[1] / "kaggle_utils" / "recipes" / "accelerate" / "fsdp.yaml"

# as tests/test_train_ddp.py: 96 rows in micro-batches of at most 1,024 padded tokens, full precision, no dropout
SETTINGS = dict(
    load_in_4bit=False,
    device="cpu",
    max_length=256,
    max_train_rows=96,
    batch_tokens=1024,
    max_rows=8,
    lr=2e-3,
    epochs=1.0,
    lora_dropout=0.0,
    save_every=2,
    eval_every_steps=3,
    # the best evaluation is not the last: the kept adapter is restored into the shards
    best_metric="accuracy",
)


def _lopsided_file(prepared, tokenizer, path: Path) -> None:
    """Training rows of folds 1-4, and 16 held-out rows ordered so that rank 0 (rows 0::2) gets 8 long ones (2
    batches of at most 1,024 tokens) and rank 1 8 short ones (1 batch): the ranks' forward counts differ."""
    df = pd.read_parquet(prepared["train"])
    held = df[df["fold"] == 0]
    lengths = np.array([len(r) for r in PromptFormatter(tokenizer, TrainConfig.flat(**SETTINGS).inputs).encode(held)])
    long, short = held[lengths >= 150].iloc[:8], held[lengths <= 120].iloc[:8]
    assert len(long) == len(short) == 8
    val = pd.concat([long, short]).iloc[[i // 2 + 8 * (i % 2) for i in range(16)]]  # long, short, long, ...
    pd.concat([df[df["fold"] != 0].iloc[:140], val]).to_parquet(path, index=False)


# kaggle_utils.train's main, with every safetensors file a process opens recorded (tests/counting_open.py) and the
# process's peak resident memory, written to $OPENS_DIR/rank<RANK>.json when it ends
COUNTING_MAIN = """
import json, os, resource, sys
from counting_open import opened  # tests/counting_open.py: before transformers is imported
from kaggle_utils.train import main

try:
    main(sys.argv[1:])
finally:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    record = {"opened": opened, "peak_mib": peak_mib}
    with open(os.path.join(os.environ["OPENS_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
"""


def _launch(config: Path, args: list[str], port: int, opens_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` of kaggle_utils.train; with ``opens_dir``, through :data:`COUNTING_MAIN`."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(config), "--num_processes", "2"]
    cmd += ["--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if opens_dir is None:
        cmd += ["-m", "kaggle_utils.train", *args]
    else:
        opens_dir.mkdir(parents=True, exist_ok=True)
        (opens_dir / "counting_main.py").write_text(COUNTING_MAIN)
        cmd += [str(opens_dir / "counting_main.py"), *args]
        env["OPENS_DIR"] = str(opens_dir)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def _opened(opens_dir: Path, rank: int, folder: Path) -> list[str]:
    """The files under ``folder`` that rank ``rank`` opened with safetensors."""
    record = json.loads((opens_dir / f"rank{rank}.json").read_text())
    return [p for p in record["opened"] if Path(p).is_relative_to(folder.resolve())]


def _single_and_sharded(prepared, tokenizer, root: Path, common: dict, port: int):
    """One process at grad_accum=2 and two FSDP processes at grad_accum=1 (the same global batches) on the lopsided
    file in ``root``, the launch recording the files each rank opens; returns the single run's config and result,
    and the launch."""
    _lopsided_file(prepared, tokenizer, root / "train.parquet")
    common = dict(common, train_file=root / "train.parquet")
    single = TrainConfig.flat(**common, out_dir=root / "single", grad_accum=2)
    with contextlib.redirect_stdout(io.StringIO()):
        one = train(single)
    args = config_to_argv(dict(common, out_dir=root / "fsdp", grad_accum=1))
    done = _launch(FSDP_CONFIG, args, port, opens_dir=root / "opens")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return single, one, done


@pytest.fixture(scope="module")
def runs(prepared, tokenizer, qwen_path, tmp_path_factory):
    """The same global batches: 1 process at grad_accum=2, and 2 FSDP processes at grad_accum=1."""
    root = tmp_path_factory.mktemp("fsdp")
    common = dict(SETTINGS, model_path=qwen_path, train_file=root / "train.parquet")
    single, one, done = _single_and_sharded(prepared, tokenizer, root, common, 29527)
    return single, one, root / "fsdp", done, common


def test_two_sharded_processes_train_what_one_process_trains(runs) -> None:
    single, one, fsdp_dir, done, _ = runs
    assert "2 processes x 1 micro-batch(es)/step" in done.stdout
    assert "FSDP: no checkpoints are written (save_every=2 ignored)" in done.stdout
    history = pd.read_csv(fsdp_dir / "history.csv")
    assert len(history) == one.metrics["total_steps"] >= 5
    assert history["rows"].tolist() == one.history["rows"].tolist()
    np.testing.assert_allclose(history["loss"], one.history["loss"], rtol=1e-5)
    # the norm of the whole gradient, reduced over the shards before clipping
    np.testing.assert_allclose(history["grad_norm"], one.history["grad_norm"], rtol=1e-4)
    a = load_file(fsdp_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(single.data.out_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()  # gathered full weights under peft's adapter keys, not shards
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(k.endswith("score.weight") for k in a) and history["loss"].iloc[-1] != history["loss"].iloc[0]


def test_only_rank_0_reads_the_weight_files(runs, qwen_path) -> None:
    """Full precision under FSDP: rank 1 builds the model on meta and receives rank 0's weights while sharding (it
    then trains what one process trains: the test above); it opens no weight file, not even for a header check."""
    _, _, fsdp_dir, _, _ = runs
    opens = fsdp_dir.parent / "opens"
    weights = sorted(str(p.resolve()) for p in qwen_path.glob("*.safetensors"))
    assert weights and set(weights) <= set(_opened(opens, 0, qwen_path))
    assert _opened(opens, 1, qwen_path) == []


@pytest.fixture(scope="module")
def runs_4bit(prepared, tokenizer, qwen_path, tmp_path_factory):
    """As :func:`runs`, on the 4-bit nf4 base: 1 process at grad_accum=2, 2 FSDP processes at grad_accum=1."""
    root = tmp_path_factory.mktemp("fsdp_4bit")
    common = dict(SETTINGS, load_in_4bit=True, model_path=qwen_path)
    _, one, _ = _single_and_sharded(prepared, tokenizer, root, common, 29531)
    return one, root


def test_4bit_is_read_once_and_trains_what_one_process_trains(runs_4bit, qwen_path) -> None:
    """Rank 1 opens no weight file (rank 0 sends its quantised model) and the sharded run's steps are the single
    process's, as they were when every rank loaded its own copy: the same base and LoRA draws on every rank."""
    one, root = runs_4bit
    weights = sorted(str(p.resolve()) for p in qwen_path.glob("*.safetensors"))
    assert weights and set(weights) <= set(_opened(root / "opens", 0, qwen_path))
    assert _opened(root / "opens", 1, qwen_path) == []
    history = pd.read_csv(root / "fsdp" / "history.csv")
    assert history["rows"].tolist() == one.history["rows"].tolist() and len(history) >= 5
    np.testing.assert_allclose(history["loss"], one.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["grad_norm"], one.history["grad_norm"], rtol=1e-4)
    a = load_file(root / "fsdp" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "single" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_two_sharded_processes_evaluate_in_lockstep_what_one_process_evaluates(runs) -> None:
    """Each rank scores its half of the held-out rows with as many forwards as the other (every forward
    all-gathers the layers: rank 1 has one batch less and runs a stand-in); the kept adapter is the best
    evaluation's, restored into the shards."""
    single, one, fsdp_dir, _, _ = runs
    evals = pd.read_csv(fsdp_dir / "evals.csv")
    assert evals["step"].tolist() == one.evals["step"].tolist() and len(evals) >= 2
    assert one.metrics["best"]["step"] < one.metrics["steps"]  # the restore is exercised
    np.testing.assert_allclose(evals["log_loss"], one.evals["log_loss"], rtol=1e-5)
    got = pd.read_parquet(fsdp_dir / "val_predictions.parquet")
    expected = pd.read_parquet(single.data.out_dir / "val_predictions.parquet")
    assert got["id"].tolist() == expected["id"].tolist()
    np.testing.assert_allclose(got[["p_a", "p_b"]], expected[["p_a", "p_b"]], atol=1e-5)
    metrics = pd.read_json(fsdp_dir / "metrics.json", typ="series")
    assert metrics["best"]["step"] == one.metrics["best"]["step"]


def test_no_checkpoint_is_written_and_an_existing_one_is_refused(runs, tmp_path) -> None:
    single, _, fsdp_dir, _, common = runs
    assert not (fsdp_dir / "checkpoint.pt").exists() and (single.data.out_dir / "checkpoint.pt").is_file()
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((single.data.out_dir / "checkpoint.pt").read_bytes())
    done = _launch(FSDP_CONFIG, config_to_argv(dict(common, out_dir=out, grad_accum=1)), 29529)
    assert done.returncode != 0
    assert "resuming a checkpoint under FSDP is not supported: use a new --out-dir" in done.stderr


def test_the_fsdp_config_is_what_accelerate_reads() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(FSDP_CONFIG))
    assert (cfg.distributed_type, cfg.num_machines, cfg.mixed_precision) == ("FSDP", 1, "no")
    fsdp = cfg.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # kaggle_utils.training.parallel sets cpu_ram_efficient_loading itself (on for full precision, off for 4-bit,
    # whose model rank 0 sends whole while loading)
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False and fsdp["fsdp_reshard_after_forward"] is True


def test_fsdp_refuses_trainable_parameters_of_two_dtypes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(TypeError, match=r"one dtype \(fp32 masters\); found torch.float32 \(0.weight\)"):
        check_fsdp_dtypes(model)
    model[1].requires_grad_(False)  # frozen weights may keep their own dtype
    check_fsdp_dtypes(model)


def test_one_process_is_a_pass_through() -> None:
    par = Parallel()
    assert not par.fsdp and par.gathered_trainable(torch.nn.Linear(2, 2)) is None
    assert par.sum(1.5) == 1.5 and par.max(3) == 3


@pytest.mark.parametrize(
    ("kind", "version", "message"),
    [
        ("FSDP", 1, "FSDP version 1; kaggle_utils.train shards with FSDP2 only: launch with --config_file"),
        ("DEEPSPEED", None, "set up for DEEPSPEED; kaggle_utils.train trains data-parallel"),
    ],
)
def test_launches_this_loop_does_not_train_are_refused(kind, version, message) -> None:
    from types import SimpleNamespace

    from kaggle_utils.training.parallel import _check_launch

    plugin = None if version is None else SimpleNamespace(fsdp_version=version)
    with pytest.raises(RuntimeError, match=message):
        _check_launch(SimpleNamespace(num_processes=2, distributed_type=kind), 2, plugin)
    _check_launch(SimpleNamespace(num_processes=2, distributed_type="FSDP"), 2, SimpleNamespace(fsdp_version=2))
