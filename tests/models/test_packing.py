"""Packed rows give each row the logits and gradients it gets alone in a padded batch (models/packing.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_utils.inputs.batching import pad
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier
from kaggle_utils.models.packing import classifier_head, pack, packed_logits, packed_name

# 300 > the tiny Gemma2's sliding window (256): its local layers must cut that row's attention at 256 tokens
LENGTHS = (37, 300, 5, 90)


def _rows(pad_id: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, 5000, n) for n in LENGTHS]  # never the pad id


def _model(path, inner: str, pad_id: int, checkpointing: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(model_path=path, load_in_4bit=False, device="cpu", attn_implementation=packed_name(inner))
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)  # no dropout: the two passes must see the same network
    model = load_classifier(cfg, pad_id, lora=lora, gradient_checkpointing=checkpointing)
    with torch.no_grad():  # a fresh LoRA's B is zero: make the adapter count in the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("which,inner", [("qwen", "sdpa"), ("gemma", "eager")])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_match_padded_rows(which, inner, checkpointing, qwen_path, gemma_path, tokenizer):
    pad_id = tokenizer.pad_token_id
    model = _model(qwen_path if which == "qwen" else gemma_path, inner, pad_id, checkpointing)
    rows = _rows(pad_id)
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0], [2.0, 0.25]])  # a loss touching every logit

    padded = model(**pad([r.tolist() for r in rows], pad_id)).logits  # (4, 2)
    (padded * weights).sum().backward()
    padded_grads = _grads(model)

    inputs, ends = pack(rows)
    packed = packed_logits(model, classifier_head(model), inputs, ends)
    (packed * weights).sum().backward()
    packed_grads = _grads(model)

    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-4)
    assert padded_grads.keys() == packed_grads.keys() and any("lora_A" in n for n in packed_grads)
    for name, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_a_packed_row_does_not_see_its_neighbours(qwen_path, tokenizer):
    model = _model(qwen_path, "sdpa", tokenizer.pad_token_id, checkpointing=False).eval()
    rows = _rows(tokenizer.pad_token_id)
    changed = [rows[0][::-1].copy(), *rows[1:]]  # the first row's tokens reversed
    with torch.no_grad():
        a = packed_logits(model, classifier_head(model), *pack(rows))
        b = packed_logits(model, classifier_head(model), *pack(changed))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[1:], b[1:], atol=1e-6, rtol=1e-5)


def test_pack_restarts_positions_and_marks_row_ends():
    inputs, ends = pack([[7, 8, 9], [4], [5, 6]])
    assert inputs["input_ids"].tolist() == [[7, 8, 9, 4, 5, 6]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert inputs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and inputs["max_length_q"] == 3
    assert ends.tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="empty"):
        pack([[1], []])


def test_packing_needs_sdpa_or_eager_underneath():
    assert packed_name("sdpa") == "packed_sdpa" and packed_name("packed_sdpa") == "packed_sdpa"
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed_name("flash_attention_2")
