"""kaggle_utils.models.average: LoRA adapters averaged into one loadable adapter (exact average of B @ A by default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.average import AdapterMismatchError, AverageConfig, average, main
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.scoring.predict import predict_proba

# averages and scores trained adapters: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

HEAD = "base_model.model.score.weight"
WEIGHTS = "adapter_model.safetensors"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def _copy(src: Path, dst: Path, change=None, config_change: dict | None = None) -> Path:
    """A copy of adapter ``src``; ``change(tensors)`` edits its weights, ``config_change`` its adapter_config."""
    shutil.copytree(src, dst)
    if change is not None:
        tensors = _tensors(dst)
        change(tensors)
        save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    if config_change:
        config = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config | config_change))
    return dst


@pytest.fixture(scope="module")
def adapter(trained) -> Path:
    return trained.result.adapter_dir


@pytest.fixture(scope="module")
def other(adapter, tmp_path_factory) -> Path:
    """A second student from the same base: every LoRA matrix and the head moved by seeded noise of their own size."""
    gen = torch.Generator().manual_seed(0)

    def perturb(tensors):
        for name, t in tensors.items():
            tensors[name] = t + torch.randn(t.shape, generator=gen) * t.std()

    return _copy(adapter, tmp_path_factory.mktemp("other") / "adapter", perturb)


@pytest.fixture(scope="module")
def rows(trained, tokenizer) -> list[list[int]]:
    val = pd.read_parquet(trained.cfg.data.train_file).query("fold == 0").head(48)
    return PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(val)


def _score(qwen_path, tokenizer, adapter: Path, rows) -> np.ndarray:
    """What inference does with an adapter folder: the 4-bit base, the adapter applied, rows scored."""
    model = load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, adapter=adapter
    )
    return predict_proba(model, rows, tokenizer.pad_token_id, batch_tokens=4096).probs


@pytest.fixture(scope="module")
def reference_probs(qwen_path, tokenizer, adapter, rows) -> np.ndarray:
    return _score(qwen_path, tokenizer, adapter, rows)


def _delta(tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return tensors[f"{prefix}.lora_B.weight"].double() @ tensors[f"{prefix}.lora_A.weight"].double()


def _prefixes(tensors) -> list[str]:
    return sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))


@pytest.mark.parametrize("method", ["concat", "naive"])
def test_averaging_one_adapter_gives_itself(adapter, tmp_path, method, qwen_path, tokenizer, rows, reference_probs):
    info = average(AverageConfig(adapters=[adapter], out_dir=tmp_path / "avg", method=method))
    got, want = _tensors(tmp_path / "avg"), _tensors(adapter)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert info["r"] == 16 and info["lora_alpha"] == 32 and info["layers"] == 14
    assert info["naive_vs_exact"]["max"] < 1e-12 and info["written_vs_exact"]["max"] < 1e-12
    # the same files as the train stage's adapter/, calibration aside (it belongs to each student)
    written = {p.name for p in (tmp_path / "avg").iterdir()}
    assert {p.name for p in adapter.iterdir()} - {"calibration.json"} <= written
    saved = json.loads((tmp_path / "avg" / "train_config.json").read_text())
    assert saved["val_fold"] == -1 and saved["max_length"] == 256
    np.testing.assert_allclose(_score(qwen_path, tokenizer, tmp_path / "avg", rows), reference_probs, atol=1e-6)


def test_two_identical_adapters_give_the_same_model(adapter, tmp_path, qwen_path, tokenizer, rows, reference_probs):
    twin = _copy(adapter, tmp_path / "twin")
    info = average(AverageConfig(adapters=[adapter, twin], out_dir=tmp_path / "avg"))
    assert (info["r"], info["lora_alpha"]) == (32, 64)  # concat: rank and alpha double, alpha / r stays
    got, want = _tensors(tmp_path / "avg"), _tensors(adapter)
    for prefix in _prefixes(want):
        torch.testing.assert_close(_delta(got, prefix), _delta(want, prefix), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[HEAD], want[HEAD])
    np.testing.assert_allclose(_score(qwen_path, tokenizer, tmp_path / "avg", rows), reference_probs, atol=1e-5)
    naive = average(AverageConfig(adapters=[adapter, twin], out_dir=tmp_path / "naive", method="naive"))
    assert naive["r"] == 16
    for k, v in _tensors(tmp_path / "naive").items():
        torch.testing.assert_close(v, want[k])


def test_two_students_average_their_updates_exactly(adapter, other, tmp_path, qwen_path, tokenizer, rows):
    weights = [3.0, 1.0]
    info = average(AverageConfig(adapters=[adapter, other], out_dir=tmp_path / "avg", weights=weights))
    assert info["weights"] == [0.75, 0.25]
    a, b, got = _tensors(adapter), _tensors(other), _tensors(tmp_path / "avg")
    for prefix in _prefixes(a):
        exact = 0.75 * _delta(a, prefix) + 0.25 * _delta(b, prefix)
        torch.testing.assert_close(_delta(got, prefix), exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[HEAD], 0.75 * a[HEAD] + 0.25 * b[HEAD])
    # the naive average of A and B misses the exact one by a measurable amount; what was written does not
    assert info["written_vs_exact"]["max"] < 1e-6 < info["naive_vs_exact"]["mean"]
    assert info["naive_vs_exact"]["mean"] > 0.05

    # it loads through the inference path and scores every row, between the two students' predictions
    probs = _score(qwen_path, tokenizer, tmp_path / "avg", rows)
    assert probs.shape == (len(rows), 2) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    p_a, p_b = _score(qwen_path, tokenizer, adapter, rows), _score(qwen_path, tokenizer, other, rows)
    assert np.abs(probs - p_a).max() > 1e-3 and np.abs(probs - p_b).max() > 1e-3

    naive = average(
        AverageConfig(adapters=[adapter, other], out_dir=tmp_path / "naive", weights=weights, method="naive")
    )
    assert naive["written_vs_exact"] == naive["naive_vs_exact"] == info["naive_vs_exact"]


@pytest.mark.parametrize(
    ("config_change", "what"),
    [
        ({"base_model_name_or_path": "models/another"}, "base_model_name_or_path"),
        ({"lora_alpha": 16}, "lora_alpha"),
        ({"target_modules": ["model.layers.0.self_attn.q_proj"]}, "target_modules"),
    ],
    ids=["base", "alpha", "targets"],
)
def test_incompatible_adapters_are_refused(adapter, tmp_path, config_change, what):
    bad = _copy(adapter, tmp_path / "bad", config_change=config_change)
    with pytest.raises(AdapterMismatchError, match=rf"cannot average .*adapter and .*bad: .*{what} is"):
        average(AverageConfig(adapters=[adapter, bad], out_dir=tmp_path / "avg"))
    assert not (tmp_path / "avg").exists()  # refused before anything was written


def test_another_rank_is_refused(adapter, tmp_path):
    def rank8(tensors):
        for k in list(tensors):
            if k.endswith("lora_A.weight"):
                tensors[k] = tensors[k][:8].contiguous()
            elif k.endswith("lora_B.weight"):
                tensors[k] = tensors[k][:, :8].contiguous()

    bad = _copy(adapter, tmp_path / "r8", rank8, {"r": 8, "lora_alpha": 16})
    with pytest.raises(AdapterMismatchError, match="adapter_config.json r is 16 in the first and 8 in the second"):
        average(AverageConfig(adapters=[adapter, bad], out_dir=tmp_path / "avg"))
    same_config = _copy(adapter, tmp_path / "r8-same-config", rank8)
    with pytest.raises(AdapterMismatchError, match=r"the shape of .*lora_[AB]\.weight is \(\d+, \d+\) in the first"):
        average(AverageConfig(adapters=[adapter, same_config], out_dir=tmp_path / "avg"))


def test_other_input_settings_are_refused(adapter, tmp_path):
    bad = _copy(adapter, tmp_path / "long")
    saved = json.loads((bad / "train_config.json").read_text())
    (bad / "train_config.json").write_text(json.dumps(saved | {"max_length": 512}))
    with pytest.raises(AdapterMismatchError, match="train_config.json max_length is 256 in the first and 512"):
        average(AverageConfig(adapters=[adapter, bad], out_dir=tmp_path / "avg"))


def test_the_command_line(adapter, other, tmp_path, capsys):
    main(["--adapters", str(adapter), str(other), "--out-dir", str(tmp_path / "avg"), "--weights", "1", "3"])
    info = json.loads((tmp_path / "avg" / "average_info.json").read_text())
    assert info["weights"] == [0.25, 0.75] and info["config"]["method"] == "concat"
    assert "averaged 2 adapters (concat" in capsys.readouterr().out
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        main(["--adapters", str(adapter), "--out-dir", str(tmp_path / "x"), "--weights", "1", "2"])
    with pytest.raises(ValueError, match="is one of the adapters"):
        main(["--adapters", str(adapter), "--out-dir", str(adapter)])
