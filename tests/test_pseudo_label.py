"""kaggle_utils.pseudo_label: soft labels from a teacher, A/B-averaged, written in resumable parts."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_utils import pseudo_label as pl_module
from kaggle_utils.config.cli import config_to_dict
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.pseudo_label import PseudoLabelConfig, label_summary, pseudo_label
from kaggle_utils.scoring.predict import predict_proba

PARTS = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


def _run(cfg: PseudoLabelConfig) -> tuple[pd.DataFrame, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = pseudo_label(cfg)
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def labelled(trained, prepared, qwen_path, tmp_path_factory):
    cfg = PseudoLabelConfig(
        model_path=qwen_path,
        load_in_4bit=True,
        adapter_dir=trained.result.adapter_dir,
        input_file=prepared["unlabeled"],
        out_file=tmp_path_factory.mktemp("pseudo") / "pseudo.parquet",
        tta=True,
        chunk_rows=40,
        max_length=256,
        batch_tokens=4096,
        max_rows=32,
    )
    out, _ = _run(cfg)
    return cfg, out


@pytest.fixture(scope="module")
def teacher(trained, qwen_path, tokenizer):
    return load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, adapter=trained.result.adapter_dir
    )


def test_output_is_a_valid_soft_label_file(labelled, prepared) -> None:
    cfg, out = labelled
    pool = pd.read_parquet(prepared["unlabeled"])
    # every input row once, in input order, with its columns unchanged
    assert out["id"].tolist() == pool["id"].tolist()
    pd.testing.assert_frame_equal(out.drop(columns=["p_a", "p_b"]), pool)
    np.testing.assert_allclose(out["p_a"] + out["p_b"], 1.0, atol=1e-5)
    assert ((out["p_a"] > 0) & (out["p_a"] < 1)).all()
    schema.validate(out, "soft")
    # the file round-trips through the soft loader
    pd.testing.assert_frame_equal(schema.load(cfg.out_file, "soft"), out)
    parts = cfg.out_file.with_name("pseudo.parts")
    assert sorted(p.name for p in parts.iterdir()) == PARTS
    assert [len(pd.read_parquet(parts / p)) for p in PARTS] == [40, 40, 40]
    saved = json.loads(cfg.out_file.with_name("pseudo_config.json").read_text())
    assert saved == config_to_dict(cfg)


def test_teacher_is_confident_on_the_demo_signal(labelled) -> None:
    """The trained teacher's soft labels are not flat: most rows get a clear preference."""
    _, out = labelled
    assert (np.maximum(out["p_a"], out["p_b"]) > 0.6).mean() > 0.5


def test_tta_averages_both_orders(labelled, teacher, tokenizer) -> None:
    cfg, out = labelled
    pool = schema.load(cfg.input_file, "unlabeled")
    fmt = PromptFormatter(tokenizer, InputConfig(max_length=256))
    direct = predict_proba(teacher, fmt.encode(pool), tokenizer.pad_token_id, 4096).probs
    swapped = predict_proba(teacher, fmt.encode(schema.swap_ab(pool)), tokenizer.pad_token_id, 4096).probs
    # the views disagree somewhat (position bias), so the average is not trivially either one
    assert np.abs(direct - schema.swap_probs(swapped)).max() > 1e-3
    expected = (direct + schema.swap_probs(swapped)) / 2
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), expected, atol=1e-4)


def test_without_tta_the_labels_are_the_direct_scores(labelled, teacher, tokenizer, tmp_path: Path) -> None:
    cfg, _ = labelled
    small = schema.load(cfg.input_file, "unlabeled").iloc[:20]
    small.to_parquet(tmp_path / "small.parquet", index=False)
    cfg2 = PseudoLabelConfig(
        **{
            **config_to_dict(cfg),
            "tta": False,
            "input_file": tmp_path / "small.parquet",
            "out_file": tmp_path / "out.parquet",
        }
    )
    out, _ = _run(cfg2)
    rows = PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(small)
    direct = predict_proba(teacher, rows, tokenizer.pad_token_id, 4096).probs
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), direct, atol=1e-4)


def test_deleted_part_is_the_only_one_recomputed(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, out = labelled
    parts = tmp_path / "pseudo.parts"
    shutil.copytree(cfg.out_file.with_name("pseudo.parts"), parts)
    cfg2 = PseudoLabelConfig(**{**config_to_dict(cfg), "out_file": tmp_path / "pseudo.parquet"})
    before = {p: (parts / p).stat().st_mtime_ns for p in PARTS}
    (parts / PARTS[1]).unlink()

    scored_rows: list[int] = []
    original = pl_module.predict_proba

    def counting(model, rows, *args, **kwargs):
        scored_rows.append(len(rows))
        return original(model, rows, *args, **kwargs)

    monkeypatch.setattr(pl_module, "predict_proba", counting)
    again, stdout = _run(cfg2)
    assert "resuming: 2 of 3 parts already in" in stdout
    assert scored_rows == [40, 40]  # one chunk, in both A/B orders
    for p in (PARTS[0], PARTS[2]):
        assert (parts / p).stat().st_mtime_ns == before[p], f"{p} was rewritten"
    assert (parts / PARTS[1]).is_file()
    assert not list(parts.glob("*.tmp"))
    pd.testing.assert_frame_equal(again, out, atol=1e-6)
    pd.testing.assert_frame_equal(schema.load(cfg2.out_file, "soft"), again)


def test_complete_run_loads_no_model(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, out = labelled
    shutil.copytree(cfg.out_file.with_name("pseudo.parts"), tmp_path / "pseudo.parts")
    cfg2 = PseudoLabelConfig(**{**config_to_dict(cfg), "out_file": tmp_path / "pseudo.parquet"})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although every part exists")

    monkeypatch.setattr(pl_module, "load_classifier", no_model)
    again, stdout = _run(cfg2)
    assert "resuming: 3 of 3 parts" in stdout
    pd.testing.assert_frame_equal(again, out)


def test_label_summary(labelled) -> None:
    _, out = labelled
    s = label_summary(out)
    assert s["rows"].sum() == len(out)
    assert len(s) == 5
    share_a = s["share_prefers_a"].dropna()
    assert ((share_a >= 0) & (share_a <= 1)).all()


def test_chunk_rows_validated() -> None:
    with pytest.raises(ValueError, match="chunk_rows=0"):
        PseudoLabelConfig(chunk_rows=0)
