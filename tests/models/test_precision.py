"""kaggle_utils.models.precision: fp32 compute on a loaded fp16 model, equal to an fp32 load, and put back exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.models.precision import copy_weights, fp32_compute

# three rows of 96 random token ids (no padding: the comparison is about arithmetic, not pooling)
IDS = torch.randint(0, 150_000, (3, 96), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def load(path, tokenizer, load_in_4bit: bool, dtype: str = "fp16"):
    cfg = ModelConfig(model_path=path, load_in_4bit=load_in_4bit, device="cpu", dtype=dtype)
    return load_classifier(cfg, tokenizer.pad_token_id)


def with_lora(model, seed: int = 0):
    """A random LoRA on every linear layer, kept in the base's fp16: peft casts inputs to lora_A's dtype."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules="all-linear")
    model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero: the adapter would change nothing
    return model.eval()


def snapshot(model) -> dict:
    """Every parameter and buffer: the object, its storage, dtype and values; the 4-bit layers' compute dtypes."""
    state = {f"param {n}": (p, p.data_ptr(), p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    state |= {f"buffer {n}": (b, b.data_ptr(), b.dtype, b.clone()) for n, b in model.named_buffers()}
    four_bit = {n: m for n, m in model.named_modules() if hasattr(m, "compute_type_is_set")}  # bnb Linear4bit
    state |= {f"4bit {n}": (m.compute_dtype, m.compute_type_is_set) for n, m in four_bit.items()}
    return state


def assert_same(before: dict, model) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, was in before.items():
        now = after[key]
        if key.startswith("4bit"):
            assert now == was, key
            continue
        assert now[0] is was[0], f"{key}: not the original object"
        assert now[1] == was[1] and now[2] == was[2], f"{key}: storage or dtype changed"
        assert torch.equal(now[3], was[3]), f"{key}: values changed"


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "fp16-lora"])
def test_fp16_model_computes_like_its_fp32_copy(arch, lora, qwen_path, gemma_path, tokenizer) -> None:
    model = load(qwen_path if arch == "qwen2" else gemma_path, tokenizer, load_in_4bit=False)
    if lora:
        model = with_lora(model)
    reference = logits(copy.deepcopy(model).float())  # the same fp16 values, in fp32 arithmetic
    fp16 = logits(model)
    with fp32_compute(model) as switched:
        safe = logits(model)
    assert safe.dtype == torch.float32 and fp16.dtype == torch.float16
    torch.testing.assert_close(safe, reference, rtol=0, atol=1e-6)
    assert (fp16.float() - reference).abs().max() > 1e-5  # the reference does tell fp16 from fp32
    # 7 linears x 2 layers + the head (+ the head's trainable copy, an adapter module, held in fp32 whole)
    assert switched.quantized_layers == 0 and switched.streamed_linears == 15 and switched.embeddings_hooked
    assert switched.largest_streamed_bytes == 4 * 64 * 128  # one MLP weight, fp32, for one call


def test_fp32_compute_holds_under_a_callers_autocast(qwen_path, tokenizer) -> None:
    """Training validates under autocast: inside the block the forward still computes in fp32 (an autocast left
    on would put every matmul back in half precision, and overflowing rows would stay NaN)."""
    model = load(qwen_path, tokenizer, load_in_4bit=False)
    reference = logits(copy.deepcopy(model).float())
    with torch.autocast("cpu", dtype=torch.bfloat16), fp32_compute(model):
        safe = logits(model)
    assert safe.dtype == torch.float32
    torch.testing.assert_close(safe, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_nf4_safe_path_matches_an_fp32_compute_load(arch, qwen_path, gemma_path, tokenizer) -> None:
    path = qwen_path if arch == "qwen2" else gemma_path
    nf4_fp16 = load(path, tokenizer, load_in_4bit=True, dtype="fp16")
    nf4_fp32 = load(path, tokenizer, load_in_4bit=True, dtype="fp32")
    copy_weights(nf4_fp16, nf4_fp32)  # the same 4-bit codes: the loads differ in compute dtype alone
    reference = logits(nf4_fp32)
    fp16 = logits(nf4_fp16)
    with fp32_compute(nf4_fp16) as switched:
        safe = logits(nf4_fp16)
    torch.testing.assert_close(safe, reference, rtol=0, atol=1e-6)
    assert (fp16.float() - reference).abs().max() > 1e-5
    assert switched.quantized_layers == 14 and switched.streamed_linears == 1  # the head stays unquantised
    assert all(m.compute_dtype == torch.float32 for n, m in nf4_fp32.named_modules() if n.endswith("q_proj"))


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp16", "nf4"])
@pytest.mark.parametrize("how", ["returns", "raises"])
def test_everything_is_put_back_exactly(load_in_4bit, how, qwen_path, tokenizer) -> None:
    model = with_lora(load(qwen_path, tokenizer, load_in_4bit=load_in_4bit))
    before = snapshot(model)
    fp16 = logits(model)
    assert any(v[2] == torch.float16 for k, v in before.items() if "lora_A" in k)  # upcast inside, fp16 again after
    if how == "raises":
        # fail inside a layer's call, after its weights were swapped for fp32 copies
        down = next(m for n, m in model.named_modules() if n.endswith("mlp.down_proj.base_layer"))

        def boom(*_):
            raise RuntimeError("boom")

        handle = down.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"), fp32_compute(model):
            logits(model)
        handle.remove()
    else:
        with fp32_compute(model):
            assert logits(model).dtype == torch.float32
    assert_same(before, model)
    assert torch.equal(logits(model), fp16)  # the fp16 forward afterwards is bit-for-bit the one before


def test_a_model_in_fp32_is_left_as_it_is(qwen_path, tokenizer) -> None:
    model = load(qwen_path, tokenizer, load_in_4bit=False, dtype="fp32")
    before = snapshot(model)
    with fp32_compute(model) as switched:
        assert not switched.changed
    assert_same(before, model)


def test_other_quantised_weights_are_refused_by_name(qwen_path, tokenizer) -> None:
    model = load(qwen_path, tokenizer, load_in_4bit=False)
    proj = model.model.layers[1].mlp.up_proj
    proj.weight = torch.nn.Parameter(torch.zeros(proj.weight.shape, dtype=torch.int8), requires_grad=False)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is torch\.int8"):
        with fp32_compute(model):
            pass
    assert_same(before, model)  # refused before anything was changed
