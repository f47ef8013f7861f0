"""kaggle_utils.models.loading: 4-bit nf4 loading on the CPU, a full-precision head, LoRA attach and adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import (
    LoraSettings,
    ModelConfig,
    compute_dtype,
    load_classifier,
    load_tokenizer,
    model_device,
    pick_device,
    recompute_only_every,
)
from kaggle_utils.scoring.predict import predict_proba


@pytest.fixture(scope="module")
def base_4bit(qwen_path, tokenizer):
    return load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def val_rows(trained, tokenizer) -> tuple[pd.DataFrame, list[list[int]]]:
    val = pd.read_parquet(trained.cfg.data.train_file).query("fold == 0").reset_index(drop=True)
    return val, PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(val)


def test_4bit_load_on_cpu_quantises_linears_but_not_the_head(base_4bit, tokenizer) -> None:
    import bitsandbytes as bnb

    quantised = {n: m for n, m in base_4bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # 2 layers x (q, k, v, o, gate, up, down)
    assert len(quantised) == 14
    assert all(".layers." in n for n in quantised)
    q = quantised["model.layers.0.self_attn.q_proj"]
    assert q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantisation
    assert q.weight.dtype == torch.uint8
    head = base_4bit.score
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert head.out_features == 2
    assert model_device(base_4bit).type == "cpu"
    assert not base_4bit.training
    assert base_4bit.config.pad_token_id == tokenizer.pad_token_id and base_4bit.config.use_cache is False


def test_full_precision_load(qwen_path, tokenizer) -> None:
    model = load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=False), tokenizer.pad_token_id)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and all(m.weight.dtype == torch.float32 for m in linears)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_on_meta_is_the_loaded_one_without_its_weights(qwen_path, tokenizer, monkeypatch) -> None:
    """What a rank other than 0 builds under FSDP: the loaded model's tensors (names, shapes, dtypes, trainable
    ones), parameters on meta, the rotary tables real (no rank sends them), and no weight file opened."""
    cfg, lora = ModelConfig(model_path=qwen_path, load_in_4bit=False), LoraSettings(r=4, alpha=8, dropout=0.0)
    loaded = load_classifier(cfg, tokenizer.pad_token_id, lora=lora)
    import safetensors

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr("transformers.modeling_utils.safe_open", refuse)
    empty = load_classifier(cfg, tokenizer.pad_token_id, lora=lora, on_meta=True)
    assert empty.training and empty.config.pad_token_id == tokenizer.pad_token_id
    got, expected = empty.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert (got[name].shape, got[name].dtype) == (value.shape, value.dtype), name
    assert all(p.is_meta for p in empty.parameters())
    trainable = [n for n, p in empty.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in loaded.named_parameters() if p.requires_grad]
    for name, buffer in loaded.named_buffers():
        torch.testing.assert_close(dict(empty.named_buffers())[name], buffer, msg=name)
    with pytest.raises(ValueError, match="a 4-bit model is not built on the meta device .* pass read_once"):
        load_classifier(ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, on_meta=True)
    # a full-precision base is read once by on_meta and Parallel.wrap, not by read_once (tests/models/test_broadcast.py)
    with pytest.raises(ValueError, match="read_once is for a 4-bit base; at full precision the ranks > 0 build"):
        load_classifier(cfg, tokenizer.pad_token_id, read_once=True)


def test_gemma2_gets_eager_attention(gemma_path, tokenizer) -> None:
    model = load_classifier(ModelConfig(model_path=gemma_path, load_in_4bit=False), tokenizer.pad_token_id)
    assert model.config.model_type == "gemma2"
    assert model.config._attn_implementation == "eager"


def test_lora_attach_trains_only_lora_and_head(qwen_path, tokenizer) -> None:
    model = load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True),
        tokenizer.pad_token_id,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    assert model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 14
    assert any("score" in n for n in trainable)
    # hidden 64, rank 4: A is (4, in), B is (out, 4)
    a = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert tuple(a.shape) == (4, 64)


def _dtypes(model) -> dict[str, set[torch.dtype]]:
    """The dtypes of the parameters that are not 4-bit, by role: embeddings, norms, head, LoRA."""
    roles = {"embed_tokens": "embeddings", "norm": "norms", "score": "head", "lora_": "lora"}
    found: dict[str, set[torch.dtype]] = {}
    for name, p in model.named_parameters():
        role = next((r for key, r in roles.items() if key in name), None)
        if role and p.dtype != torch.uint8:
            found.setdefault(role, set()).add(p.dtype)
    return found


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
@pytest.mark.parametrize("fp32_residual", [True, False])
def test_the_residual_stream_is_fp32_only_when_asked(arch, fp32_residual, qwen_path, gemma_path, tokenizer) -> None:
    """nf4 in bf16: peft's upcast leaves embeddings and norms fp32 (the default); without it they are bf16 as
    loaded, the head fp32 either way, and a step under bf16 autocast gives every LoRA weight a finite gradient.
    Without autocast (the CPU in bf16) the step runs too: the head reads its features in fp32."""
    path = qwen_path if arch == "qwen2" else gemma_path
    model = load_classifier(
        ModelConfig(model_path=path, load_in_4bit=True, dtype="bf16"),
        tokenizer.pad_token_id,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        fp32_residual=fp32_residual,
    )
    dtypes = _dtypes(model)
    stream = {torch.float32} if fp32_residual else {torch.bfloat16}
    assert dtypes["embeddings"] == dtypes["norms"] == stream
    assert dtypes["head"] == {torch.float32}
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden: list[torch.dtype] = []  # the dtype of the final norm's output: the residual stream's
    model.get_base_model().model.norm.register_forward_hook(lambda *args: hidden.append(args[-1].dtype))
    for autocast in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert len(grads) == 14 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert hidden == [torch.float32 if fp32_residual else torch.bfloat16] * 2


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["nf4", "full"])
def test_recompute_every_keeps_the_other_layers_activations_and_the_gradients(load_in_4bit, qwen_path, tokenizer):
    """Checkpointing every layer keeps the fewest activations for backward, none the most; recompute_every=2 checkpoints
    layer 0 of the tiny model's two and keeps layer 1's, in between. The LoRA gradients are the same in all three."""
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    saved, flags, grads = {}, {}, {}
    for name, checkpointing, every in (("none", False, 1), ("all", True, 1), ("every 2", True, 2)):
        torch.manual_seed(0)
        model = load_classifier(
            ModelConfig(model_path=qwen_path, load_in_4bit=load_in_4bit),
            tokenizer.pad_token_id,
            lora=LoraSettings(r=4, alpha=8, dropout=0.0),
            gradient_checkpointing=checkpointing,
            recompute_every=every,
        )
        flags[name] = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
        sizes: list[int] = []  # bytes of every tensor the forward keeps for backward (outside checkpointed layers)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, kept=sizes: kept.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
        saved[name] = sum(sizes)
        grads[name] = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert flags == {"none": [False, False], "all": [True, True], "every 2": [True, False]}
    assert saved["all"] < saved["every 2"] < saved["none"], saved
    for name in ("all", "every 2"):
        assert grads[name].keys() == grads["none"].keys() and len(grads["none"]) == 14
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[name][n], g, msg=f"{name}: {n}")


def test_recompute_only_every_needs_checkpointing_on(qwen_path, tokenizer) -> None:
    model = load_classifier(ModelConfig(model_path=qwen_path), tokenizer.pad_token_id, lora=LoraSettings(r=4))
    with pytest.raises(ValueError, match="not enabled"):
        recompute_only_every(model, 2)


def test_adapter_changes_predictions_and_reproduces_training(trained, base_4bit, qwen_path, tokenizer, val_rows):
    """The saved adapter (LoRA + head) reloaded on the 4-bit base gives what the trained model predicted."""
    val, rows = val_rows
    tuned = load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, adapter=trained.result.adapter_dir
    )
    assert not tuned.training
    pad_id = tokenizer.pad_token_id
    p_base = predict_proba(base_4bit, rows, pad_id, batch_tokens=4096).probs
    p_tuned = predict_proba(tuned, rows, pad_id, batch_tokens=4096).probs
    assert np.abs(p_base - p_tuned).max() > 0.1
    saved = pd.read_parquet(trained.cfg.data.out_dir / "val_predictions.parquet")
    assert saved["id"].tolist() == val["id"].tolist()
    np.testing.assert_allclose(p_tuned, saved[["p_a", "p_b"]].to_numpy(), atol=1e-4)


def test_training_after_evaluation_works_whatever_the_cpu(qwen_path, tokenizer, monkeypatch) -> None:
    """A 4-bit model trains after a no-grad evaluation, and no-grad logits are the ones training sees.

    bitsandbytes is made to believe the CPU has AVX512-BF16 (as Zen 4 / Sapphire Rapids do), so that its in-place
    repack for a bf16 CPU kernel would run on this machine too: the loader must turn that path off.
    """
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    model = load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True),
        tokenizer.pad_token_id,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert len(flags) == 14 and not any(flags)
    ids = torch.randint(1, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids).logits.sum().backward()
    graded = model(input_ids=ids).logits.detach()  # the training path: dequantise, then matmul in fp32
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    torch.testing.assert_close(evaluated, graded, rtol=0, atol=1e-5)
    model.train()
    model(input_ids=ids).logits.sum().backward()  # raised "a view of a leaf Variable ..." with the repack


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_classifier(ModelConfig(model_path=tmp_path), pad_token_id=0)


def test_tokenizer_has_a_pad_token(qwen_path) -> None:
    tok = load_tokenizer(qwen_path)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643


def test_a_tokenizer_is_parsed_once_per_folder_until_its_files_change(qwen_path, tmp_path) -> None:
    import json
    import shutil

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_path / name, folder / name)
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first and load_tokenizer(tmp_path / "." / "tok") is first
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"model_max_length": 77}))
    changed = load_tokenizer(folder)
    assert changed is not first and changed.model_max_length == 77


def test_devices() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") == torch.device(expected)
    assert compute_dtype(torch.device("cpu")) == torch.float32
