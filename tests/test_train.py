"""kaggle_utils.train: learning on the demo data, artifacts, losses in the loop, checkpoints and resume."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kaggle_utils import train as train_module
from kaggle_utils.config.cli import config_to_dict
from kaggle_utils.data import schema
from kaggle_utils.evaluation import calibration
from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.models.loading import ModelConfig, ModelFilesError, load_classifier, load_tokenizer
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.train import TrainConfig, train
from kaggle_utils.training import eval_cost, evaluation
from kaggle_utils.training import schedule as schedule_module
from kaggle_utils.training import step as step_module
from kaggle_utils.training.checkpoints import _resume_blockers
from kaggle_utils.training.errors import NonFiniteLossError, TrainMemoryError
from kaggle_utils.training.outputs import save_adapter
from kaggle_utils.training.precision import Precision, trainable_in_fp32
from kaggle_utils.training.rows import row_weights, split, training_rows

# every test here trains or steps the train stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

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
    assert val["rows"] == len(pd.read_parquet(trained.cfg.data.out_dir / "val_predictions.parquet"))
    assert val["accuracy"] > 0.62, val
    assert val["log_loss"] < 0.69, val


def test_training_artifacts(trained, prepared) -> None:
    out = trained.cfg.data.out_dir
    saved_cfg = json.loads((out / "train_config.json").read_text())
    assert saved_cfg == config_to_dict(trained.cfg)
    assert TrainConfig.flat(**saved_cfg) == trained.cfg
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
    # the swapped view, in the original A/B order, and the calibration for these weights fitted on each view: the
    # single order and the average of both orders (inference applies each to its rows: kaggle_utils.inference.blend)
    np.testing.assert_allclose(val["p_a_swapped"] + val["p_b_swapped"], 1.0, atol=1e-5)
    fitted = calibration.Calibration.load(adapter / "calibration.json")
    assert fitted.view == calibration.SINGLE_ORDER and fitted.tta.view == calibration.SWAP_AVERAGED
    assert fitted.adapter_fingerprint == calibration.adapter_fingerprint(adapter) is not None
    read = calibration.read_val_predictions(out / "val_predictions.parquet")
    for record, view in ((fitted, calibration.SINGLE_ORDER), (fitted.tta, calibration.SWAP_AVERAGED)):
        z = calibration.val_margins(read)[view]
        assert record.temperature == pytest.approx(calibration.fit_temperature_margins(z, read["label"]).temperature)
    # the checkpoint holds the final step
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 90 and len(state["history"]) == 90
    assert "trainable params" in trained.stdout and "steps 90 (30/epoch)" in trained.stdout


def test_adapter_carries_its_training_config(trained) -> None:
    """An adapter copied elsewhere (a Kaggle dataset) still says how its inputs were built."""
    out = trained.cfg.data.out_dir
    carried = out / "adapter" / "train_config.json"
    assert carried.is_file(), f"{carried} is missing: save_adapter must write the config into adapter/"
    assert carried.read_text() == (out / "train_config.json").read_text()
    saved = json.loads(carried.read_text())
    assert (saved["max_length"], saved["template"], saved["truncation"]) == (MAX_LENGTH, "tagged", "right")
    assert TrainConfig.flat(**saved) == trained.cfg


def test_rerun_of_a_finished_run_resumes_at_the_end(trained, tmp_path: Path, monkeypatch) -> None:
    """Run the same command again after the adapter was lost: it resumes at the last step and trains nothing."""
    out = tmp_path / "copy"
    shutil.copytree(trained.cfg.data.out_dir, out)
    shutil.rmtree(out / "adapter")
    calls = []
    original = step_module.preference_loss
    monkeypatch.setattr(step_module, "preference_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = TrainConfig.flat(**{**config_to_dict(trained.cfg), "out_dir": out})
    result, stdout = _run(cfg)
    assert f"resuming from {out / 'checkpoint.pt'} at step 90/90" in stdout
    assert calls == []  # no training step ran
    # the re-saved adapter carries this run's config again
    assert (out / "adapter" / "train_config.json").read_text() == (out / "train_config.json").read_text()
    assert result.metrics["steps"] == 90
    _assert_same_history(result.history, trained.result.history)
    _assert_same_weights(_adapter_weights(out), _adapter_weights(trained.cfg.data.out_dir))
    assert result.metrics["val"] == pytest.approx(trained.result.metrics["val"], abs=1e-6)


def test_a_field_added_after_the_checkpoint_blocks_resuming_only_off_its_default() -> None:
    """A package upgrade adds a config field: at its default it resumes; set to something else it is refused."""
    saved = {"lr": 1e-4, "epochs": 1.0}
    defaults = {"lr": 1e-4, "epochs": 1.0, "new_option": False}
    assert _resume_blockers(saved, {**saved, "new_option": False}, defaults) == []
    assert _resume_blockers(saved, {**saved, "new_option": True}, defaults) == ["new_option"]
    assert _resume_blockers(saved, {"lr": 1e-3, "epochs": 1.0, "new_option": False}, defaults) == ["lr"]
    # a recorded field changed back to its default still blocks: the checkpoint was trained otherwise
    assert _resume_blockers({**saved, "new_option": True}, {**saved, "new_option": False}, defaults) == ["new_option"]


def test_a_checkpoint_written_before_fp32_residual_resumes_at_its_default() -> None:
    """fp32_residual came after checkpoints were written: true (what they were trained with) resumes them."""
    defaults = config_to_dict(TrainConfig())
    saved = {k: v for k, v in defaults.items() if k != "fp32_residual"}
    assert _resume_blockers(saved, defaults, defaults) == []
    changed = config_to_dict(TrainConfig().replace(fp32_residual=False))
    assert _resume_blockers(saved, changed, defaults) == ["fp32_residual"]


@pytest.mark.parametrize("flat", [{"recompute_every": 0}, {"recompute_every": 4}])
def test_recompute_every_needs_checkpointing_and_a_positive_count(flat) -> None:
    """recompute_every above 1 means nothing without gradient checkpointing: refused, naming both settings."""
    with pytest.raises(ValueError, match="recompute_every=.*gradient_checkpointing"):
        TrainConfig.flat(**flat)
    assert TrainConfig.flat(recompute_every=4, gradient_checkpointing=True).optim.recompute_every == 4


def test_rerun_with_a_changed_config_refuses_to_resume(trained, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(trained.cfg.data.out_dir, out)
    cfg = TrainConfig.flat(**{**config_to_dict(trained.cfg), "out_dir": out, "lr": 1e-3})
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
    return TrainConfig.flat(**params)


@pytest.fixture(scope="module")
def reference_run(prepared, qwen_path: Path, tmp_path_factory):
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path_factory.mktemp("reference"))
    result, _ = _run(cfg)
    assert result.metrics["steps"] == result.metrics["total_steps"] == 15
    return cfg, result


def _counting_loss(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Wrap the training loss: count its calls (one per step here), and raise ``Killed`` on call ``fail_at``."""
    calls: list[int] = []
    original = step_module.preference_loss

    def wrapped(*args, **kwargs):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(step_module, "preference_loss", wrapped)
    return calls


def test_resume_after_a_kill_continues_from_the_checkpoint(reference_run, prepared, qwen_path, tmp_path, monkeypatch):
    ref_cfg, ref = reference_run
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run")
    _counting_loss(monkeypatch, fail_at=5)  # killed during step 5; the last checkpoint is at step 3
    with pytest.raises(Killed):
        _run(cfg)
    state = torch.load(cfg.data.out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["history"]) == 3
    assert not (cfg.data.out_dir / "adapter").exists() and not (cfg.data.out_dir / "metrics.json").exists()

    calls = _counting_loss(monkeypatch)
    result, stdout = _run(cfg)
    assert f"resuming from {cfg.data.out_dir / 'checkpoint.pt'} at step 3/15" in stdout
    assert len(calls) == 12  # only steps 4..15 were trained
    assert result.metrics["steps"] == 15
    # the resumed run is the uninterrupted run
    _assert_same_history(result.history, ref.history)
    _assert_same_weights(_adapter_weights(cfg.data.out_dir), _adapter_weights(ref_cfg.data.out_dir))


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
    assert (cfg.data.out_dir / "adapter" / "adapter_model.safetensors").is_file()  # a usable adapter anyway
    state = torch.load(cfg.data.out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 7
    _assert_same_history(result.history, ref.history.iloc[:7])

    monkeypatch.undo()
    calls = _counting_loss(monkeypatch)
    result, stdout = _run(cfg)
    assert "at step 7/15" in stdout and len(calls) == 8
    assert result.metrics["stopped_by_budget"] is False and result.metrics["steps"] == 15
    _assert_same_history(result.history, ref.history)
    _assert_same_weights(_adapter_weights(cfg.data.out_dir), _adapter_weights(ref_cfg.data.out_dir))


def test_exhausted_time_budget_trains_no_step(prepared, qwen_path, tmp_path) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", time_budget_minutes=1e-9)
    result, stdout = _run(cfg)
    assert "reached at step 0/15" in stdout
    assert result.metrics["steps"] == 0 and result.metrics["stopped_by_budget"] is True
    assert len(result.history) == 0
    assert torch.load(cfg.data.out_dir / "checkpoint.pt", weights_only=False)["step"] == 0


# --- the loss inside the training loop ------------------------------------------------------------------
P_A = np.array([0.9, 0.8, 0.3, 0.15, 0.7, 0.6, 0.25, 0.95])


@pytest.fixture(scope="module")
def loss_setup(prepared, qwen_path, tokenizer, tmp_path_factory):
    """8 labelled rows and a soft-labelled extra file of 8 pool rows; 16 rows make exactly one batch.

    ``pseudo.parquet`` carries probabilities only (an older file); ``pseudo_logits.parquet`` the teacher's logits
    too, on 6 of its 8 rows, and those logits are deliberately not log(p): the loss must take the logits.
    """
    root = tmp_path_factory.mktemp("losses")
    labelled = pd.read_parquet(prepared["train"]).iloc[:8]
    labelled.to_parquet(root / "train.parquet", index=False)
    extra = pd.read_parquet(prepared["unlabeled"]).iloc[:8].assign(p_a=P_A, p_b=1 - P_A)
    extra.to_parquet(root / "pseudo.parquet", index=False)
    logit_a = np.array([1.5, np.nan, -0.4, -2.0, 0.9, np.nan, -1.1, 2.5])
    extra.assign(logit_a=logit_a, logit_b=-0.5 * logit_a).to_parquet(root / "pseudo_logits.parquet", index=False)
    base = load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=False), tokenizer.pad_token_id)
    return root, labelled, base


def _expected_first_step_loss(frame: pd.DataFrame, swap: bool, base, tokenizer, cfg: TrainConfig) -> dict:
    """The loss of the untrained model (LoRA starts as the identity) on the only batch, computed by hand.

    Per row: CE on the human label (labelled rows only); KD = KL(softmax(t / T) || softmax(s / T)) * T^2 with t the
    teacher's logits (log p where the file has only probabilities), CE in its place on labelled rows without a
    teacher; the batch loss is the mean over all rows.
    """
    view = schema.swap_ab(frame) if swap else frame
    rows = PromptFormatter(tokenizer, cfg.inputs).encode(view)
    with torch.no_grad():
        s = base(**pad(rows, tokenizer.pad_token_id)).logits.double().numpy()  # (N, 2)

    def log_softmax(z):
        return z - np.logaddexp(z[:, :1], z[:, 1:])

    labelled = view["winner"].isin(schema.WINNERS).to_numpy()
    hard = (view["winner"] == "model_b").to_numpy().astype(int)
    ce = np.where(labelled, -log_softmax(s)[np.arange(len(rows)), hard], 0.0)
    t = np.log(view[["p_a", "p_b"]].to_numpy(dtype=float))
    if "logit_a" in view.columns:
        given = view[["logit_a", "logit_b"]].to_numpy(dtype=float)
        t = np.where(np.isfinite(given).all(1)[:, None], given, t)
    temp = cfg.objective.temperature
    log_q, log_p = log_softmax(t / temp), log_softmax(s / temp)
    kd = np.where(labelled, ce, (np.exp(log_q) * (log_q - log_p)).sum(1) * temp**2)
    w = cfg.objective.kl_weight
    ce_term = ce.sum() / labelled.sum()  # each term averages over the rows it counts on (issue 25)
    return {"ce": ce_term, "kl": kd.mean(), "mixed": (1 - w) * ce_term + w * kd.mean()}


@pytest.mark.parametrize(
    "kind,swap,extra,temperature",
    [
        ("ce", False, "pseudo", 1.0),
        ("kl", True, "pseudo", 1.0),
        ("mixed", True, "pseudo", 1.0),
        ("kl", False, "pseudo_logits", 2.0),
        ("mixed", True, "pseudo_logits", 0.25),
    ],
)
def test_first_step_loss_matches_hand_computation(
    loss_setup, qwen_path, tokenizer, kind: str, swap: bool, extra: str, temperature: float
) -> None:
    """Changed with issue 10: CE counts only human labels (pseudo rows once took the teacher's argmax), and the
    temperature divides the teacher's logits as well as the student's. Changed with issue 25: CE averages over
    the labelled rows only (teacher-only rows no longer dilute it)."""
    root, labelled, base = loss_setup
    cfg = TrainConfig.flat(
        model_path=qwen_path,
        load_in_4bit=False,
        train_file=root / "train.parquet",
        extra_files=[str(root / f"{extra}.parquet")],
        out_dir=root / f"{kind}-{extra}-{temperature}",
        val_fold=-1,
        loss=kind,
        kl_weight=0.5,
        temperature=temperature,
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
    frame = pd.concat([labelled, pd.read_parquet(root / f"{extra}.parquet")], ignore_index=True)
    expected = _expected_first_step_loss(frame, swap, base, tokenizer, cfg)
    # the three losses are far enough apart for the check to tell them apart
    assert abs(expected["kl"] - expected["ce"]) > 0.01
    assert result.history["loss"].iloc[0] == pytest.approx(expected[kind], rel=1e-4)
    assert (cfg.data.out_dir / "adapter" / "adapter_model.safetensors").is_file()


# --- numerics: precision choice, non-finite losses (issue 10) ------------------------------------------------
@pytest.mark.parametrize(
    "capability,requested,autocast,scaled",
    [
        ((7, 5), "auto", torch.float16, True),  # T4: no bf16 in hardware; fp16 needs loss scaling
        ((8, 0), "auto", torch.bfloat16, False),  # A100: bf16 has fp32's range, no scaling
        ((9, 0), "auto", torch.bfloat16, False),  # H100/H200
        ((9, 0), "fp16", torch.float16, True),  # rehearsing a T4 on an H100
        ((7, 5), "fp32", None, False),
    ],
)
def test_precision_follows_the_compute_capability(monkeypatch, capability, requested, autocast, scaled) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # not torch.cuda.is_bf16_supported(): it reports emulated bf16 on a T4
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    got = Precision.choose(torch.device("cuda:0"), requested)
    assert (got.autocast, got.scale_loss) == (autocast, scaled)
    assert Precision.choose(torch.device("cpu"), "auto") == Precision(None, False)


def test_trainable_parameters_are_kept_in_fp32() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).half(), torch.nn.Linear(2, 2).half())
    model[0].requires_grad_(False)
    params = trainable_in_fp32(model)
    assert [p.dtype for p in params] == [torch.float32, torch.float32]
    assert model[0].weight.dtype == torch.float16  # the frozen base stays in half precision


def test_non_finite_loss_stops_the_run_naming_step_and_rows(prepared, qwen_path, tmp_path, monkeypatch) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", save_every=0)
    runs, steps = [], []
    setup, step = train_module.setup, train_module.train_step
    monkeypatch.setattr(train_module, "setup", lambda c: runs.append(setup(c)) or runs[-1])
    monkeypatch.setattr(train_module, "train_step", lambda run, e, mb, sw: steps.append(mb) or step(run, e, mb, sw))
    original = step_module.preference_loss
    calls: list[int] = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss  # one micro-batch per step: step 2 is poisoned

    monkeypatch.setattr(step_module, "preference_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        _run(cfg)
    msg = str(err.value)
    expected_ids = [str(i) for i in runs[0].data.row_ids[steps[1][0]]]
    assert "step 2: the loss is nan" in msg and str(expected_ids) in msg, msg
    assert not (cfg.data.out_dir / "adapter").exists() and not (cfg.data.out_dir / "metrics.json").exists()
    # and the weights never took the poisoned gradients: the step raised before backward
    run = runs[0]
    assert run.step == 1 and all(torch.isfinite(p).all() for p in run.params)
    # a model whose weights did go non-finite is never saved as an adapter
    with torch.no_grad():
        run.params[0][0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="no adapter saved"):
        save_adapter(run)
    assert not (cfg.data.out_dir / "adapter").exists()


# --- evaluation during training (issue 10) ---------------------------------------------------------------
def test_shared_run_reports_the_pair_metrics(trained) -> None:
    out = trained.cfg.data.out_dir
    val = trained.result.metrics["val"]
    assert val["nan_rows"] == 0 and 0 <= val["swap_consistency"] < 0.5 and 0 < val["position_bias"] < 1
    assert trained.result.metrics["best"] == {"metric": "log_loss", "step": 90, "evals": 1}
    evals = pd.read_csv(out / "evals.csv")
    assert evals["step"].tolist() == [90]
    assert json.loads((out / "evals.json").read_text())[0]["accuracy"] == pytest.approx(val["accuracy"])
    langs = trained.result.languages
    assert langs["rows"].sum() == val["rows"] and list(langs.columns) == ["language", "rows", "accuracy", "log_loss"]
    assert trained.result.metrics["val_languages"] == langs.to_dict("records")


def test_evaluation_every_n_steps_keeps_the_best_adapter(prepared, qwen_path, tmp_path, monkeypatch) -> None:
    """Evaluations at steps 5, 10, 15 and the last (16); the log loss is forged so that step 5 is the best."""
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, eval_every_steps=5, save_every=0)
    forged = {5: 0.1, 10: 0.5, 15: 0.6, 16: 0.7}
    original = evaluation.validate

    def validate(run, val_df):
        record = original(run, val_df)
        record["metrics"]["log_loss"] = forged[run.step]
        return record

    monkeypatch.setattr(evaluation, "validate", validate)
    result, stdout = _run(cfg)
    out = cfg.data.out_dir
    assert result.metrics["total_steps"] == 16
    assert result.evals["step"].tolist() == [5, 10, 15, 16]
    assert pd.read_csv(out / "evals.csv")["log_loss"].tolist() == [0.1, 0.5, 0.6, 0.7]
    assert result.metrics["best"] == {"metric": "log_loss", "step": 5, "evals": 4}
    assert result.metrics["val"]["log_loss"] == 0.1
    assert "keeping the adapter of step 5" in stdout
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 16 and state["best"]["step"] == 5
    saved = _adapter_weights(out)
    _assert_same_weights(saved, {_saved_key(k, saved): v for k, v in state["best"]["adapter"].items()})
    assert any(not torch.equal(state["adapter"][k], v) for k, v in state["best"]["adapter"].items())
    # the predictions and the calibration belong to the kept adapter
    val = pd.read_parquet(out / "val_predictions.parquet")
    np.testing.assert_allclose(val["p_a"], state["best"]["probs"][:, 0])
    np.testing.assert_allclose(val["p_a_swapped"], state["best"]["probs_swapped"][:, 1])
    assert (out / "adapter" / "calibration.json").is_file()


def _saved_key(key: str, saved: dict) -> str:
    """peft's in-memory state-dict key as written in adapter_model.safetensors (it drops the adapter name)."""
    return key if key in saved else key.replace(".default", "")


def test_row_weights_from_sources_and_a_weight_column() -> None:
    cfg = TrainConfig.flat(source_weights={"lmsys": 0.5, "pseudo": 2.0})
    df = pd.DataFrame({"source": ["lmsys", "pseudo", "wsdm", None]})
    np.testing.assert_allclose(row_weights(cfg.objective, df), [0.5, 2.0, 1.0, 1.0])
    # a weight column wins where it is given
    df["weight"] = [np.nan, 0.25, 3.0, np.nan]
    np.testing.assert_allclose(row_weights(cfg.objective, df), [0.5, 0.25, 3.0, 1.0])
    np.testing.assert_allclose(row_weights(TrainConfig().objective, df.drop(columns="weight")), [1.0] * 4)


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
        with pytest.raises(ValueError, match="fewer than the grad_accum=2 one optimiser step needs") as err:
            _run(cfg)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    # the message names the file, the count and the settings that change it
    msg = str(err.value)
    assert f"{cfg.data.train_file}: 8 training rows make 1 micro-batch(es)" in msg
    assert "lower grad_accum (or max_rows / batch_tokens" in msg
    # in a launch of 2 processes a step needs grad_accum x 2 micro-batches
    lengths = np.full(8, 100)
    one_row_batches = TrainConfig.flat(max_length=256, batch_tokens=256, max_rows=1, grad_accum=3)
    assert schedule_module.steps_per_epoch(one_row_batches.batching, lengths) == 2
    with pytest.raises(ValueError, match="grad_accum=3 x 3 processes = 9 one optimiser step needs.*fewer processes"):
        schedule_module.steps_per_epoch(one_row_batches.batching, lengths, world=3)


def test_val_fold_without_rows_or_of_another_type_is_an_error(prepared, qwen_path, tmp_path) -> None:
    """Both once trained silently with no validation at all."""
    df = pd.read_parquet(prepared["train"])
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=7)
    with pytest.raises(
        schema.DataError, match=r"--val-fold 7 selects no rows; the 'fold' column holds \[0, 1, 2, 3, 4\]"
    ):
        split(cfg)
    df.assign(fold=df["fold"].astype(str)).to_parquet(tmp_path / "text_folds.parquet", index=False)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, train_file=tmp_path / "text_folds.parquet")
    with pytest.raises(schema.DataError, match=r"holds \w+ values \['0', '1', '2', '3', '4'\], not numbers"):
        split(cfg)
    # folds written as floats (a column with gaps) still select their rows
    df.assign(fold=df["fold"].astype(float)).to_parquet(tmp_path / "float_folds.parquet", index=False)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, train_file=tmp_path / "float_folds.parquet")
    assert len(split(cfg)[1]) == int((df["fold"] == 0).sum()) > 0


def test_split_needs_a_fold_column(tmp_path, demo_files, qwen_path) -> None:
    cfg = TrainConfig.flat(
        model_path=qwen_path, train_file=demo_files["train"], out_dir=tmp_path, max_length=256, batch_tokens=1024
    )
    with pytest.raises(schema.DataError, match="no 'fold' column"):
        split(cfg)
    train_df, val_df = split(TrainConfig.flat(**{**config_to_dict(cfg), "val_fold": -1}))
    assert len(train_df) == 600 and len(val_df) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss": "hinge"}, "loss='hinge'"),
        ({"swap_fraction": 1.5}, "swap_fraction"),
        ({"batch_tokens": 100, "max_length": 256}, "batch_tokens >= max_length"),
        ({"epochs": 0}, "epochs > 0"),
        ({"temperature": 0}, "temperature > 0"),
        ({"kl_weight": 1.5}, "kl_weight"),
        ({"best_metric": "f1"}, "best_metric='f1'"),
        ({"eval_every_steps": -1}, "eval_every_steps"),
        ({"source_weights": {"lmsys": -1}}, "source_weights"),
    ],
)
def test_config_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.flat(**kwargs)


# --- GPU memory safety (issue 10) ------------------------------------------------------------------------
def test_first_step_holds_the_largest_micro_batches() -> None:
    """A run that does not fit fails in its first step; the epochs after keep their plain shuffled order."""
    cfg = TrainConfig.flat(max_length=256, batch_tokens=1024, max_rows=8, seed=3)
    lengths = np.random.default_rng(0).integers(20, 256, size=300)
    _, batches = schedule_module.epoch_batches(cfg.batching, lengths, 0, per_step=3)
    padded = [len(b) * int(lengths[b].max()) for b in batches]
    assert padded[:3] == sorted(padded, reverse=True)[:3]
    # the same batches, every row once, as the plain shuffle had them apart from the three moved to the front
    plain = token_budget_batches(lengths, 1024, 8, shuffle=True, seed=cfg.schedule.seed)
    assert sorted(map(tuple, batches)) == sorted(map(tuple, plain))
    rest = [tuple(b) for b in batches[3:]]
    assert rest == [tuple(b) for b in plain if tuple(b) not in set(map(tuple, batches[:3]))]
    _, later = schedule_module.epoch_batches(cfg.batching, lengths, 1, per_step=3)
    assert [tuple(b) for b in later] == [
        tuple(b) for b in token_budget_batches(lengths, 1024, 8, shuffle=True, seed=cfg.schedule.seed + 1)
    ]
    # the schedule is deterministic: a resumed run replays the same steps
    first = list(itertools.islice(schedule_module.schedule(cfg.batching, lengths, world=1), 5))
    again = list(itertools.islice(schedule_module.schedule(cfg.batching, lengths, world=1), 5))
    assert all(np.array_equal(a, b) for x, y in zip(first, again, strict=True) for a, b in zip(x[2], y[2], strict=True))


class _RaiseInBackward(torch.autograd.Function):
    """Identity forward; its backward raises as CUDA does, once the layers above it have added their gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class OutOfMemoryAbove:
    """Makes a model run out of memory, like a GPU does, on micro-batches above ``limit`` padded tokens: in the
    forward, or in the backward below the first decoder layer (after the head and the upper layers' LoRA weights
    received their gradients, which the retry must not count twice)."""

    def __init__(self, model: torch.nn.Module, limit: int, where: str) -> None:
        self.limit, self.where, self.sizes = limit, where, []
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        layer.register_forward_hook(self._after_first_layer)

    def _too_big(self) -> bool:
        return self.sizes[-1] > self.limit

    def _before(self, module, args, kwargs):
        self.sizes.append(kwargs["input_ids"].numel())
        if self.where == "forward" and self._too_big():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def _after_first_layer(self, module, args, output):
        if self.where != "backward" or not self._too_big():
            return output
        if isinstance(output, tuple):
            return (_RaiseInBackward.apply(output[0]), *output[1:])
        return _RaiseInBackward.apply(output)


def _first_step(cfg: TrainConfig, limit: int | None = None, where: str = "forward"):
    """A fresh run (same seed: same initial weights) and its first optimiser step, the model failing above ``limit``."""
    with contextlib.redirect_stdout(io.StringIO()):
        run = train_module.setup(cfg)
    fake = OutOfMemoryAbove(run.model, limit, where) if limit else None
    epoch, swapped, micro_batches = next(schedule_module.schedule(cfg.batching, run.data.lengths))
    run.initial = [p.detach().clone() for p in run.params]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        row = train_module.train_step(run, epoch, micro_batches, swapped)
    return run, row, micro_batches, fake, buf.getvalue()


@pytest.fixture(scope="module")
def unsplit_step(prepared, qwen_path, tmp_path_factory):
    """The first step of a tiny run of 2 micro-batches a step, with all the memory it wants."""
    return _first_step(_tiny_cfg(prepared, qwen_path, tmp_path_factory.mktemp("unsplit"), grad_accum=2, save_every=0))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_micro_batches_are_split_and_the_step_is_unchanged(
    unsplit_step, prepared, qwen_path, tmp_path, where
) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", grad_accum=2, save_every=0)
    ref_run, ref_row, micro_batches, _, _ = unsplit_step
    sizes = [len(b) * int(ref_run.data.lengths[b].max()) for b in micro_batches]
    assert min(len(b) for b in micro_batches) >= 4  # both halve
    limit = min(sizes) - 1  # both micro-batches of the step run out of memory; their halves fit
    run, row, _, fake, stdout = _first_step(cfg, limit, where)
    assert stdout.count(f"step 1: out of memory in the {where} of") == 2, stdout
    assert "retrying it as" in stdout and "lower batch_tokens" in stdout
    # each micro-batch tried once, then its two halves
    assert [size > limit for size in fake.sizes] == [True, False, False, True, False, False], fake.sizes
    # the same step: the loss, its gradient (the norm) and the weights after it
    assert row["loss"] == pytest.approx(ref_row["loss"], rel=1e-5)
    assert row["grad_norm"] == pytest.approx(ref_row["grad_norm"], rel=1e-4)
    assert (row["rows"], row["tokens"]) == (ref_row["rows"], ref_row["tokens"])
    for p, q in zip(run.params, ref_run.params, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    # the step moved them (not lora_A yet: its gradient is 0 while lora_B starts at 0)
    assert sum(not torch.equal(p, q) for p, q in zip(run.params, run.initial, strict=True)) >= len(run.params) // 2


def test_a_row_that_does_not_fit_alone_stops_the_run(prepared, qwen_path, tmp_path) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", save_every=0)
    with pytest.raises(TrainMemoryError) as err:
        _first_step(cfg, limit=10, where="backward")
    msg = str(err.value)
    assert "step 1: out of memory in the backward of 1 row(s) x" in msg and "one row alone does not fit" in msg
    assert "gradient_checkpointing = true (now False)" in msg and "batch_tokens=1024" in msg


# --- packed micro-batches ----------------------------------------------------------------------------------
def test_packed_training_equals_padded_training_row_for_row(prepared, qwen_path, tmp_path) -> None:
    # one row per micro-batch: both batchers yield the same rows in the same order, so only the forward differs
    kw = dict(max_rows=1, max_train_rows=24, save_every=0)
    padded, _ = _run(_tiny_cfg(prepared, qwen_path, tmp_path / "padded", **kw))
    packed, _ = _run(_tiny_cfg(prepared, qwen_path, tmp_path / "packed", packing=True, **kw))
    assert len(packed.history) == 24
    pd.testing.assert_frame_equal(packed.history[["rows", "tokens"]], padded.history[["rows", "tokens"]])
    np.testing.assert_allclose(packed.history["loss"], padded.history["loss"], rtol=1e-5)
    a, b = _adapter_weights(tmp_path / "packed"), _adapter_weights(tmp_path / "padded")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_packs_fill_the_token_budget_without_padding(reference_run, prepared, qwen_path, tmp_path) -> None:
    ref_cfg, ref = reference_run
    result, _ = _run(_tiny_cfg(prepared, qwen_path, tmp_path, packing=True, save_every=0))
    hist = result.history
    assert (hist["tokens"] <= ref_cfg.optim.batch_tokens).all()
    assert hist["rows"].sum() == ref.history["rows"].sum() == 96  # every row once, in fewer micro-batches
    assert len(hist) < len(ref.history)
    assert hist["tokens"].iloc[0] == hist["tokens"].max()  # the largest pack runs first
    assert np.isfinite(hist["loss"]).all()


def test_a_4bit_run_without_the_fp32_residual_trains_and_records_it(prepared, qwen_path, tmp_path) -> None:
    """fp32_residual=false reaches the loader (embeddings and norms stay bf16, the head fp32), a step trains (finite
    loss, LoRA B and the head move) and train_config.json records it and rebuilds the same config."""
    cfg = _tiny_cfg(
        prepared, qwen_path, tmp_path, load_in_4bit=True, dtype="bf16", fp32_residual=False, max_train_rows=16
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run = train_module.setup(cfg)
    base = run.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == base.model.norm.weight.dtype == torch.bfloat16
    trained = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    before = {n: p.detach().clone() for n, p in trained.items()}
    epoch, swapped, micro_batches = next(schedule_module.schedule(cfg.batching, run.data.lengths))
    row = train_module.train_step(run, epoch, micro_batches, swapped)
    assert np.isfinite(row["loss"]) and not row["skipped"]
    moved = {n for n, p in trained.items() if not torch.equal(p, before[n])}
    # LoRA A gets no gradient while B is still zero (step 1); every B and the head do
    assert moved == {n for n in trained if "lora_B" in n or "score" in n} and len(moved) == 14 + 1
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["fp32_residual"] is False and TrainConfig.flat(**saved) == cfg


# --- numerics: a bad step is never applied, a weightless row never batched -------------------------------------------


def _poison_gradients(run, steps: set[int]) -> None:
    """Make the head's gradient NaN (the loss stays finite) during the backward of the given steps (1-based)."""
    head = run.params[-1]
    head.register_hook(lambda g: torch.full_like(g, float("nan")) if run.step + 1 in steps else g)


def test_a_non_finite_gradient_is_skipped_and_never_applied(prepared, qwen_path, tmp_path) -> None:
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", save_every=0)
    with contextlib.redirect_stdout(io.StringIO()):
        run = train_module.setup(cfg)
    _poison_gradients(run, {2})
    steps = schedule_module.schedule(cfg.batching, run.data.lengths)
    rows, before = [], None
    for _ in range(3):
        epoch, swapped, micro_batches = next(steps)
        if run.step == 1:
            before = [p.detach().clone() for p in run.params]
        rows.append(train_module.train_step(run, epoch, micro_batches, swapped))
        if run.step == 2:  # the poisoned step left every weight as it was, and finite
            for p, q in zip(run.params, before, strict=True):
                assert torch.equal(p, q) and torch.isfinite(p).all()
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert all(np.isfinite(r["loss"]) for r in rows) and not np.isfinite(rows[1]["grad_norm"])
    assert run.scheduler.last_epoch == 3  # the schedule went on through the skipped step


def test_a_run_of_non_finite_gradients_stops_naming_the_step(prepared, qwen_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(step_module, "MAX_SKIPPED_IN_A_ROW", 3)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", save_every=0)
    with contextlib.redirect_stdout(io.StringIO()):
        run = train_module.setup(cfg)
    _poison_gradients(run, {1, 2, 3, 4})
    steps = schedule_module.schedule(cfg.batching, run.data.lengths)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the gradient was not finite at 3 steps in a row"):
        for _ in range(4):
            epoch, swapped, micro_batches = next(steps)
            train_module.train_step(run, epoch, micro_batches, swapped)
    assert not (tmp_path / "run" / "adapter").exists()


def test_rows_of_weight_zero_are_left_out_before_batching(prepared, qwen_path, tmp_path, capsys) -> None:
    df = pd.read_parquet(prepared["train"])
    df["weight"] = np.where(np.arange(len(df)) % 3 == 0, 0.0, 1.0)
    path = tmp_path / "weighted.parquet"
    df.to_parquet(path, index=False)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", train_file=path, max_train_rows=0)
    fmt = PromptFormatter(load_tokenizer(qwen_path), cfg.inputs)
    data, _ = training_rows(cfg, fmt)
    assert len(data) == int((df["weight"] > 0).sum()) and (data.weight > 0).all()
    assert f"{int((df['weight'] == 0).sum()):,} training rows weigh 0" in capsys.readouterr().out


# --- the time budget holds the evaluations too -----------------------------------------------------------------------


class FakeClock:
    """Seconds that pass only when the test says: 4 a training step, a fixed cost per token scored."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_first_evaluation_is_priced_in_the_budget_before_it_runs(prepared, qwen_path, tmp_path, monkeypatch):
    """A run whose only evaluation is slow ends inside its budget, the evaluation included (the first evaluation was
    free before: training used the whole budget, then the evaluation ran past it), on a subset of the held-out
    rows when the whole fold would take over a fifth of the budget."""
    clock, per_token = FakeClock(), 5e-4
    monkeypatch.setattr(time, "monotonic", clock)  # steps, evaluations and the price read it
    monkeypatch.setattr(train_module, "Deadline", lambda seconds: Deadline(seconds, clock=clock))
    real_scores, real_step = evaluation.scores, train_module.train_step

    def slow_scores(run, df, desc):
        clock.now += per_token * sum(len(ids) for ids in run.fmt.encode(df))
        return real_scores(run, df, desc)

    def slow_step(run, *args):
        row = real_step(run, *args)
        clock.now += 4.0
        return row | {"seconds": 4.0}

    for module in (evaluation, eval_cost):
        monkeypatch.setattr(module, "scores", slow_scores)
    monkeypatch.setattr(train_module, "train_step", slow_step)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, time_budget_minutes=1.0, save_every=0)
    result, stdout = _run(cfg)
    assert result.metrics["stopped_by_budget"] and clock.now <= 60.0, (clock.now, stdout)
    held_out = int((pd.read_parquet(prepared["train"])["fold"] == 0).sum())
    assert "over a fifth of the 1-min budget: evaluating" in stdout and result.metrics["val_rows"] < held_out
    assert result.evals["val_rows"].tolist() == [result.metrics["val_rows"]]


def test_a_base_folder_without_its_tokenizer_is_refused_before_training(qwen_path, prepared, tmp_path) -> None:
    """transformers builds an empty tokenizer from config.json alone (every row a few unknown ids): refused, named."""
    base = tmp_path / "base"
    base.mkdir()
    for f in qwen_path.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (base / f.name).symlink_to(f)
    with pytest.raises(ModelFilesError, match=r"base model folder .*base has no tokenizer"):
        train_module.setup(_tiny_cfg(prepared, base, tmp_path / "run"))


# --- ids are the join key: nothing held out is trained on, nothing appended twice ------------------------------------


def test_extras_that_are_held_out_or_training_rows_are_left_out_and_counted(prepared, qwen_path, tmp_path, capsys):
    """Teacher labels of the labelled rows passed as extras once trained on all 245 held-out rows and appended 955
    training rows a second time: rows with an id of either, or their texts under another id (either A/B order),
    are left out and counted."""
    df = pd.read_parquet(prepared["train"])
    val, rest = df[df["fold"] == 0], df[df["fold"] != 0]
    fresh = rest.head(5).assign(id=lambda d: d["id"].astype(str) + "-new", prompt=lambda d: d["prompt"] + " (new)")
    copied = schema.swap_ab(val.tail(3)).assign(id=lambda d: d["id"].astype(str) + "-copy")  # same texts, new ids
    extras = pd.concat([val.head(4), rest.head(6), copied, fresh]).drop(columns=["winner", "fold"])
    extras = extras.assign(p_a=0.7, p_b=0.3)
    extras.to_parquet(tmp_path / "extras.parquet", index=False)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, max_train_rows=0,
                    extra_files=[str(tmp_path / "extras.parquet")])  # fmt: skip
    train_df, val_df = split(cfg)
    assert "extra rows left out (same id or same texts): 7 in the validation fold, 6 in the training rows" in (
        capsys.readouterr().out
    )
    assert not set(train_df["id"].astype(str)) & set(val_df["id"].astype(str))
    assert len(train_df) == len(rest) + 5 and train_df["id"].is_unique
    # extras_only: the labelled rows only validate, so only held-out rows are left out
    train_df, _ = split(cfg.replace(extras_only=True))
    assert sorted(train_df["id"].astype(str)) == sorted([*rest.head(6)["id"].astype(str), *fresh["id"]])


def test_out_of_fold_teacher_logits_are_joined_onto_the_rows_by_id(prepared, qwen_path, tmp_path, capsys) -> None:
    df = pd.read_parquet(prepared["train"])
    rng = np.random.default_rng(0)
    oof = df.sample(frac=0.5, random_state=1)  # half the rows, shuffled
    oof = oof.assign(logit_a=rng.normal(size=len(oof)), logit_b=rng.normal(size=len(oof)))
    unknown = oof.head(2).assign(id=["x1", "x2"])
    pd.concat([oof, unknown]).to_parquet(tmp_path / "oof.parquet", index=False)
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", val_fold=0, max_train_rows=0,
                    teacher_files=[str(tmp_path / "oof.parquet")])  # fmt: skip
    train_df, val_df = split(cfg)
    assert len(train_df) + len(val_df) == len(df)  # joined, never appended
    got = train_df.set_index("id")[["logit_a", "logit_b"]]
    want = oof.set_index("id")[["logit_a", "logit_b"]]
    shared = got.index.intersection(want.index)
    assert len(shared) > 0 and got.loc[~got.index.isin(want.index), "logit_a"].isna().all()
    np.testing.assert_allclose(got.loc[shared].to_numpy(), want.loc[shared].to_numpy(), rtol=1e-6)
    assert (
        f"logits joined by id onto {len(oof):,} of {len(df):,} rows (2 of their ids unknown)" in capsys.readouterr().out
    )
    # a teacher file that shows a row the other way round is refused: its logits would be swapped
    schema.swap_ab(oof.head(3)).to_parquet(tmp_path / "flipped.parquet", index=False)
    with pytest.raises(schema.DataError, match="shows another response A"):
        split(cfg.replace(teacher_files=[str(tmp_path / "flipped.parquet")]))


def test_a_step_whose_rows_all_weigh_zero_is_skipped(prepared, qwen_path, tmp_path) -> None:
    """A step of total weight 0 (its loss would be 0 / 0) runs no backward and changes no weight; the schedule goes
    on (the train stage leaves such rows out before batching; a step of them is still never taken as NaN)."""
    cfg = _tiny_cfg(prepared, qwen_path, tmp_path / "run", save_every=0)
    with contextlib.redirect_stdout(io.StringIO()):
        run = train_module.setup(cfg)
    epoch, swapped, micro_batches = next(schedule_module.schedule(cfg.batching, run.data.lengths))
    run.data.weight[np.concatenate(micro_batches)] = 0.0
    before = [p.detach().clone() for p in run.params]
    row = train_module.train_step(run, epoch, micro_batches, swapped)
    assert row["skipped"] and row["loss"] == 0.0 and run.step == 1 and run.skipped_in_a_row == 0
    assert all(torch.equal(p, q) for p, q in zip(run.params, before, strict=True))
