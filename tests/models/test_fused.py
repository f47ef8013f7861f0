"""The speed options of kaggle_utils.models.fused, on the CPU: the no-op off CUDA, the refusals, and the wiring of
the fused kernels (liger's ops replaced by torch stand-ins with their signatures: the same model must compute the
same logits and LoRA gradients through them, so a wrong norm offset or an MLP that bypasses LoRA fails here)."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from kaggle_utils.models.fused import (
    FAMILIES,
    FusedKernelsError,
    apply_fused_kernels,
    compile_decoder_layers,
    decoder_layers,
    family_of,
    patch_model,
    restore_torch_rope,
)
from kaggle_utils.models.fused_lora import apply_fused_lora, lora_layers
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier

CPU = torch.device("cpu")


def _lora_model(path, pad_id: int):
    """The tiny model as training loads it (nf4 + LoRA, dropout 0), LoRA B drawn so that every LoRA weight gets a
    gradient (peft starts B at zero)."""
    torch.manual_seed(0)
    model = load_classifier(ModelConfig(model_path=path, device="cpu"), pad_id, lora=LoraSettings(4, 8, 0.0))
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1
    return model


def _pass(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits  # (rows, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _stand_in_ops(calls: Counter) -> SimpleNamespace:
    """liger's functional ops' signatures, computed in torch as liger documents them (and counted)."""

    def rms_norm(x, w, eps, offset, casting_mode, in_place):
        calls["rms_norm"] += 1
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        if casting_mode == "gemma":  # everything in fp32, then the input's dtype
            return (normed * (offset + w.float())).to(x.dtype)
        return (offset + w) * normed.to(x.dtype)

    def gate(act):
        def fused(a, b):
            calls["gate"] += 1
            return act(a) * b

        return fused

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    return SimpleNamespace(
        liger_rms_norm=rms_norm,
        liger_swiglu=gate(torch.nn.functional.silu),
        liger_geglu=gate(lambda a: torch.nn.functional.gelu(a, approximate="tanh")),
        liger_rope=rope,
    )


@pytest.mark.parametrize("name", ["qwen2-tiny", "gemma2-tiny"])
def test_the_fused_wiring_computes_what_the_models_torch_code_computes(models, tokenizer, monkeypatch, name):
    model = _lora_model(models[name], tokenizer.pad_token_id)
    family = family_of(model)
    modeling = importlib.import_module(family.modeling)
    # the RoPE dispatcher is process-wide: put the original back when the test ends
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    logits, grads = _pass(model, ids)

    calls: Counter = Counter()
    counts = patch_model(model, family, _stand_in_ops(calls), device_type="cpu")
    fused_logits, fused_grads = _pass(model, ids)

    layers = len(decoder_layers(model))
    norms_per_layer = 4 if name.startswith("gemma2") else 2  # Gemma2 also norms before and after the MLP
    assert counts == {"rms_norm": norms_per_layer * layers + 1, "mlp": layers, "rope": layers}
    assert calls == {"rms_norm": norms_per_layer * layers + 1, "gate": layers, "rope": layers}
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == fused_grads.keys() and any("mlp.gate_proj.lora_A" in n for n in grads)
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(fused_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    rope = modeling.apply_rotary_pos_emb
    restore_torch_rope()  # what a benchmark does before a variant without the kernels
    assert modeling.apply_rotary_pos_emb is rope.torch_rope


def test_off_cuda_both_options_are_a_printed_no_op(qwen_path, tokenizer, capsys):
    model = _lora_model(qwen_path, tokenizer.pad_token_id)
    modeling = importlib.import_module(FAMILIES["qwen2"].modeling)
    rope = modeling.apply_rotary_pos_emb
    assert apply_fused_kernels(model, CPU) == {}
    assert compile_decoder_layers(model, CPU) == 0
    out = capsys.readouterr().out
    assert "fused_kernels: cpu is not a CUDA device" in out and "compile_layers: cpu is not a CUDA device" in out
    assert modeling.apply_rotary_pos_emb is rope
    assert not [n for n, m in model.named_modules() if "forward" in vars(m)]  # no instance got a new forward


def test_on_cuda_without_liger_the_error_names_the_install(qwen_path, tokenizer, monkeypatch):
    model = _lora_model(qwen_path, tokenizer.pad_token_id)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel... raises ImportError
    # refused before any CUDA call, so this runs on a machine without a GPU
    with pytest.raises(FusedKernelsError, match="pip install liger-kernel"):
        apply_fused_kernels(model, torch.device("cuda"))


@pytest.mark.parametrize(
    "config, why",
    [
        (dict(model_type="mistral"), r"no fused kernels for model_type 'mistral' \(supported: \['gemma2', 'llama'"),
        (dict(model_type="gemma2", hidden_activation="gelu"), r"hidden_activation='gelu'.*gelu_pytorch_tanh"),
        (dict(model_type="qwen2", hidden_act="relu"), r"hidden_act='relu'"),
    ],
)
def test_an_architecture_the_kernels_do_not_reproduce_is_refused_on_every_device(config, why):
    model = SimpleNamespace(config=SimpleNamespace(**config))
    with pytest.raises(FusedKernelsError, match=why):
        apply_fused_kernels(model, CPU)


def test_the_train_stage_applies_the_options_it_is_given(qwen_path, prepared, tmp_path, capsys):
    from kaggle_utils.train import TrainConfig, _load_model
    from kaggle_utils.training.parallel import Parallel

    cfg = TrainConfig.flat(model_path=qwen_path, train_file=prepared["train"], out_dir=tmp_path, device="cpu")
    pad = 0
    _load_model(cfg, Parallel.from_env(cfg.model), pad)
    assert "fused_kernels" not in capsys.readouterr().out
    on = cfg.replace(fused_kernels=True, compile_layers=True)
    _load_model(on, Parallel.from_env(on.model), pad)
    out = capsys.readouterr().out
    assert "fused_kernels: cpu is not a CUDA device" in out and "compile_layers: cpu is not a CUDA device" in out
    fused = cfg.replace(fused_lora=True)
    layers = lora_layers(_load_model(fused, Parallel.from_env(fused.model), pad))
    assert layers and all("forward" in vars(m) for m in layers)  # each LoRA layer got the one-GEMM forward
    assert not any("forward" in vars(m) for m in lora_layers(_load_model(cfg, Parallel.from_env(cfg.model), pad)))


def _counting_peft_forwards(model) -> Counter:
    """Count the calls of peft's own forward of every LoRA linear layer (wrapped before the fused path is bound)."""
    calls: Counter = Counter()
    for layer in lora_layers(model):

        def counted(*args, _peft=layer.forward, **kwargs):
            calls["peft"] += 1
            return _peft(*args, **kwargs)

        layer.forward = counted
    return calls


@pytest.mark.parametrize("name", ["qwen2-tiny", "gemma2-tiny"])
def test_fused_lora_computes_peft_s_logits_and_gradients_without_peft_s_forward(models, tokenizer, name):
    """nf4 + LoRA in fp32 on the CPU: the one-GEMM update gives the logits and LoRA gradients of peft's forward, and
    no layer falls back to peft's."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    logits, grads = _pass(_lora_model(models[name], tokenizer.pad_token_id), ids)
    model = _lora_model(models[name], tokenizer.pad_token_id)
    calls = _counting_peft_forwards(model)
    assert apply_fused_lora(model) == len(lora_layers(model)) > 0
    fused_logits, fused_grads = _pass(model, ids)
    assert calls == {}
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == fused_grads.keys()
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(fused_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_lora_under_bf16_autocast_matches_peft_to_bf16_rounding(qwen_path, tokenizer):
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = _pass(_lora_model(qwen_path, tokenizer.pad_token_id), ids)
        model = _lora_model(qwen_path, tokenizer.pad_token_id)
        calls = _counting_peft_forwards(model)
        apply_fused_lora(model)
        fused_logits, fused_grads = _pass(model, ids)
    assert calls == {} and fused_logits.dtype == torch.bfloat16
    torch.testing.assert_close(fused_logits, logits, rtol=0.03, atol=0.03)
    for n, g in grads.items():
        assert (fused_grads[n] - g).norm() <= 0.03 * g.norm(), n


def test_fused_lora_draws_peft_s_dropout_and_leaves_disabled_adapters_to_peft(qwen_path, tokenizer):
    """With dropout 0.1 in train mode the fused path takes the same random draws as peft (the same logits and
    gradients from the same seed); with the adapters disabled, peft's forward runs."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(4))

    def dropped(fused: bool):
        torch.manual_seed(0)
        model = load_classifier(
            ModelConfig(model_path=qwen_path, device="cpu"), tokenizer.pad_token_id, lora=LoraSettings(4, 8, 0.1)
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1
        calls = _counting_peft_forwards(model)
        if fused:
            apply_fused_lora(model)
        torch.manual_seed(5)
        return _pass(model, ids), calls, model

    (logits, grads), _, _ = dropped(fused=False)
    (fused_logits, fused_grads), calls, model = dropped(fused=True)
    assert calls == {} and model.training
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(fused_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    with model.disable_adapter():
        model(input_ids=ids)
    assert calls["peft"] == len(lora_layers(model))
