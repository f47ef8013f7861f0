"""kaggle_utils.models.merge: the LoRA merged into dequantised nf4 weights scores like the unmerged model; into the
original weights it does not.

Adapters: the project's own (conftest ``trained``: LoRA r16 trained on the nf4 tiny Qwen2) and, for Gemma2, a LoRA
whose B matrices and head are set to seeded random values (a fresh LoRA has B = 0, which would merge trivially).
Merges for the comparisons are fp32 so that the only differences left are the merge's own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier
from kaggle_utils.models.merge import (
    INFO_FILE,
    INT8_DIR,
    TRAIN_CONFIG,
    MergeConfig,
    logits,
    main,
    merge_dequantized,
    merge_naive,
)

# merges and scores trained adapters: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

# Observed on the tiny models (CPU, fp32): dequantised merge ~3e-6, naive merge ~0.1-0.5 (see the report).
EXACT = 1e-4  # fp32 rounding of a sum taken in a different order
CHECK_ROWS = 24


@pytest.fixture(scope="module")
def check_file(demo_files) -> Path:
    """Competition-format rows (prompt, response_a, response_b) to score with each model."""
    return demo_files["test"]


def _merge_both(base: Path, adapter: Path, out: Path, check_file: Path) -> dict:
    kwargs = dict(base_model=base, adapter=adapter, dtype="fp32", device="cpu", check_file=check_file)
    return {
        "dequantized": merge_dequantized(MergeConfig(out_dir=out / "dequantized", **kwargs, check_rows=CHECK_ROWS)),
        "naive": merge_naive(MergeConfig(out_dir=out / "naive", **kwargs, check_rows=CHECK_ROWS)),
    }


@pytest.fixture(scope="module")
def qwen2_merges(tmp_path_factory, qwen_path, trained, check_file) -> dict:
    return _merge_both(qwen_path, trained.result.adapter_dir, tmp_path_factory.mktemp("qwen-merge"), check_file)


@pytest.fixture(scope="module")
def gemma_adapter(tmp_path_factory, gemma_path, tokenizer) -> Path:
    """A LoRA on the nf4 tiny Gemma2 with seeded random B (out, r) and head (2, hidden), saved like training saves."""
    model = load_classifier(
        ModelConfig(model_path=gemma_path, device="cpu"), tokenizer.pad_token_id, lora=LoraSettings(r=8, alpha=16)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    out = tmp_path_factory.mktemp("gemma-adapter")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma2_merges(tmp_path_factory, gemma_path, gemma_adapter, check_file) -> dict:
    return _merge_both(gemma_path, gemma_adapter, tmp_path_factory.mktemp("gemma-merge"), check_file)


def _rows(tokenizer, check_file: Path) -> list[list[int]]:
    import pandas as pd

    from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter

    return PromptFormatter(tokenizer, InputConfig(max_length=512)).encode(pd.read_parquet(check_file).head(CHECK_ROWS))


def test_trained_adapter_has_nonzero_lora_b(trained) -> None:
    from safetensors.torch import load_file

    weights = load_file(trained.result.adapter_dir / "adapter_model.safetensors")
    b = [w for k, w in weights.items() if "lora_B" in k]
    assert len(b) == 14 and min(float(w.abs().max()) for w in b) > 1e-3
    assert any(k.endswith("score.weight") for k in weights)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_dequantized_merge_scores_like_the_unmerged_nf4_model(arch, request) -> None:
    check = request.getfixturevalue(f"{arch}_merges")["dequantized"].info
    check = check["check"]
    assert check["rows"] == CHECK_ROWS and check["compute_dtype"] == "float32"
    # the adapter moves the logits by O(1); the merge reproduces them to fp32 rounding
    assert check["max_abs_logit_change_by_adapter"] > 0.5
    assert check["max_abs_logit_delta"] < EXACT


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_naive_merge_into_original_weights_is_measurably_worse(arch, request) -> None:
    merges = request.getfixturevalue(f"{arch}_merges")
    naive = merges["naive"].info["check"]["max_abs_logit_delta"]
    right = merges["dequantized"].info["check"]["max_abs_logit_delta"]
    assert merges["naive"].info["dequantized_layers"] == 0
    # the quantisation error the adapter had compensated is back in every layer
    assert naive > 1e-2 and naive > 100 * right


def test_merged_weights_are_dequantized_nf4_plus_scaled_lora(qwen2_merges, qwen_path, trained, tokenizer) -> None:
    """Recomputed here from the files: dequantize_4bit(nf4(W)) + lora_alpha / r · B @ A, and the adapter's head."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    adapter_dir = trained.result.adapter_dir
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    scale = (lambda c: c["lora_alpha"] / c["r"])(json.loads((adapter_dir / "adapter_config.json").read_text()))
    merged = load_file(qwen2_merges["dequantized"].out_dir / "model.safetensors")
    nf4 = load_classifier(ModelConfig(model_path=qwen_path, device="cpu"), tokenizer.pad_token_id)
    for name, module in nf4.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)  # (out, in)
        a = lora[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
        b = lora[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
        torch.testing.assert_close(merged[f"{name}.weight"], w + scale * b @ a, atol=1e-6, rtol=0)
    assert torch.equal(merged["score.weight"], lora["base_model.model.score.weight"])


def test_cli_fp16_folder_loads_without_peft_or_bitsandbytes(tmp_path, qwen_path, trained, check_file, tokenizer):
    out = tmp_path / "merged"
    adapter = trained.result.adapter_dir
    main(
        ["--base-model", str(qwen_path), "--adapter", str(adapter), "--out-dir", str(out), "--device", "cpu"]
        + ["--check-file", str(check_file), "--check-rows", str(CHECK_ROWS), "--export-int8", "true"]
    )
    info = json.loads((out / INFO_FILE).read_text())
    assert info["dtype"] == "fp16" and info["method"] == "dequantized" and info["adapter"] == str(adapter)
    assert info["lora_layers"] == 14 and info["dequantized_layers"] == 14 and info["heads"] == ["score"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["pad_token_id"] == tokenizer.pad_token_id
    assert not list(out.glob("adapter_*")) and (out / TRAIN_CONFIG).read_text() == (adapter / TRAIN_CONFIG).read_text()
    # fp16 weights, fp32 compute on the CPU: only the fp16 rounding of the merged weights remains
    assert info["check"]["max_abs_logit_delta"] < 1e-2

    # a plain transformers process in which peft and bitsandbytes cannot even be imported
    script = (
        "import sys; sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"
        "import torch; from transformers import AutoModelForSequenceClassification as M\n"
        f"m = M.from_pretrained({str(out)!r})\n"
        "assert all(p.dtype == torch.float16 for p in m.parameters()), 'not fp16'\n"
        "assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear\n"
        "print(m.config.num_labels)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2"

    # the project's loader, full precision and no adapter, against the unmerged nf4 + adapter model
    rows = _rows(tokenizer, check_file)
    merged = load_classifier(ModelConfig(model_path=out, load_in_4bit=False, device="cpu"), tokenizer.pad_token_id)
    unmerged = load_classifier(ModelConfig(model_path=qwen_path, device="cpu"), tokenizer.pad_token_id, adapter)
    gap = (logits(merged, rows, tokenizer.pad_token_id) - logits(unmerged, rows, tokenizer.pad_token_id)).abs().max()
    assert float(gap) == pytest.approx(info["check"]["max_abs_logit_delta"], abs=1e-6)

    # the int8 copy (bitsandbytes LLM.int8, which 0.50.2 runs on the CPU) reloads as int8 with a dense head
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    int8 = AutoModelForSequenceClassification.from_pretrained(out / INT8_DIR, device_map={"": "cpu"})
    assert isinstance(int8.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert int8.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    assert type(int8.score) is torch.nn.Linear
    int8_gap = (logits(int8, rows, tokenizer.pad_token_id) - logits(unmerged, rows, tokenizer.pad_token_id)).abs().max()
    assert float(int8_gap) == pytest.approx(info["int8"]["max_abs_logit_delta"], abs=1e-4)
    # int8 rounding of weights and activations: well below what the adapter changed
    assert info["int8"]["max_abs_logit_delta"] < 0.25 * info["check"]["max_abs_logit_change_by_adapter"]


def test_bad_adapter_path_is_named(tmp_path, qwen_path) -> None:
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        merge_dequantized(MergeConfig(base_model=qwen_path, adapter=missing, out_dir=tmp_path / "out"))
    # a folder that is a model, not an adapter
    with pytest.raises(FileNotFoundError, match=re.escape(f"{qwen_path}: no adapter_config.json")):
        merge_dequantized(MergeConfig(base_model=qwen_path, adapter=qwen_path, out_dir=tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no config.json")):
        merge_dequantized(MergeConfig(base_model=tmp_path, adapter=missing, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="dtype='int4'"):
        MergeConfig(base_model="b", adapter="a", out_dir="o", dtype="int4")
    cfg = MergeConfig(base_model="b", adapter="a", out_dir="o", check_file="")
    assert cfg.check_file is None and cfg.torch_dtype == torch.float16 and isinstance(cfg.adapter, Path)
