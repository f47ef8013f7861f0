"""kaggle_utils.train: learning on the demo data, artifacts, losses in the loop, checkpoints and resume."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kaggle_utils import train as train_module
from kaggle_utils.config.cli import config_to_dict
from kaggle_utils.data import schema
from kaggle_utils.inputs.batching import pad
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.train import TrainConfig, train

MAX_LENGTH = 256


def _run(cfg: TrainConfig):
    """Train, capturing what it prints."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = train(cfg)
    return result, buf.getvalue()


def _adapter_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "adapter" / "adapter_model.safetensors")


# what a step records that does not depend on the wall clock
HISTORY_COLUMNS = ["step", "epoch", "loss", "lr", "rows"]


def _assert_same_history(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        got[HISTORY_COLUMNS].reset_index(drop=True), expected[HISTORY_COLUMNS].reset_index(drop=True)
    )


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


# --- the shared 4-bit run ------------------------------------------------------------------------------
def test_training_loss_falls(trained) -> None:
    losses = trained.result.history["loss"].to_numpy()
    assert len(losses) == trained.result.metrics["steps"] == trained.result.metrics["total_steps"] == 90
    k = len(losses) // 5
    first, last = losses[:k].mean(), losses[-k:].mean()
    assert last < first - 0.1, (first, last)
    assert np.isfinite(losses).all()


def test_validation_accuracy_beats_chance(trained) -> None:
    val = trained.result.metrics["val"]
    assert val["rows"] == len(pd.read_parquet(trained.cfg.out_dir / "val_predictions.parquet"))
    assert val["accuracy"] > 0.62, val
    assert val["log_loss"] < 0.69, val


def test_training_artifacts(trained, prepared) -> None:
    out = trained.cfg.out_dir
    saved_cfg = json.loads((out / "train_config.json").read_text())
    assert saved_cfg == config_to_dict(trained.cfg)
    assert TrainConfig(**saved_cfg) == trained.cfg
    assert json.loads((out / "metrics.json").read_text()) == trained.result.metrics
    hist = pd.read_csv(out / "history.csv")
    assert set(HISTORY_COLUMNS) <= set(hist.columns)
    assert hist["step"].tolist() == list(range(1, 91))
    assert sorted(set(hist["epoch"])) == [0, 1, 2]
    np.testing.assert_allclose(hist["loss"], trained.result.history["loss"], rtol=1e-6)
    # warm-up then cosine decay to 10% of the peak
    assert hist["lr"].max() == pytest.approx(2e-3)
    assert hist["lr"].iloc[-1] == pytest.approx(2e-4, rel=1e-3)
    # every training row is seen once per epoch
    train_rows = trained.result.metrics["train_rows"]
    assert hist.groupby("epoch")["rows"].sum().tolist() == [train_rows] * 3
    folds = pd.read_parquet(prepared["train"])["fold"]
    assert train_rows == int((folds != 0).sum())
    adapter = out / "adapter"
    assert trained.result.adapter_dir == adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and adapter_cfg["r"] == 16
    # LoRA on every linear layer of the base, and the classification head trained in full
    weights = _adapter_weights(out)
    assert sum(".lora_A." in k for k in weights) == 2 * 7
    assert any(k.endswith("score.weight") for k in weights)
    val = pd.read_parquet(out / "val_predictions.parquet")
    expected_ids = pd.read_parquet(prepared["train"]).query("fold == 0")["id"].tolist()
    assert val["id"].tolist() == expected_ids
    np.testing.assert_allclose(val["p_a"] + val["p_b"], 1.0, atol=1e-5)
    # the checkpoint holds the final step
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 90 and len(state["history"]) == 90
    assert "trainable params" in trained.stdout and "steps 90 (30/epoch)" in trained.stdout


def test_adapter_carries_its_training_config(trained) -> None:
    """An adapter copied elsewhere (a Kaggle dataset) still says how its inputs were built."""
    out = trained.cfg.out_dir
    carried = out / "adapter" / "train_config.json"
    assert carried.is_file(), f"{carried} is missing: save_adapter must write the config into adapter/"
    assert carried.read_text() == (out / "train_config.json").read_text()
    saved = json.loads(carried.read_text())
    assert (saved["max_length"], saved["template"], saved["truncation"]) == (MAX_LENGTH, "tagged", "right")
    assert TrainConfig(**saved) == trained.cfg


def test_rerun_of_a_finished_run_resumes_at_the_end(trained, tmp_path: Path, monkeypatch) -> None:
    """Run the same command again after the adapter was lost: it resumes at the last step and trains nothing."""
    out = tmp_path / "copy"
    shutil.copytree(trained.cfg.out_dir, out)
    shutil.rmtree(out / "adapter")
    calls = []
    original = train_module.preference_loss
    monkeypatch.setattr(train_module, "preference_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = TrainConfig(**{**config_to_dict(trained.cfg), "out_dir": out})
    result, stdout = _run(cfg)
    assert f"resuming from {out / 'checkpoint.pt'} at step 90/90" in stdout
    assert calls == []  # no training step ran
    # the re-saved adapter carries this run's config again
    assert (out / "adapter" / "train_config.json").read_text() == (out / "train_config.json").read_text()
    assert result.metrics["steps"] == 90
    _assert_same_history(result.history, trained.result.history)
    _assert_same_weights(_adapter_weights(out), _adapter_weights(trained.cfg.out_dir))
    assert result.metrics["val"] == pytest.approx(trained.result.metrics["val"], abs=1e-6)


def test_rerun_with_a_changed_config_refuses_to_resume(trained, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(trained.cfg.out_dir, out)
    cfg = TrainConfig(**{**config_to_dict(trained.cfg), "out_dir": out, "lr": 1e-3})
    before = (out / "train_config.json").read_text()
    with pytest.raises(RuntimeError, match=r"different config \(lr\)"):
        _run(cfg)
    # the refused run leaves the record of the run that wrote the checkpoint as it was
    assert (out / "train_config.json").read_text() == before


# --- interrupted runs (tiny, full precision, no dropout: bit-for-bit reproducible) ---------------------------
class Killed(Exception):
    """Stands in for the kernel being killed mid-run."""


def _tiny_cfg(prepared, qwen_path: Path, out_dir: Path, **kw) -> TrainConfig:
    params = dict(
        model_path=qwen_path,
        load_in_4bit=False,
        train_file=prepared["train"],
        out_dir=out_dir,
        val_fold=-1,
        max_length=MAX_LENGTH,
        max_train_rows=96,
        batch_tokens=1024,
        max_rows=8,
        lr=2e-3,
        epochs=1.0,
        save_every=3,
        lora_dropout=0.0,
    )
    params.update(kw)
    return TrainConfig(**params)


@pytest.fixture(scope="module")
def reference_run(prepared, qwen_path: Path, tmp_path_factory):
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path_factory.mktemp("reference"))
    result, _ = _run(cfg)
    assert result.metrics["steps"] == result.metrics["total_steps"] == 15
    return cfg, result


def _counting_loss(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Wrap the training loss: count its calls (one per step here), and raise ``Killed`` on call ``fail_at``."""
    calls: list[int] = []
    original = train_module.preference_loss

    def wrapped(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "preference_loss", wrapped)
    return calls


def test_resume_after_a_kill_continues_from_the_checkpoint(reference_run, prepared, qwen_path, tmp_path, monkeypatch):
    ref_cfg, ref = reference_run
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run")
    _counting_loss(monkeypatch, fail_at=5)  # killed during step 5; the last checkpoint is at step 3
    with pytest.raises(Killed):
        _run(cfg)
    state = torch.load(cfg.out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["history"]) == 3
    assert not (cfg.out_dir / "adapter").exists() and not (cfg.out_dir / "metrics.json").exists()

    calls = _counting_loss(monkeypatch)
    result, stdout = _run(cfg)
    assert f"resuming from {cfg.out_dir / 'checkpoint.pt'} at step 3/15" in stdout
    assert len(calls) == 12  # only steps 4..15 were trained
    assert result.metrics["steps"] == 15
    # the resumed run is the uninterrupted run
    _assert_same_history(result.history, ref.history)
    _assert_same_weights(_adapter_weights(cfg.out_dir), _adapter_weights(ref_cfg.out_dir))


def test_time_budget_stops_cleanly_and_the_rerun_finishes(reference_run, prepared, qwen_path, tmp_path, monkeypatch):
    ref_cfg, ref = reference_run
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", time_budget_minutes=30.0)

    class Deadline7:
        """A wall clock that runs out after 7 steps."""

        def __init__(self, seconds, *args, **kwargs):
            assert seconds == 30 * 60
            self.checks = 0

        def allows(self, estimated_seconds: float) -> bool:
            self.checks += 1
            return self.checks <= 7

    monkeypatch.setattr(train_module, "Deadline", Deadline7)
    result, stdout = _run(cfg)
    assert "time budget of 30.0 min reached at step 7/15; stopping" in stdout
    assert result.metrics["stopped_by_budget"] is True and result.metrics["steps"] == 7
    assert (cfg.out_dir / "adapter" / "adapter_model.safetensors").is_file()  # a usable adapter anyway
    state = torch.load(cfg.out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 7
    _assert_same_history(result.history, ref.history.iloc[:7])

    monkeypatch.undo()
    calls = _counting_loss(monkeypatch)
    result, stdout = _run(cfg)
    assert "at step 7/15" in stdout and len(calls) == 8
    assert result.metrics["stopped_by_budget"] is False and result.metrics["steps"] == 15
    _assert_same_history(result.history, ref.history)
    _assert_same_weights(_adapter_weights(cfg.out_dir), _adapter_weights(ref_cfg.out_dir))


def test_exhausted_time_budget_trains_no_step(prepared, qwen_path, tmp_path) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", time_budget_minutes=1e-9)
    result, stdout = _run(cfg)
    assert "reached at step 0/15" in stdout
    assert result.metrics["steps"] == 0 and result.metrics["stopped_by_budget"] is True
    assert len(result.history) == 0
    assert torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["step"] == 0


# --- the loss inside the training loop ------------------------------------------------------------------
@pytest.fixture(scope="module")
def loss_setup(prepared, qwen_path, tokenizer, tmp_path_factory):
    """8 labelled rows and a soft-labelled extra file of 8 pool rows; 16 rows make exactly one batch."""
    root = tmp_path_factory.mktemp("losses")
    labelled = pd.read_parquet(prepared["train"]).iloc[:8]
    labelled.to_parquet(root / "train.parquet", index=False)
    p_a = np.array([0.9, 0.8, 0.3, 0.15, 0.7, 0.6, 0.25, 0.95])
    extra = pd.read_parquet(prepared["unlabeled"]).iloc[:8].assign(p_a=p_a, p_b=1 - p_a)
    extra.to_parquet(root / "pseudo.parquet", index=False)
    base = load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=False), tokenizer.pad_token_id)
    return root, pd.concat([labelled, extra], ignore_index=True), base


def _expected_first_step_loss(kind: str, frame: pd.DataFrame, swap: bool, base, tokenizer, cfg) -> dict:
    """The loss of the untrained model (LoRA starts as the identity) on the only batch, computed by hand."""
    view = schema.swap_ab(frame) if swap else frame
    rows = PromptFormatter(tokenizer, cfg).encode(view)
    with torch.no_grad():
        logits = base(**pad(rows, tokenizer.pad_token_id)).logits.double().numpy()
    logp = logits - np.logaddexp(logits[:, :1], logits[:, 1:])
    labelled = view["winner"].isin(schema.WINNERS).to_numpy()
    target = np.where(
        labelled[:, None],
        np.eye(2)[(view["winner"] == "model_b").to_numpy().astype(int)],
        view[["p_a", "p_b"]].to_numpy(dtype=float),
    )
    hard = target.argmax(1)
    ce = -logp[np.arange(len(rows)), hard].mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(target > 0, target * (np.log(target) - logp), 0.0).sum(1).mean()
    return {"ce": ce, "kl": kl, "mixed": 0.5 * ce + 0.5 * kl}


@pytest.mark.parametrize("kind,swap", [("ce", False), ("kl", True), ("mixed", True)])
def test_first_step_loss_matches_hand_computation(loss_setup, qwen_path, tokenizer, kind: str, swap: bool) -> None:
    root, frame, base = loss_setup
    cfg = TrainConfig(
        model_path=qwen_path,
        load_in_4bit=False,
        train_file=root / "train.parquet",
        extra_files=[str(root / "pseudo.parquet")],
        out_dir=root / kind,
        val_fold=-1,
        loss=kind,
        kl_weight=0.5,
        max_length=MAX_LENGTH,
        batch_tokens=16 * MAX_LENGTH,
        max_rows=16,
        epochs=1.0,
        swap_fraction=1.0 if swap else 0.0,
        save_every=0,
    )
    result, _ = _run(cfg)
    assert result.metrics["train_rows"] == 16 and result.metrics["total_steps"] == 1
    assert result.history["rows"].tolist() == [16]
    expected = _expected_first_step_loss(kind, frame, swap, base, tokenizer, cfg)
    # the three losses are far enough apart for the check to tell them apart
    assert abs(expected["kl"] - expected["ce"]) > 0.05
    assert result.history["loss"].iloc[0] == pytest.approx(expected[kind], rel=1e-4)
    assert (root / kind / "adapter" / "adapter_model.safetensors").is_file()


# --- configuration errors --------------------------------------------------------------------------------
def test_too_few_batches_for_grad_accum_is_an_error(prepared, qwen_path, tmp_path) -> None:
    """8 rows in one micro-batch cannot make a step of 2 micro-batches (this once looped forever)."""
    cfg = _tiny_cfg(
        prepared, qwen_path, tmp_path / "run", max_train_rows=8, batch_tokens=4096, max_rows=16, grad_accum=2
    )

    def hung(signum, frame):
        raise TimeoutError("train() did not return")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(ValueError, match="fewer than grad_accum=2"):
            _run(cfg)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_split_needs_a_fold_column(tmp_path, demo_files, qwen_path) -> None:
    cfg = TrainConfig(
        model_path=qwen_path, train_file=demo_files["train"], out_dir=tmp_path, max_length=256, batch_tokens=1024
    )
    with pytest.raises(schema.DataError, match="no 'fold' column"):
        train_module.split(cfg)
    train_df, val_df = train_module.split(TrainConfig(**{**config_to_dict(cfg), "val_fold": -1}))
    assert len(train_df) == 600 and len(val_df) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss": "hinge"}, "loss='hinge'"),
        ({"swap_fraction": 1.5}, "swap_fraction"),
        ({"batch_tokens": 100, "max_length": 256}, "batch_tokens >= max_length"),
        ({"epochs": 0}, "epochs > 0"),
    ],
)
def test_config_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
