"""kaggle_utils.infer as a hostile rerun would try it: bad rows, broken models, out-of-memory batches, a dying GPU
thread, slow models near the deadline, nonsense start times, and a kill halfway. A submission comes out every time."""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_utils import infer as infer_module
from kaggle_utils.infer import InferConfig, InferenceError, check_started_at, infer
from kaggle_utils.inference import roles
from kaggle_utils.kaggle import env
from kaggle_utils.models.loading import ModelFilesError, check_model_dir

# runs the inference stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

MAX_LENGTH = 256


def _cfg(test_file: Path, out_dir: Path, qwen_path: Path, adapter: Path, **kw) -> InferConfig:
    params = dict(
        test_file=test_file,
        out_dir=out_dir,
        max_length=MAX_LENGTH,
        batch_tokens=2048,
        max_rows=16,
        primary_model=qwen_path,
        primary_adapter=adapter,
        checkpoint_seconds=0.0,
        tta_fraction=0.0,
    )
    return InferConfig.flat(**{**params, **kw})


def _report(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text())


class Wrapped(torch.nn.Module):
    """A loaded model with a behaviour injected around its forward (and its own device for model_device)."""

    def __init__(self, model, before_forward):
        super().__init__()
        self.model, self.before_forward = model, before_forward

    def forward(self, **enc):
        self.before_forward(enc["input_ids"])
        return self.model(**enc)


def wrap_loads(monkeypatch, before_forward=None, on_load=None) -> list[str]:
    """Every load_classifier call of the cascade's roles returns a Wrapped model; ``on_load(n, device)`` runs first."""
    original, loads = roles.load_classifier, []

    def load(cfg, pad_id, adapter=None, **kw):
        loads.append(cfg.device)
        if on_load is not None:
            on_load(len(loads), cfg.device)
        model = original(cfg, pad_id, adapter=adapter, **kw)
        return Wrapped(model, before_forward) if before_forward else model

    monkeypatch.setattr(roles, "load_classifier", load)
    return loads


@pytest.fixture(scope="module")
def adapter(trained) -> Path:
    return trained.result.adapter_dir


@pytest.fixture(scope="module")
def reference(competition_test, demo_files, qwen_path, adapter, tmp_path_factory) -> pd.DataFrame:
    """An uninterrupted primary-only run: the predictions the guarded runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return infer(_cfg(demo_files["test"], out, qwen_path, adapter))


def test_a_hostile_test_file_still_gets_one_row_per_id_exactly_as_read(
    competition_test, qwen_path, adapter, tmp_path
) -> None:
    rows = competition_test.head(8).copy()
    rows["id"] = ["007", "0", "99999999999999999999999", "-3", "a,b", "null", "00012", "7.50"]
    rows.loc[1, "prompt"] = ""
    rows.loc[2, "response_a"] = "N/A"
    rows.loc[3, "response_b"] = "null"
    path = tmp_path / "test.csv"
    rows.to_csv(path, index=False)
    text = path.read_text().replace(rows.loc[4, "response_a"], "", 1)  # an empty (missing) field in the CSV
    path.write_text(text)
    pq = tmp_path / "test.parquet"
    odd = competition_test.head(4).astype({"prompt": object, "response_a": object})
    odd.loc[0, "prompt"], odd.loc[1, "response_a"] = None, float("nan")
    odd.to_parquet(pq, index=False)

    infer(_cfg(path, tmp_path / "csv", qwen_path, adapter))
    sub = (tmp_path / "csv" / "submission.csv").read_text().splitlines()
    written_ids = [line.rsplit(",", 1)[0] for line in sub[1:]]
    assert written_ids == ["007", "0", "99999999999999999999999", "-3", '"a,b"', "null", "00012", "7.50"]
    assert all(line.endswith((",model_a", ",model_b")) for line in sub[1:])
    assert _report(tmp_path / "csv")["fallback_rows"] == 0

    pred = infer(_cfg(pq, tmp_path / "pq", qwen_path, adapter))
    report = _report(tmp_path / "pq")
    assert report["repairs"] == {"prompt: missing -> empty text": 1, "response_a: missing -> empty text": 1}
    assert pred["id"].tolist() == odd["id"].tolist() and (pred["source"] == "primary").all()


def test_a_file_that_cannot_be_a_test_file_is_refused_before_any_model_loads(
    competition_test, qwen_path, adapter, tmp_path, monkeypatch
) -> None:
    loads = wrap_loads(monkeypatch)
    path = tmp_path / "test.parquet"
    competition_test.drop(columns="response_b").to_parquet(path)
    with pytest.raises(ValueError, match="not a test file: missing column"):
        infer(_cfg(path, tmp_path / "out", qwen_path, adapter))
    assert loads == []


def test_a_broken_secondary_still_gives_the_primarys_submission(
    reference, demo_files, qwen_path, gemma_path, adapter, tmp_path
) -> None:
    broken = tmp_path / "gemma-copy"
    shutil.copytree(gemma_path, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # a truncated upload
    cfg = _cfg(demo_files["test"], tmp_path / "out", qwen_path, adapter, secondary_model=broken)
    pred = infer(cfg)
    report = _report(tmp_path / "out")
    assert (pred["source"] == "primary").all() and report["fallback_rows"] == 0
    np.testing.assert_array_equal(pred[["p_a", "p_b"]].to_numpy(), reference[["p_a", "p_b"]].to_numpy())
    (error,) = report["errors"]
    assert "model.safetensors: unreadable weights" in error and "copy the file again" in error
    # fail_soft off (development): the same run raises, but only after the submission is written
    (tmp_path / "out2").mkdir()
    with pytest.raises(InferenceError, match="unreadable weights"):
        infer(_cfg(demo_files["test"], tmp_path / "out2", qwen_path, adapter, secondary_model=broken, fail_soft=False))
    assert len(pd.read_csv(tmp_path / "out2" / "submission.csv")) == len(reference)


@pytest.mark.parametrize("missing", ["secondary", "primary"])
def test_a_model_that_is_not_attached_costs_its_rows_not_the_submission(
    reference, demo_files, qwen_path, gemma_path, adapter, tmp_path, capsys, missing
) -> None:
    """Notebook 04 on Kaggle with a model not attached (Gemma is consent-gated): the recipe's path is kept when the
    search finds nothing (kaggle.env.locate_soft), and the stage reports it and goes on without that model."""
    where = env.Environment("kaggle-batch", tmp_path / "input", tmp_path / "working")
    (tmp_path / "input").mkdir()
    absent = env.locate_soft("/kaggle/input/gemma-2/transformers/9b/2", where, env.locate_model)
    assert (
        absent == Path("/kaggle/input/gemma-2/transformers/9b/2")
        and "WARNING: no model folder" in capsys.readouterr().out
    )
    models = {"primary_model": qwen_path, "secondary_model": gemma_path} | {f"{missing}_model": absent}
    pred = infer(_cfg(demo_files["test"], tmp_path / "out", qwen_path, adapter, **models))
    report = _report(tmp_path / "out")
    assert any(str(absent) in e and "does not exist" in e for e in report["errors"])
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert submission["id"].tolist() == reference["id"].tolist()
    if missing == "secondary":  # primary-only, as if no secondary had been asked for
        assert (pred["source"] == "primary").all()
        np.testing.assert_array_equal(pred[["p_a", "p_b"]].to_numpy(), reference[["p_a", "p_b"]].to_numpy())
    else:  # no model at all: the stated fallback for every row, a complete submission all the same
        assert (pred["source"] == "fallback").all() and report["fallback_rows"] == len(reference)


def test_model_folders_are_checked_with_the_path_and_the_fix(qwen_path, tmp_path) -> None:
    with pytest.raises(ModelFilesError, match=r"typo-qwen does not exist: attach the model"):
        check_model_dir(tmp_path / "typo-qwen")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(qwen_path, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(ModelFilesError, match="has no tokenizer"):
        check_model_dir(no_tok)


def test_out_of_memory_batches_are_split_and_every_row_scored(
    reference, demo_files, qwen_path, adapter, tmp_path, monkeypatch
) -> None:
    """Batches above 600 tokens raise torch.OutOfMemoryError: they are halved until they fit."""

    def oom_above(input_ids):
        if input_ids.numel() > 600:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    wrap_loads(monkeypatch, before_forward=oom_above)
    pred = infer(_cfg(demo_files["test"], tmp_path, qwen_path, adapter))
    report = _report(tmp_path)
    assert (pred["source"] == "primary").all() and report["primary"]["oom"]["oom_splits"] > 0
    np.testing.assert_allclose(pred[["p_a", "p_b"]].to_numpy(), reference[["p_a", "p_b"]].to_numpy(), atol=1e-5)


def test_a_thread_that_dies_leaves_its_work_to_the_other_device(
    reference, demo_files, qwen_path, adapter, tmp_path, monkeypatch
) -> None:
    def second_copy_fails(n, device):
        if n == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    wrap_loads(monkeypatch, on_load=second_copy_fails)
    pred = infer(_cfg(demo_files["test"], tmp_path, qwen_path, adapter, devices="cpu,cpu"))
    report = _report(tmp_path)
    assert (pred["source"] == "primary").all()
    assert any("loading failed" in e and "illegal memory access" in e for e in report["errors"])
    np.testing.assert_allclose(pred[["p_a", "p_b"]].to_numpy(), reference[["p_a", "p_b"]].to_numpy(), atol=1e-5)


class FakeClock:
    """Simulated wall clock for the deadline: it moves only when a model 'works', so setup costs nothing."""

    def __init__(self) -> None:
        self.now = 2_000_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(infer_module, "Deadline", functools.partial(infer_module.Deadline, clock=fake))
    return fake


def test_a_slow_model_stops_before_the_deadline(demo_files, qwen_path, adapter, tmp_path, monkeypatch, clock) -> None:
    wrap_loads(monkeypatch, before_forward=lambda ids: clock.advance(4.0))  # 4 s a batch
    start = clock.now
    cfg = _cfg(demo_files["test"], tmp_path, qwen_path, adapter, time_budget_minutes=1.0, reserve_minutes=0.5)
    infer(cfg)
    report = _report(tmp_path)
    assert clock.now - start <= 30.0, "the run passed its deadline"
    assert report["primary"]["stopped_by_deadline"] and 0 < report["primary"]["scored"] < report["rows"]
    assert report["fallback_rows"] == report["rows"] - report["primary"]["scored"]


def test_a_slow_first_batch_is_counted_before_it_starts(
    demo_files, qwen_path, adapter, tmp_path, monkeypatch, clock
) -> None:
    """29 of 30 s go to loading; a forward takes 3 s. The prior (200 tokens/s) prices even one row past the 1 s
    left, so nothing starts: the run ends in time with the fallback."""
    wrap_loads(monkeypatch, before_forward=lambda ids: clock.advance(3.0), on_load=lambda n, d: clock.advance(29.0))
    start = clock.now
    cfg = _cfg(demo_files["test"], tmp_path, qwen_path, adapter, time_budget_minutes=1.0, reserve_minutes=0.5)
    infer(cfg)
    report = _report(tmp_path)
    assert clock.now - start <= 30.0, "the first batch ran past the deadline"
    assert report["primary"]["scored"] == 0 and report["fallback_rows"] == report["rows"]


def test_the_first_batch_is_cut_to_the_time_left(demo_files, qwen_path, adapter, tmp_path, monkeypatch, clock) -> None:
    """10 s left after loading; the model does 1,000 tokens/s, the prior says 200. A whole first batch (2,048
    tokens) is priced at 15 s, so it used to wait for ever and score nothing; cut to what the prior lets fit, it
    runs, the speed is measured, and the rows go on being scored until the deadline."""
    wrap_loads(
        monkeypatch,
        before_forward=lambda ids: clock.advance(1e-3 * ids.numel()),
        on_load=lambda n, d: clock.advance(20.0),
    )
    start = clock.now
    cfg = _cfg(demo_files["test"], tmp_path, qwen_path, adapter, time_budget_minutes=1.0, reserve_minutes=0.5)
    infer(cfg)
    report = _report(tmp_path)
    assert clock.now - start <= 30.0, "the run passed its deadline"
    assert report["primary"]["scored"] > 3 * cfg.budget.max_rows, report["primary"]


def test_a_slow_first_forward_does_not_end_the_pass(demo_files, qwen_path, adapter, tmp_path, monkeypatch, clock):
    """The first forward takes 40 s more (a warm-up); then 1,000 tokens/s. The 9 s left after it are less than a
    whole batch's price by the prior, but the pieces cut to fit measure the real speed and scoring goes on."""
    forwards = []

    def forward(ids):
        forwards.append(ids.numel())
        clock.advance(1e-3 * ids.numel() + (40.0 if len(forwards) == 1 else 0.0))

    wrap_loads(monkeypatch, before_forward=forward)
    start = clock.now
    cfg = _cfg(demo_files["test"], tmp_path, qwen_path, adapter, time_budget_minutes=1.0, reserve_minutes=0.15)
    infer(cfg)
    report = _report(tmp_path)
    assert clock.now - start <= 51.0, "the run passed its deadline"
    # it used to stop after the first batch: 9 s left, and a whole batch priced at 15 s by the prior
    assert report["primary"]["scored"] > 2 * cfg.budget.max_rows, (report["primary"], forwards)


def test_a_slow_secondary_load_is_left_behind_at_the_deadline(
    demo_files, qwen_path, gemma_path, adapter, tmp_path, monkeypatch
) -> None:
    """Real time: the secondary's copy takes 60 s to load and the run has 12 s; waiting stops at the deadline."""

    def slow_second_model(n, device):
        if n == 2:
            time.sleep(60.0)

    wrap_loads(monkeypatch, on_load=slow_second_model)
    started = time.time()
    cfg = _cfg(
        demo_files["test"],
        tmp_path,
        qwen_path,
        adapter,
        secondary_model=gemma_path,
        started_at=started,
        time_budget_minutes=0.25,
        reserve_minutes=0.05,
        first_batch_seconds_per_token=1e-4,  # the tiny model's speed: the prior gates the first batches
    )
    infer(cfg)
    report = _report(tmp_path)
    assert time.time() - started <= 12 + 2.0, "waiting for the slow load passed the deadline"
    assert report["sources"] == {"primary": report["rows"]} and report["secondary"]["scored"] == 0


@pytest.mark.parametrize(
    "started_at,match",
    [(time.time() * 1000, "looks like milliseconds"), (time.time() + 3600, "in the future"), (12.0, "before 2001")],
    ids=["milliseconds", "future", "epoch-start"],  # not the values: each pytest-xdist worker must collect the same ids
)
def test_a_started_at_that_cannot_be_a_start_time_is_refused(started_at, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_started_at(started_at)
    with pytest.raises(ValueError, match=match):
        InferConfig.flat(started_at=started_at)
    with pytest.raises(ValueError, match="devices is empty"):
        InferConfig.flat(devices="")


class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no guard catches it."""


def test_kill_and_rerun_gives_identical_predictions(
    reference, demo_files, qwen_path, adapter, tmp_path, monkeypatch
) -> None:
    calls = []

    def killed_after_three(input_ids):
        calls.append(1)
        if len(calls) > 3:
            raise Killed

    wrap_loads(monkeypatch, before_forward=killed_after_three)
    cfg = _cfg(demo_files["test"], tmp_path, qwen_path, adapter)
    infer(cfg)
    assert 0 < _report(tmp_path)["sources"].get("primary", 0) < len(reference)
    monkeypatch.undo()
    pred = infer(cfg)
    report = _report(tmp_path)
    assert report["primary"]["resumed_batches"] == 3
    np.testing.assert_array_equal(pred[["p_a", "p_b"]].to_numpy(), reference[["p_a", "p_b"]].to_numpy())


def test_the_adapters_fitted_temperature_and_blend_are_applied(
    reference, demo_files, qwen_path, gemma_path, adapter, tmp_path
) -> None:
    from kaggle_utils.evaluation.calibration import Blend, Calibration, margin

    calibrated = tmp_path / "adapter"
    shutil.copytree(adapter, calibrated)
    Calibration(temperature=2.0, rows=500, reason="fitted").save(calibrated / "calibration.json")
    pred = infer(_cfg(demo_files["test"], tmp_path / "t2", qwen_path, calibrated))
    ref = reference[["p_a", "p_b"]].to_numpy()
    assert _report(tmp_path / "t2")["calibration"]["primary"]["temperature"] == 2.0
    # the reference ran with the temperature the train stage fitted (adapter/calibration.json): undo it, apply T=2
    fitted = Calibration.load(adapter / "calibration.json").temperature
    assert fitted != 1.0
    np.testing.assert_allclose(margin(pred[["p_a", "p_b"]].to_numpy()), margin(ref) * fitted / 2.0, atol=1e-4)
    # a blend.json beside the secondary adapter wins over secondary_weight: weight 1 keeps the secondary alone
    gemma_adapter = tmp_path / "gemma-adapter"
    shutil.copytree(adapter, gemma_adapter)  # any adapter file set; the secondary base is the tiny Qwen2 again
    Blend(weight=1.0, reason="fitted").save(gemma_adapter / "blend.json")
    out = tmp_path / "blend"
    pred = infer(
        _cfg(
            demo_files["test"],
            out,
            qwen_path,
            adapter,
            secondary_model=qwen_path,
            secondary_adapter=gemma_adapter,
            secondary_weight=0.3,
        )
    )
    report = _report(out)
    assert report["blend"]["weight"] == 1.0 and report["blend"]["reason"] == "fitted"
    assert "unknown adapter weights" in report["blend"]["fingerprint"] and (pred["source"] == "blend").all()
    # the train stage's calibration.json records the weights it was fitted for: the copied adapter has them too
    assert report["calibration"]["primary"]["fingerprint"] == "fitted for these adapter weights"
    # weight 1: the secondary alone, at the blend's temperature 1 (the same model and adapter as the reference)
    np.testing.assert_allclose(margin(pred[["p_a", "p_b"]].to_numpy()), margin(ref) * fitted, atol=1e-3)


def test_the_planned_cascade_ends_before_the_deadline_with_optional_work(
    demo_files, qwen_path, gemma_path, adapter, tmp_path, monkeypatch, clock
) -> None:
    """Simulated clock, 2 s a batch and 5 s a load: the primary on every row, then swapped view and secondary as
    far as the plan allows; the run ends before the deadline and leaves no row to the fallback."""
    wrap_loads(monkeypatch, before_forward=lambda ids: clock.advance(2.0), on_load=lambda n, d: clock.advance(5.0))
    start = clock.now
    cfg = _cfg(
        demo_files["test"],
        tmp_path,
        qwen_path,
        adapter,
        secondary_model=gemma_path,
        tta_fraction=0.5,
        time_budget_minutes=1.5,
        reserve_minutes=0.5,
        first_batch_seconds_per_token=2.0 / 2048,  # the simulated speed: 2 s for a full batch
    )
    pred = infer(cfg)
    report = _report(tmp_path)
    assert clock.now - start <= 60.0, f"ended {clock.now - start - 60:.0f} s past the deadline"
    assert report["fallback_rows"] == 0 and report["primary"]["scored"] == report["rows"]
    optional = report.get("tta", {}).get("scored", 0) + report.get("secondary", {}).get("scored", 0)
    assert 0 < optional < report["rows"] * 1.5, "the plan should fit some, not all, optional work"
    assert report["plans"] and set(pred["source"]) <= {"primary", "primary+tta", "blend", "blend+tta"}


def test_a_model_that_fits_no_device_is_refused_before_loading(
    demo_files, qwen_path, adapter, tmp_path, monkeypatch
) -> None:
    """Memory limits as if the CPU were a card too small for the weights: an error with the fix, no load, and the
    fallback submission."""
    loads = wrap_loads(monkeypatch)
    monkeypatch.setattr(roles, "device_limits", lambda devices: dict.fromkeys(devices, 1_000_000))
    pred = infer(_cfg(demo_files["test"], tmp_path, qwen_path, adapter))
    report = _report(tmp_path)
    assert loads == [] and (pred["source"] == "fallback").all()
    assert report["placement"]["primary"]["kind"] == "none"
    assert any("load_in_4bit" in e for e in report["errors"])


# --- each role's rows are made as its adapter was trained ---------------------------------------------------------


def test_each_role_takes_its_adapters_own_token_settings(demo_files, qwen_path, adapter, tmp_path) -> None:
    """Left out of the recipe, max_length and the rest come from each adapter's train_config.json: the primary
    and the secondary may differ (here the secondary's copy says 200 tokens)."""
    other = tmp_path / "adapter-200"
    shutil.copytree(adapter, other)
    trained = json.loads((other / "train_config.json").read_text())
    (other / "train_config.json").write_text(json.dumps({**trained, "max_length": 200}))
    cfg = _cfg(demo_files["test"], tmp_path / "out", qwen_path, adapter, max_length=None,
               secondary_model=qwen_path, secondary_adapter=other)  # fmt: skip
    infer(cfg)
    report = _report(tmp_path / "out")
    assert report["inputs"]["primary"]["max_length"] == trained["max_length"] == MAX_LENGTH
    assert report["inputs"]["secondary"]["max_length"] == 200 and report["errors"] == []


def test_a_recipe_setting_unlike_the_adapters_is_refused_at_run_time(demo_files, qwen_path, adapter, tmp_path) -> None:
    """max_length 512 in the recipe, 256 in the adapter: the role is refused naming both (fail-soft: the fallback
    submission, one row per id; fail_soft off: the error)."""
    cfg = _cfg(demo_files["test"], tmp_path / "out", qwen_path, adapter, max_length=512)
    pred = infer(cfg)
    report = _report(tmp_path / "out")
    (error,) = report["errors"]
    assert (
        f"max_length = 512 in the inference recipe, but its adapter {adapter} was trained with max_length = 256"
        in error
    )
    assert report["fallback_rows"] == report["rows"] == len(pred) == pred["id"].nunique()
    (tmp_path / "out2").mkdir()
    with pytest.raises(InferenceError, match="max_length = 512 in the inference recipe"):
        infer(_cfg(demo_files["test"], tmp_path / "out2", qwen_path, adapter, max_length=512, fail_soft=False))


# ---------------------------------------------------------------------------------------------- stale calibration


def _fitted_for(folder: Path, weights: bytes, calibration_for: bytes | None, blend_for: bytes | None = None) -> Path:
    """An adapter folder with ``weights`` and a calibration.json (and blend.json) fitted for other bytes or the same."""
    from kaggle_utils.evaluation.calibration import ADAPTER_WEIGHTS, Blend, Calibration
    from kaggle_utils.store import file_fingerprint

    folder.mkdir(parents=True)
    (folder / ADAPTER_WEIGHTS).write_bytes(weights)

    def fingerprint(content: bytes | None) -> str | None:
        if content is None:
            return None
        (folder.parent / "other.bin").write_bytes(content)
        return file_fingerprint(folder.parent / "other.bin")

    Calibration(temperature=2.0, reason="fitted", adapter_fingerprint=fingerprint(calibration_for)).save(
        folder / "calibration.json"
    )
    if blend_for is not None:
        Blend(weight=0.8, reason="fitted", secondary_fingerprint=fingerprint(blend_for)).save(folder / "blend.json")
    return folder


def test_a_calibration_fitted_for_other_weights_is_refused_naming_file_adapter_and_fix(tmp_path):
    from kaggle_utils.inference.blend import Blender, StaleCalibrationError

    adapter = _fitted_for(tmp_path / "stage2", b"stage-2 weights", calibration_for=b"stage-1 weights")
    with pytest.raises(StaleCalibrationError) as info:
        Blender(adapter, None, 0.5, {})
    text = str(info.value)
    assert str(adapter / "calibration.json") in text and f"the primary adapter {adapter}" in text
    assert "--recipe calibrate-students" in text and "accept_stale_calibration" in text
    # the same for a blend.json fitted for another secondary
    primary = _fitted_for(tmp_path / "p", b"p", calibration_for=b"p")
    secondary = _fitted_for(tmp_path / "s", b"new s", calibration_for=b"new s", blend_for=b"old s")
    with pytest.raises(StaleCalibrationError, match=r"s/blend.json was fitted for other weights than the secondary"):
        Blender(primary, secondary, 0.5, {})


def test_a_stale_calibration_is_accepted_with_the_flag_and_said_loudly(tmp_path, capsys):
    from kaggle_utils.inference.blend import Blender

    adapter = _fitted_for(tmp_path / "stage2", b"stage-2 weights", calibration_for=b"stage-1 weights")
    report: dict = {}
    blender = Blender(adapter, None, 0.5, report, accept_stale=True)
    assert blender.calibration("primary", adapter).temperature == 2.0
    assert report["calibration"]["primary"]["fingerprint"].startswith("STALE, accepted by accept_stale_calibration")
    assert str(adapter / "calibration.json") in report["stale_calibration_accepted"][0]
    assert "WARNING: STALE CALIBRATION ACCEPTED" in capsys.readouterr().out


def test_matching_and_unknown_fingerprints_are_applied_and_said(tmp_path):
    from kaggle_utils.inference.blend import Blender

    primary = _fitted_for(tmp_path / "p", b"p", calibration_for=b"p")
    secondary = _fitted_for(tmp_path / "s", b"s", calibration_for=None, blend_for=b"s")
    report: dict = {}
    blender = Blender(primary, secondary, 0.5, report)
    blender.calibration("primary", primary), blender.calibration("secondary", secondary), blender.blend()
    assert report["calibration"]["primary"]["fingerprint"] == "fitted for these adapter weights"
    assert "unknown adapter weights (secondary" in report["calibration"]["secondary"]["fingerprint"]
    # blend.json recorded only the secondary's weights: the primary's are unknown, which is said, not refused
    assert report["blend"]["weight"] == 0.8 and "unknown adapter weights (primary" in report["blend"]["fingerprint"]


def test_infer_refuses_a_stale_calibration_before_scoring(demo_files, qwen_path, tmp_path):
    from kaggle_utils.inference.blend import StaleCalibrationError

    adapter = _fitted_for(tmp_path / "stage2", b"stage-2 weights", calibration_for=b"stage-1 weights")
    with pytest.raises(StaleCalibrationError, match="calibration.json was fitted for other weights"):
        infer(_cfg(demo_files["test"], tmp_path / "out", qwen_path, adapter))
    assert not (tmp_path / "out" / "submission.csv").exists()  # refused before anything was scored or written
