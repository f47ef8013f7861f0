"""kaggle_utils.train under ``accelerate launch``: 2 processes (gloo, CPU) train what 1 process trains."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kaggle_utils.config.cli import config_to_argv
from kaggle_utils.train import TrainConfig, train

# launches processes: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

ACCELERATE = Path(sys.executable).with_name("accelerate")
DDP_CONFIG = Path(__file__).resolve().parents[1] / "kaggle_utils" / "recipes" / "accelerate" / "ddp.yaml"

# 96 rows (fold 0 held out for evaluation) in micro-batches of at most 1,024 padded tokens; full precision and no
# dropout, so 1 and 2 processes can agree to round-off
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
    save_every=0,
    eval_every_steps=3,
)


@pytest.fixture(scope="module")
def runs(prepared, qwen_path, tmp_path_factory):
    """The same global batches: 1 process at grad_accum=2, and 2 processes at grad_accum=1 launched the way the
    users are told to (the shipped ddp.yaml; on this machine without a GPU, ``--device cpu`` makes it gloo)."""
    root = tmp_path_factory.mktemp("ddp")
    # 160 rows: 96 trained on, about 30 of fold 0 evaluated
    pd.read_parquet(prepared["train"]).iloc[:160].to_parquet(root / "train.parquet", index=False)
    common = dict(SETTINGS, model_path=qwen_path, train_file=root / "train.parquet")
    single = TrainConfig.flat(**common, out_dir=root / "single", grad_accum=2)
    with contextlib.redirect_stdout(io.StringIO()):
        one = train(single)
    launch = [str(ACCELERATE), "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2"]
    launch += ["--main_process_port", "29517"]
    cmd = [*launch, "-m", "kaggle_utils.train", *config_to_argv(dict(common, out_dir=root / "ddp", grad_accum=1))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return single, one, root / "ddp", done.stdout


def test_two_processes_train_what_one_process_trains(runs) -> None:
    single, one, ddp_dir, stdout = runs
    assert "2 processes x 1 micro-batch(es)/step" in stdout
    history = pd.read_csv(ddp_dir / "history.csv")
    assert len(history) == one.metrics["total_steps"] >= 5
    # every step's rows and loss: the same global batch, the loss summed over both processes' shares
    assert history["rows"].tolist() == one.history["rows"].tolist()
    np.testing.assert_allclose(history["loss"], one.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["grad_norm"], one.history["grad_norm"], rtol=1e-4)
    a = load_file(ddp_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(single.data.out_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    # the weights did move: equal adapters are not two untrained ones
    assert any(k.endswith("score.weight") for k in a) and history["loss"].iloc[-1] != history["loss"].iloc[0]


def test_two_processes_evaluate_in_shards_what_one_process_evaluates(runs) -> None:
    """Each process scores half the held-out rows; rank 0 gathers them in row order and writes the files once."""
    single, one, ddp_dir, _ = runs
    evals = pd.read_csv(ddp_dir / "evals.csv")
    assert evals["step"].tolist() == one.evals["step"].tolist() and len(evals) >= 2
    np.testing.assert_allclose(evals["log_loss"], one.evals["log_loss"], rtol=1e-5)
    got = pd.read_parquet(ddp_dir / "val_predictions.parquet")
    expected = pd.read_parquet(single.data.out_dir / "val_predictions.parquet")
    assert got["id"].tolist() == expected["id"].tolist()
    np.testing.assert_allclose(got[["p_a", "p_b"]], expected[["p_a", "p_b"]], atol=1e-5)
    assert (ddp_dir / "adapter" / "calibration.json").is_file() and (ddp_dir / "metrics.json").is_file()


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(runs, tmp_path) -> None:
    """A step is grad_accum x processes micro-batches: another world size would replay another schedule."""
    single, _, ddp_dir, _ = runs
    state = torch.load(ddp_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["world"] == 2
    out = tmp_path / "copy"
    shutil.copytree(ddp_dir, out)
    cfg = TrainConfig.flat(
        **{**SETTINGS, "model_path": single.model.model_path, "train_file": single.data.train_file}, out_dir=out
    )
    with pytest.raises(RuntimeError, match="written by 2 process\\(es\\) and this launch has 1; relaunch with"):
        train(cfg)


def test_the_ddp_config_is_what_accelerate_reads() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(DDP_CONFIG))
    assert (cfg.distributed_type, cfg.num_machines, cfg.mixed_precision) == ("MULTI_GPU", 1, "no")
    assert cfg.fsdp_config == {} and cfg.deepspeed_config == {}
