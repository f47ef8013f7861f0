"""kaggle_utils.models.demo: the tiny Gemma2 keeps the real model's activation scale, so it can learn."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2ForSequenceClassification


def rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def gemma_scales(gemma_path) -> dict[str, tuple[float, float]]:
    """RMS of the input and output of the embedding and of every post-norm, on random tokens, at init."""
    model = Gemma2ForSequenceClassification.from_pretrained(gemma_path, attn_implementation="eager").eval()
    scales: dict[str, tuple[float, float]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, o, n=name: scales.__setitem__(n, (rms(i[0]), rms(o))))
        for name, module in model.named_modules()
        if name.endswith(("post_attention_layernorm", "post_feedforward_layernorm"))
    ]
    ids = torch.randint(0, 150_000, (2, 128), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        scales["embed"] = (0.0, rms(model.model.embed_tokens(ids)))  # the module applies the sqrt(width) scale
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return scales


def test_tiny_gemma2_post_norms_do_not_blow_up_sublayer_outputs(gemma_scales) -> None:
    # Gemma2 RMS-normalises each sublayer output before the residual add. At the 9B's initializer std (0.02) and width
    # 64 the sublayer outputs have RMS ~0.003 and the post-norms scale them up ~300x, which made the demo student's
    # LoRA steps ~6x too large and kept it at chance; at std 1/sqrt(width) the gain is a few x, as at the real width.
    gains = {name: out / inp for name, (inp, out) in gemma_scales.items() if name != "embed"}
    assert len(gains) == 4  # 2 layers x (attention, feed-forward)
    assert max(gains.values()) < 10, gains


def test_tiny_gemma2_embeddings_enter_at_unit_scale(gemma_scales) -> None:
    # Gemma2 multiplies embeddings by sqrt(hidden_size): with std 1/sqrt(hidden_size) tokens enter at RMS ~1, on a
    # par with the normalised sublayer outputs they are added to (at 0.02 they entered at 0.16 and were drowned)
    assert 0.8 < gemma_scales["embed"][1] < 1.25, gemma_scales["embed"]
