"""Post-training (the seed's two stages): continuing from a saved adapter, training on the extras alone, and the
stage 1 → stage 2 recipes that chain them."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from kaggle_utils.config import recipes
from kaggle_utils.train import TrainConfig, setup, train
from kaggle_utils.training.rows import split
from kaggle_utils.training.schedule import schedule
from kaggle_utils.training.step import train_step

# trains: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

MAX_LENGTH = 256
HEAD = "base_model.model.score.weight"


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _config(trained, out_dir: Path, **kw) -> TrainConfig:
    """A short run on the session's prepared rows, on the model the session adapter was trained on."""
    base = dict(
        model_path=trained.cfg.model.model_path,
        train_file=trained.cfg.data.train_file,
        out_dir=out_dir,
        max_length=MAX_LENGTH,
        lr=2e-3,
        epochs=1,
        batch_tokens=4096,
        max_rows=16,
        max_train_rows=64,
        save_every=0,
        seed=7,
    )
    return TrainConfig.flat(**(base | kw))


def _state(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(run.model).items()}


def _take_steps(run, n: int) -> None:
    for epoch, swapped, micro_batches in itertools.islice(schedule(run.cfg.batching, run.data.lengths), n):  # endless
        _quiet(train_step, run, epoch, micro_batches, swapped)


@pytest.fixture(scope="module")
def fresh_head(trained, tmp_path_factory) -> torch.Tensor:
    """The head a run without init_adapter starts from (same model, same seed)."""
    run = _quiet(setup, _config(trained, tmp_path_factory.mktemp("fresh")))
    return _state(run)[HEAD]


@pytest.mark.parametrize("init_head", [False, True], ids=["fresh-head", "kept-head"])
def test_training_continues_from_the_saved_adapter(trained, fresh_head, tmp_path, init_head) -> None:
    saved = load_file(trained.result.adapter_dir / "adapter_model.safetensors")
    cfg = _config(trained, tmp_path, init_adapter=trained.result.adapter_dir, init_head=init_head)
    run = _quiet(setup, cfg)
    start = _state(run)
    assert set(start) == set(saved)
    lora = [k for k in saved if "lora_" in k]
    assert len(lora) == 28  # 2 layers x 7 linears x (A, B)
    for k in lora:  # step 0 is exactly the saved adapter, B included (a fresh LoRA has B = 0)
        torch.testing.assert_close(start[k], saved[k], rtol=0, atol=0)
    assert any(saved[k].abs().max() > 0 for k in lora if "lora_B" in k)
    expected_head = saved[HEAD] if init_head else fresh_head
    torch.testing.assert_close(start[HEAD], expected_head, rtol=0, atol=0)
    assert (saved[HEAD] - fresh_head).abs().max() > 1e-3  # the two cases are told apart

    # the loaded adapter is trainable: LoRA and head, and nothing else
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert sum("lora_" in n for n in trainable) == 28 and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    _take_steps(run, 3)
    moved = _state(run)
    assert max((moved[k] - start[k]).abs().max().item() for k in lora) > 1e-4
    assert (moved[HEAD] - start[HEAD]).abs().max() > 1e-4


def test_an_adapter_of_another_rank_is_refused(trained, tmp_path) -> None:
    cfg = _config(trained, tmp_path, init_adapter=trained.result.adapter_dir, lora_r=8)
    with pytest.raises(ValueError, match=r"has LoRA r=16, alpha=32; this run asks for r=8.*set lora_r=16"):
        _quiet(setup, cfg)


def test_init_options_are_checked(trained, tmp_path) -> None:
    with pytest.raises(ValueError, match="no init_adapter"):
        _config(trained, tmp_path, init_head=True)
    with pytest.raises(ValueError, match="extra_files is empty"):
        _config(trained, tmp_path, extras_only=True)
    missing = _config(trained, tmp_path, init_adapter=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="init_adapter folder .*nowhere has no adapter_config.json"):
        _quiet(setup, missing)


@pytest.fixture(scope="module")
def extras(prepared, tmp_path_factory) -> Path:
    """A pseudo-labelled file over the unlabelled pool: teacher logits that follow no rule (a stand-in)."""
    df = pd.read_parquet(prepared["unlabeled"])
    rng = np.random.default_rng(0)
    z = rng.normal(size=(len(df), 2)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    df = df.assign(logit_a=z[:, 0], logit_b=z[:, 1], p_a=p[:, 0], p_b=p[:, 1])
    path = tmp_path_factory.mktemp("pseudo") / "pseudo.parquet"
    df.to_parquet(path, index=False)
    return path


def test_extras_only_trains_on_the_extras_and_validates_on_the_fold(trained, extras, tmp_path) -> None:
    both = _config(trained, tmp_path, extra_files=[str(extras)], max_train_rows=0)
    only = _config(trained, tmp_path, extra_files=[str(extras)], max_train_rows=0, extras_only=True)
    train_both, val_both = split(both)
    train_only, val_only = split(only)
    pool_ids = set(pd.read_parquet(extras)["id"])
    assert set(train_only["id"]) == pool_ids and len(train_only) == len(pool_ids)
    assert len(train_both) > len(train_only) and pool_ids < set(train_both["id"])
    assert val_only["id"].tolist() == val_both["id"].tolist() and len(val_only)
    assert (val_only["fold"] == 0).all()


def test_two_stages_chain_through_the_adapter(trained, extras, tmp_path) -> None:
    """Stage 1 on the extras alone, stage 2 on the labelled folds from stage 1's adapter (the recipes' chain)."""
    stage1 = _config(trained, tmp_path / "stage1", extra_files=[str(extras)], extras_only=True, max_train_rows=32)
    first = _quiet(train, stage1)
    assert first.metrics["train_rows"] == 32 and first.metrics["val"]["rows"] > 0
    stage2 = _config(trained, tmp_path / "stage2", init_adapter=first.adapter_dir, init_head=True, max_train_rows=32)
    run = _quiet(setup, stage2)
    saved = load_file(first.adapter_dir / "adapter_model.safetensors")
    for k, v in _state(run).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    second = _quiet(train, stage2)
    after = load_file(second.adapter_dir / "adapter_model.safetensors")
    assert max((after[k] - saved[k]).abs().max().item() for k in saved) > 1e-4


def test_the_stage_recipes_chain():
    student = recipes.load("student-qwen2.5-14b", TrainConfig)
    stage1 = recipes.load("student-qwen2.5-14b-stage1", TrainConfig)
    stage2 = recipes.load("student-qwen2.5-14b-stage2", TrainConfig)
    # stage 1: the pseudo-labels alone, validated on the competition's held-out fold
    assert stage1.data.extras_only and stage1.data.extra_files == student.data.extra_files
    assert stage1.data.train_file == student.data.train_file and stage1.data.val_fold == student.data.val_fold >= 0
    # stage 2: the competition rows alone, from stage 1's adapter, with its rank and alpha
    assert stage2.lora.init_adapter == stage1.data.out_dir / "adapter"
    assert stage2.data.extra_files == [] and not stage2.data.extras_only
    assert (stage2.lora.lora_r, stage2.lora.lora_alpha) == (stage1.lora.lora_r, stage1.lora.lora_alpha)
    assert stage1.data.out_dir != stage2.data.out_dir != student.data.out_dir
    assert (stage1.model.model_path, stage1.inputs.max_length) == (stage2.model.model_path, stage2.inputs.max_length)
