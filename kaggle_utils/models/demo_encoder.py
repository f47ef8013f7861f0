"""A tiny mDeBERTa-v3 stand-in for the multiple-choice stage: DeBERTa-v2 architecture, real Qwen2.5 tokenizer.

``microsoft/mdeberta-v3-base`` cannot be downloaded here, so the demo and the tests use a
``DebertaV2ForMultipleChoice`` with mDeBERTa-v3's architecture settings (relative attention with 256 position
buckets, shared attention keys, c2p + p2c, no absolute positions, no token types) at a few layers of width 32,
random weights, saved with ``save_pretrained``. The stage loads it through ``AutoModelForMultipleChoice`` and
``AutoTokenizer`` exactly as it loads the real weights.

The tokenizer is the project's offline Qwen2.5 BPE (:func:`kaggle_utils.models.demo.build_qwen_tokenizer`; mDeBERTa's
SentencePiece model is not on PyPI) with a BERT-style pair template added, so that ``tokenizer(prompt, response)``
gives ``[CLS] prompt [SEP] response [SEP]`` as mDeBERTa's does: ``<|im_start|>`` plays [CLS], ``<|im_end|>``
plays [SEP] and ``<|endoftext|>`` pads. The embedding has Qwen's 151,936 rows.

``python -m kaggle_utils.models.demo_encoder --out-dir demo/models`` writes ``mdeberta-tiny/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaggle_utils.config.cli import parse_config
from kaggle_utils.models.demo import QWEN_SPECIAL_TOKENS, QWEN_VOCAB_SIZE, build_qwen_tokenizer

# the folder build_demo_encoder writes under its out_dir
DEMO_ENCODER_NAME = "mdeberta-tiny"
# Qwen2.5's special tokens in the roles of DeBERTa's [CLS], [SEP] and [PAD]
CLS_TOKEN, SEP_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass
class DemoEncoderConfig:
    """A tiny random-weight DeBERTa-v2 multiple-choice model with the real Qwen2.5 tokenizer."""

    # folder that receives mdeberta-tiny/
    out_dir: Path = Path("demo/models")
    # hidden size (mdeberta-v3-base: 768)
    hidden_size: int = 32
    # transformer layers (mdeberta-v3-base: 12)
    num_layers: int = 2
    # attention heads (mdeberta-v3-base: 12)
    num_heads: int = 2
    # seed for the random weights
    seed: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")


def encoder_tokenizer(qwen_tokenizer=None):
    """A new fast tokenizer: Qwen2.5's BPE with a ``[CLS] A [SEP] B [SEP]`` pair template (token types 0, 1).

    ``qwen_tokenizer`` (from :func:`build_qwen_tokenizer`, or loaded from a folder it was saved to) is copied, not
    changed; without it the Qwen2.5 tokenizer is built (~3-8 s).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    base = qwen_tokenizer if qwen_tokenizer is not None else build_qwen_tokenizer()
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    cls_id, sep_id = QWEN_SPECIAL_TOKENS[CLS_TOKEN], QWEN_SPECIAL_TOKENS[SEP_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN} $A {SEP_TOKEN}",
        pair=f"{CLS_TOKEN} $A {SEP_TOKEN} $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        cls_token=CLS_TOKEN,
        sep_token=SEP_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        # what mDeBERTa's tokenizer returns (its model ignores the types: type_vocab_size = 0)
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tok.model_max_length = 512
    return tok


def encoder_config(cfg: DemoEncoderConfig):
    """mdeberta-v3-base's config.json at a tiny width (values as in microsoft/mdeberta-v3-base)."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        layer_norm_eps=1e-7,
        type_vocab_size=0,
        pad_token_id=QWEN_SPECIAL_TOKENS[PAD_TOKEN],
    )


def build_demo_encoder(cfg: DemoEncoderConfig, qwen_tokenizer=None) -> Path:
    """Write ``mdeberta-tiny`` (weights, config and tokenizer) under ``cfg.out_dir``; returns its path."""
    import torch
    from transformers import DebertaV2ForMultipleChoice

    tok = encoder_tokenizer(qwen_tokenizer)
    torch.manual_seed(cfg.seed)
    model = DebertaV2ForMultipleChoice(encoder_config(cfg))
    path = cfg.out_dir / DEMO_ENCODER_NAME
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    print(build_demo_encoder(parse_config(DemoEncoderConfig, argv)))


if __name__ == "__main__":
    main()
