"""Loading sequence classifiers: full precision or 4-bit nf4, with a LoRA adapter to train or to apply.

One loader for every stage and every size: a tiny demo model and Qwen2.5-14B take the same path
(``AutoModelForSequenceClassification.from_pretrained`` on a local folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``cuda`` when a GPU is visible (first GPU), else ``cpu``; or exactly what was requested."""
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it (A100/H100), fp16 on older GPUs (T4 is sm_75: no bf16), fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class ModelConfig:
    """Which weights to load and how."""

    # local folder of a sequence-classification model (config.json + weights + tokenizer)
    model_path: Path = Path("demo/models/qwen2-tiny")
    # load the base weights as 4-bit nf4 with bitsandbytes (double quantisation); else full precision
    load_in_4bit: bool = True
    # "auto" (first GPU if any, else CPU), or a torch device string such as "cuda:1"
    device: str = "auto"
    # attention kernel; "auto" picks eager for Gemma2 (its logit soft-capping is ignored by sdpa), sdpa otherwise
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)


@dataclass
class LoraSettings:
    """LoRA on every linear layer of the base; the classification head is trained in full."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        # decoder models often ship without a pad token; the classifier needs one to find the last real token
        tok.pad_token = tok.eos_token
    return tok


def _attn_impl(cfg: ModelConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(cfg.model_path).model_type
    return "eager" if model_type.startswith("gemma2") else "sdpa"


def load_classifier(
    cfg: ModelConfig,
    pad_token_id: int,
    adapter: Path | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
):
    """Load the base classifier; apply a saved ``adapter``, or attach a new trainable ``lora``.

    Returns the model on ``pick_device(cfg.device)``, in train mode with LoRA, else in eval mode.
    """
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    if not (cfg.model_path / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.model_path}: no config.json; expected a model folder saved by save_pretrained")
    device = pick_device(cfg.device)
    dtype = compute_dtype(device)
    kwargs = {"dtype": dtype, "num_labels": 2, "attn_implementation": _attn_impl(cfg)}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # the 2-way head is new and tiny: keep it in full precision so it can be trained
            llm_int8_skip_modules=["score"],
        )
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model_path, **kwargs)
    if not cfg.load_in_4bit:
        model.to(device)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False

    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        return model
    if lora is None:
        model.eval()
        return model

    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear",
    )
    model = get_peft_model(model, peft_cfg)
    model.train()
    return model


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())
