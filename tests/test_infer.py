"""kaggle_utils.infer: a complete submission always, the cascade, the deadline and the fallback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils import infer as infer_module
from kaggle_utils.data import schema
from kaggle_utils.evaluation import calibration
from kaggle_utils.infer import FALLBACK_LONGER_WINS, InferConfig, fallback_probs, infer, write_submission
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.scoring.predict import predict_proba

# runs the inference stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow


def _cfg(demo_files, out_dir: Path, **kw) -> InferConfig:
    params = dict(
        test_file=demo_files["test"],
        out_dir=out_dir,
        max_length=256,
        batch_tokens=4096,
        max_rows=32,
        labels_file=demo_files["test_labels"],
        tta_fraction=0.0,  # swap TTA has its own tests; here the primary's probabilities stay comparable
    )
    params.update(kw)
    return InferConfig.flat(**params)


def _outputs(out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    sub = pd.read_csv(out_dir / "submission.csv")
    pred = pd.read_parquet(out_dir / "predictions.parquet")
    report = json.loads((out_dir / "report.json").read_text())
    return sub, pred, report


def _assert_complete_submission(sub: pd.DataFrame, test: pd.DataFrame) -> None:
    assert list(sub.columns) == ["id", "winner"]
    assert sub["id"].tolist() == test["id"].tolist()  # every id once, in test order
    assert sub["id"].is_unique
    assert set(sub["winner"]) <= {"model_a", "model_b"}


@pytest.fixture(scope="module")
def primary_run(demo_files, qwen_path, trained, tmp_path_factory):
    cfg = _cfg(
        demo_files,
        tmp_path_factory.mktemp("primary"),
        primary_model=qwen_path,
        primary_adapter=trained.result.adapter_dir,
    )
    pred = infer(cfg)
    return cfg, pred


def test_primary_submission(primary_run, competition_test) -> None:
    cfg, pred = primary_run
    sub, saved, report = _outputs(cfg.data.out_dir)
    _assert_complete_submission(sub, competition_test)
    pd.testing.assert_frame_equal(saved, pred)
    assert (pred["source"] == "primary").all()
    np.testing.assert_allclose(pred["p_a"] + pred["p_b"], 1.0, atol=1e-5)
    expected_winner = np.where(pred["p_a"] >= pred["p_b"], "model_a", "model_b")
    assert sub["winner"].tolist() == expected_winner.tolist()
    assert report["rows"] == 120 and report["primary"]["scored"] == 120 and report["fallback_rows"] == 0
    assert report["primary"]["stopped_by_deadline"] is False
    assert "secondary" not in report
    assert (cfg.data.out_dir / "infer_config.json").is_file()


def test_trained_adapter_beats_chance_on_the_answer_key(primary_run, demo_files) -> None:
    cfg, pred = primary_run
    _, _, report = _outputs(cfg.data.out_dir)
    assert report["accuracy"]["rows"] == 120
    assert report["accuracy"]["accuracy"] > 0.6
    # the reported number is the accuracy against test_labels.csv
    key = pd.read_csv(demo_files["test_labels"]).set_index("id").loc[pred["id"], "winner"]
    assert report["accuracy"]["accuracy"] == pytest.approx((pred["winner"].to_numpy() == key.to_numpy()).mean())


def test_exhausted_deadline_gives_a_complete_fallback_submission(
    demo_files, qwen_path, gemma_path, trained, competition_test, tmp_path
) -> None:
    cfg = _cfg(
        demo_files,
        tmp_path,
        primary_model=qwen_path,
        primary_adapter=trained.result.adapter_dir,
        secondary_model=gemma_path,
        time_budget_minutes=1,
        reserve_minutes=0.5,
        started_at=time.time() - 3600,
    )
    pred = infer(cfg)
    sub, _, report = _outputs(tmp_path)
    _assert_complete_submission(sub, competition_test)
    assert (pred["source"] == "fallback").all()
    np.testing.assert_allclose(pred[["p_a", "p_b"]].to_numpy(), fallback_probs(competition_test))
    longer_a = competition_test["response_a"].str.len() >= competition_test["response_b"].str.len()
    assert sub["winner"].tolist() == np.where(longer_a, "model_a", "model_b").tolist()
    assert report["primary"] == {"scored": 0, "skipped": "no time left", "stopped_by_deadline": True}
    assert report["fallback_rows"] == 120
    assert "secondary" not in report  # nothing left to re-score
    assert report["elapsed_minutes"] >= 60


@pytest.fixture(scope="module")
def gemma_probs(gemma_path, tokenizer, competition_test) -> np.ndarray:
    """The secondary model's probabilities on every test row, computed outside the cascade."""
    model = load_classifier(ModelConfig(model_path=gemma_path, load_in_4bit=True), tokenizer.pad_token_id)
    rows = PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(competition_test)
    return predict_proba(model, rows, tokenizer.pad_token_id, 4096).probs


def test_secondary_blends_every_row_with_time_to_spare(
    primary_run, demo_files, gemma_path, gemma_probs, competition_test, tmp_path
) -> None:
    primary_cfg, primary_pred = primary_run
    cfg = _cfg(
        demo_files,
        tmp_path,
        primary_model=primary_cfg.primary.model,
        primary_adapter=primary_cfg.primary.adapter,
        secondary_model=gemma_path,
        secondary_weight=0.25,
    )
    pred = infer(cfg)
    sub, _, report = _outputs(tmp_path)
    _assert_complete_submission(sub, competition_test)
    assert report["secondary"]["scored"] == 120 and report["secondary"]["stopped_by_deadline"] is False
    assert (pred["source"] == "blend").all()
    # the blend averages calibrated logit margins: the primary's are already calibrated in its predictions, and the
    # base Gemma2 (no adapter) keeps temperature 1
    assert report["blend"]["weight"] == 0.25 and "no blend.json" in report["blend"]["reason"]
    z = 0.75 * calibration.margin(primary_pred[["p_a", "p_b"]].to_numpy()) + 0.25 * calibration.margin(gemma_probs)
    np.testing.assert_allclose(pred[["p_a", "p_b"]].to_numpy(), calibration.probs_from_margin(z), atol=1e-4)


def test_secondary_rescores_the_least_certain_rows_first(
    primary_run, demo_files, gemma_path, competition_test, tmp_path, monkeypatch
) -> None:
    """With time for one secondary batch only, the blended rows come from the least certain primary rows."""
    primary_cfg, primary_pred = primary_run
    original = infer_module.run_pass

    class OneBatch:
        def __init__(self) -> None:
            self.checks = 0

        def allows(self, estimated_seconds: float) -> bool:
            self.checks += 1
            return self.checks == 1

        def remaining(self) -> float:
            return float("inf")

        clock = staticmethod(time.time)

    def limited(copies, rows, batches, pad_id, deadline, cost, **kw):
        if kw.get("desc") == "secondary":
            deadline = OneBatch()
        return original(copies, rows, batches, pad_id, deadline, cost, **kw)

    monkeypatch.setattr(infer_module, "run_pass", limited)
    max_rows = 2  # priority windows of 8 x 2 rows
    cfg = _cfg(
        demo_files,
        tmp_path,
        primary_model=primary_cfg.primary.model,
        max_rows=max_rows,
        primary_adapter=primary_cfg.primary.adapter,
        secondary_model=gemma_path,
    )
    pred = infer(cfg)
    sub, _, report = _outputs(tmp_path)
    _assert_complete_submission(sub, competition_test)
    assert report["secondary"]["stopped_by_deadline"] is True
    blended = np.flatnonzero(pred["source"] == "blend")
    assert len(blended) == report["secondary"]["scored"]
    assert 1 <= len(blended) <= max_rows  # one batch
    assert (pred["source"].iloc[np.setdiff1d(np.arange(120), blended)] == "primary").all()
    margin = np.abs(primary_pred["p_a"].to_numpy() - 0.5)
    least_certain = np.argsort(margin, kind="stable")[: 8 * max_rows]
    assert set(blended) <= set(least_certain)
    # rows the secondary did not reach keep the primary's probabilities
    rest = pred["source"] == "primary"
    np.testing.assert_allclose(pred.loc[rest, ["p_a", "p_b"]], primary_pred.loc[rest, ["p_a", "p_b"]], atol=1e-5)


def test_fallback_probs_prefers_the_longer_response() -> None:
    df = pd.DataFrame(
        {
            "response_a": ["a much longer response", "short", "same", ""],
            "response_b": ["short", "a much longer response", "same", "x"],
        }
    )
    probs = fallback_probs(df)
    assert FALLBACK_LONGER_WINS == 0.55
    np.testing.assert_allclose(probs, [[0.55, 0.45], [0.45, 0.55], [0.55, 0.45], [0.45, 0.55]])
    assert probs.dtype == np.float32


def test_write_submission_refuses_incomplete_predictions(tmp_path: Path) -> None:
    test = pd.DataFrame({"id": [11, 12, 13]})
    pred = pd.DataFrame({"id": [11, 12, 13], "winner": ["model_a", "model_b", "model_a"]})
    path = write_submission(pred, test, tmp_path / "submission.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path), pred)
    bad_cases = {
        "missing id": pred.iloc[:2],
        "wrong order": pred.iloc[[1, 0, 2]],
        "duplicate id": pred.assign(id=[11, 11, 13]),
        "bad winner": pred.assign(winner=["model_a", "tie", "model_a"]),
    }
    for name, bad in bad_cases.items():
        target = tmp_path / f"{name}.csv"
        with pytest.raises(RuntimeError, match="not writing a submission"):
            write_submission(bad, test, target)
        assert not target.exists(), name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"time_budget_minutes": 5, "reserve_minutes": 5}, "must exceed"),
        ({"secondary_weight": 1.5}, "secondary_weight"),
    ],
)
def test_config_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        InferConfig.flat(**kwargs)


def test_resolve_devices() -> None:
    assert infer_module.resolve_devices("cpu") == ["cpu"]
    assert infer_module.resolve_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]


def test_swap_tta_averages_the_least_certain_rows_with_their_swapped_view(
    primary_run, demo_files, qwen_path, tokenizer, competition_test, tmp_path
) -> None:
    """With time to spare, the primary re-scores the least certain quarter A/B-swapped; those rows get the mean
    of the two margins (the swapped view's negated) at the primary's swap-averaged temperature, the others keep the
    primary's single-order one."""
    primary_cfg, primary_pred = primary_run
    cfg = _cfg(demo_files, tmp_path, primary_model=qwen_path, primary_adapter=primary_cfg.primary.adapter)
    pred = infer(cfg.replace(tta_fraction=0.25))
    _, _, report = _outputs(tmp_path)
    tta = np.flatnonzero(pred["source"] == "primary+tta")
    assert len(tta) == 30 and report["tta"]["scored"] == 30 and report["tta"]["planned_rows"] == 30
    certainty = np.abs(primary_pred["p_a"].to_numpy() - 0.5)
    assert set(tta) == set(np.argsort(certainty, kind="stable")[:30])
    # the reference: the same adapter on the swapped rows, outside the cascade, at the adapter's temperature
    model = load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, adapter=cfg.primary.adapter
    )
    swapped = schema.swap_ab(competition_test.iloc[tta].reset_index(drop=True))
    rows = PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(swapped)
    p_swapped = predict_proba(model, rows, tokenizer.pad_token_id, 4096).probs
    cal = calibration.Calibration.load(cfg.primary.adapter / "calibration.json")
    assert cal.tta is not None and cal.tta.temperature != pytest.approx(cal.temperature, abs=1e-3)
    raw = calibration.margin(primary_pred[["p_a", "p_b"]].to_numpy()[tta]) * cal.temperature  # undo the single T
    z = calibration.swap_tta_margin(raw, calibration.margin(p_swapped)) / cal.tta.temperature
    np.testing.assert_allclose(calibration.margin(pred[["p_a", "p_b"]].to_numpy()[tta]), z, atol=1e-3)
    served = report["calibration"]["primary"]["served"]
    assert served["primary+tta"] == {"rows": 30, "temperature": cal.tta.temperature, "view": calibration.SWAP_AVERAGED}
    assert served["primary"]["temperature"] == cal.temperature and served["primary"]["rows"] == len(pred) - 30
    rest = np.setdiff1d(np.arange(len(pred)), tta)
    np.testing.assert_allclose(pred[["p_a", "p_b"]].to_numpy()[rest], primary_pred[["p_a", "p_b"]].to_numpy()[rest])


def test_rehearsal_projects_a_full_run_from_measured_batches(primary_run, demo_files, gemma_path, tmp_path) -> None:
    """``--rehearse N`` scores N synthetic rows, then projects a 25K-row run from what it measured; it writes no
    submission.csv where the real one would go."""
    primary_cfg, _ = primary_run
    cfg = _cfg(
        demo_files,
        tmp_path,
        primary_model=primary_cfg.primary.model,
        primary_adapter=primary_cfg.primary.adapter,
        secondary_model=gemma_path,
        tta_fraction=0.25,
        rehearse=40,
        rehearse_minutes=2.0,
    )
    infer(cfg)
    assert not (tmp_path / "submission.csv").exists()
    report = json.loads((tmp_path / "rehearsal" / "report.json").read_text())
    assert report["rows"] == 40 and report["fallback_rows"] == 0
    projection = report["projection"]
    assert projection["primary_finishes"] and projection["planned_rows"]["primary"] == 25_000
    assert "25,000 rows" in projection["table"] and "secondary" in projection["table"]
    # the tiny model on a CPU does thousands of tokens a second: 25K rows of ~1K tokens take well under the budget,
    # so the projection plans every secondary row too
    assert 0 < projection["primary_hours"] < 11.5 and projection["planned_rows"]["secondary"] == 25_000


def test_a_measured_budget_falls_back_on_the_cpu_and_is_read_back_on_a_rerun(primary_run, demo_files, tmp_path) -> None:
    primary_cfg, primary_pred = primary_run
    cfg = primary_cfg.replace(out_dir=tmp_path, batch_tokens=0)
    pred = infer(cfg)
    budget = _outputs(tmp_path)[2]["token_budget"]["primary"]
    assert budget["tokens"] == infer_module.CPU_BATCH_TOKENS and "cpu" in budget["how"].lower()
    # the same rows, other batches: the same predictions (batching does not change a row's probabilities)
    np.testing.assert_allclose(pred[["p_a", "p_b"]], primary_pred[["p_a", "p_b"]], atol=1e-5)
    infer(cfg)
    assert _outputs(tmp_path)[2]["token_budget"]["primary"]["how"] == "read back"


def test_pass_table_and_its_plot_from_a_report(tmp_path) -> None:
    from kaggle_utils import plots

    report = {
        "rows": 100,
        "plans": [{"rows": {"tta": 25, "secondary": 60}, "seconds": {"tta": 10.0, "secondary": 50.0}}],
        "primary": {"scored": 100, "seconds": 40.0, "load_seconds": {"cuda:0": 8.0, "cuda:1": 7.0}},
        "tta": {"scored": 25, "planned_rows": 25, "seconds": 9.0, "load_seconds": {}},
        "secondary": {"scored": 55, "planned_rows": 60, "seconds": 52.0, "load_seconds": {"cuda:0": 6.0},
                      "stopped_by_deadline": True},
    }  # fmt: skip
    table = infer_module.pass_table(report)
    assert list(table.index) == ["primary", "tta", "secondary"]
    assert table.loc["primary", "load_s"] == 15.0 and table.loc["primary", "planned_rows"] == 100
    assert table.loc["secondary", "projected_s"] == 50.0 and table.loc["secondary", "stopped_by_deadline"]
    assert pd.isna(table.loc["primary", "projected_s"])  # the primary always runs: nothing planned for it
    fig = plots.inference_run(pd.Series({"blend": 55, "primary+tta": 25, "primary": 20}), table)
    assert fig.axes[1].get_xlabel() == "seconds" and len(fig.axes[1].patches) == 6  # load + scoring per pass
