"""Merge a LoRA adapter trained on a 4-bit nf4 base into dense weights, the way the adapter was learned.

QLoRA learns the update ``ΔW = (lora_alpha / r) · B @ A`` against the weights its forward pass used,
``dequantize(nf4(W))``, not against the original ``W`` (docs/facts.md §4). So:

* ``merge_dequantized`` (the right way) loads the base exactly as training did (``load_classifier``: nf4, double
  quantisation, the device's compute dtype, ``score`` left dense), dequantises every 4-bit linear weight, adds peft's
  own ``get_delta_weight`` in fp32, takes the trained ``score`` head from the adapter (``modules_to_save``) and saves a
  plain dense model (fp16 by default) with ``save_pretrained``: ``from_pretrained`` loads it with no peft and no
  bitsandbytes, and it scores like the unmerged nf4 + adapter model up to rounding.
* ``merge_naive`` (the wrong way, kept only to measure it) adds the same ``ΔW`` to the original weights. Every
  linear layer then moves by the quantisation error ``W - dequantize(nf4(W))`` that training had compensated: the
  "significant degradation" the seed team saw. (peft's ``merge_and_unload`` on a 4-bit model is a third wrong way:
  it adds ``ΔW`` to the dequantised weight and re-quantises the sum to nf4, rounding most of the update away.)

``export_int8`` re-quantises the merged folder to bitsandbytes int8 (``load_in_8bit``) and saves it with
``save_pretrained``; that copy needs bitsandbytes to load. bitsandbytes 0.50.2 runs int8 on the CPU as well.

``python -m kaggle_utils.models.merge --base-model BASE --adapter RUN/adapter --out-dir MERGED [--dtype fp16]``
writes ``MERGED/`` (config.json, model.safetensors, tokenizer, the adapter's train_config.json) and
``MERGED/merge_info.json`` (inputs, dtype, and the max |Δ logit| against the unmerged model on ``--check-file`` rows).

Memory: the nf4 base + adapter sits on ``device``; the dense model is built on the CPU in the output dtype
(Qwen2.5-14B in fp16: ~30 GB of RAM); the check loads the saved model again on ``device``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kaggle_utils.config.cli import parse_config
from kaggle_utils.inputs.batching import pad
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import (
    ModelConfig,
    compute_dtype,
    load_classifier,
    load_tokenizer,
    model_device,
    pick_device,
)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INFO_FILE = "merge_info.json"
INT8_DIR = "int8"
TRAIN_CONFIG = "train_config.json"


@dataclass
class MergeConfig:
    """Merge a LoRA adapter into dense weights of its base; the saved folder needs neither peft nor bitsandbytes."""

    # local folder of the base model the adapter was trained on (config.json + weights), as training loaded it
    base_model: Path
    # adapter folder written by the train stage (adapter_config.json + adapter_model.safetensors [+ tokenizer])
    adapter: Path
    # folder that receives the merged model, its tokenizer, the adapter's train_config.json and merge_info.json
    out_dir: Path
    # dtype of the saved weights: "fp16" (T4s have no bf16), "bf16" or "fp32"
    dtype: str = "fp16"
    # where the nf4 base is loaded, dequantised and checked: "auto" (first GPU, else CPU) or a torch device string;
    # pick the kind of device that trained the adapter, so the nf4 codes are built from the same compute dtype
    device: str = "auto"
    # parquet of rows (prompt, response_a, response_b) scored by the unmerged and the merged model; "" skips the check
    check_file: Path | None = None
    # score at most this many rows of check_file (its first rows)
    check_rows: int = 32
    # tokens per check row (default "tagged" template, right truncation: any fixed rows compare the two models)
    check_max_length: int = 512
    # also write a bitsandbytes int8 copy of the merged model to out_dir/int8 (needs bitsandbytes to load)
    export_int8: bool = False

    def __post_init__(self) -> None:
        self.base_model, self.adapter, self.out_dir = Path(self.base_model), Path(self.adapter), Path(self.out_dir)
        # an empty string (a flag left empty) means no check
        self.check_file = Path(self.check_file) if self.check_file else None
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.check_rows < 1 or self.check_max_length < 64:
            raise ValueError(
                f"need check_rows >= 1 and check_max_length >= 64; got {self.check_rows}, {self.check_max_length}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class MergeResult:
    # the merged model folder (and out_dir/int8 when exported)
    out_dir: Path
    # what merge_info.json holds
    info: dict


def merge_dequantized(cfg: MergeConfig) -> MergeResult:
    """The right merge: ``dequantize(nf4(W)) + ΔW`` for every LoRA layer, saved dense (see the module docstring)."""
    return _merge(cfg, dequantize=True)


def merge_naive(cfg: MergeConfig) -> MergeResult:
    """THE WRONG WAY, kept only to measure it: ``W + ΔW`` with the original full-precision ``W``.

    The adapter never saw ``W``: it was trained on ``dequantize(nf4(W))``, so this merge adds the quantisation error
    to every layer. Use ``merge_dequantized``.
    """
    return _merge(cfg, dequantize=False)


def _check_paths(cfg: MergeConfig) -> None:
    if not (cfg.base_model / "config.json").is_file():
        raise FileNotFoundError(
            f"{cfg.base_model}: no config.json; --base-model must be the model folder the adapter was trained on"
        )
    if not (cfg.adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{cfg.adapter}: no adapter_config.json; --adapter must be the adapter/ folder the train stage wrote"
        )
    if cfg.check_file is not None and not cfg.check_file.is_file():
        raise FileNotFoundError(f"{cfg.check_file}: no such check file; give a parquet with prompt/response_a/b")


def _tokenizer_dir(cfg: MergeConfig) -> Path:
    """The adapter's own tokenizer when it saved one (what training used), else the base model's."""
    return cfg.adapter if (cfg.adapter / "tokenizer_config.json").is_file() else cfg.base_model


def _merge(cfg: MergeConfig, dequantize: bool) -> MergeResult:
    """Load the trained model, build and save the dense merge, then check it (and the int8 copy) on ``check_file``."""
    _check_paths(cfg)
    tok = load_tokenizer(_tokenizer_dir(cfg))
    # the model as trained: nf4 base + LoRA + trained head, on cfg.device
    trained = load_classifier(ModelConfig(model_path=cfg.base_model, device=cfg.device), tok.pad_token_id, cfg.adapter)
    dense, counts = build_dense(cfg, trained, dequantize)
    dense.config.pad_token_id = tok.pad_token_id
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(cfg.out_dir)
    tok.save_pretrained(cfg.out_dir)
    if (cfg.adapter / TRAIN_CONFIG).is_file():
        # inference reads max_length, template and truncation from it, as beside an adapter
        shutil.copyfile(cfg.adapter / TRAIN_CONFIG, cfg.out_dir / TRAIN_CONFIG)
    del dense  # the check reloads what was saved, through the loader inference uses
    peft_cfg = trained.peft_config[trained.active_adapter]
    info = {
        "method": "dequantized" if dequantize else "naive (original weights: the wrong way)",
        "base_model": str(cfg.base_model),
        "adapter": str(cfg.adapter),
        "dtype": cfg.dtype,
        "device": str(model_device(trained)),
        "lora": {"r": peft_cfg.r, "alpha": peft_cfg.lora_alpha, "rslora": peft_cfg.use_rslora},
        **counts,
        "check": None,
        "int8": None,
    }
    rows = _check_rows(cfg, tok) if cfg.check_file is not None else None
    if rows is not None:
        merged = load_classifier(
            ModelConfig(model_path=cfg.out_dir, load_in_4bit=False, device=cfg.device), tok.pad_token_id
        )
        info["check"] = check_against(trained, merged, rows, tok.pad_token_id)
        del merged
    if cfg.export_int8:
        info["int8"] = export_int8(cfg, tok, trained, rows)
    (cfg.out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return MergeResult(cfg.out_dir, info)


def build_dense(cfg: MergeConfig, trained, dequantize: bool) -> tuple[torch.nn.Module, dict]:
    """The base in ``cfg.dtype`` on the CPU, with merged linear weights and the trained head.

    ``trained`` is the peft model on the nf4 base. Every 4-bit linear layer is dequantised (also those the adapter
    left alone: their forward pass used the dequantised weight too); LoRA layers add ``ΔW`` on top, in fp32.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    from transformers import AutoModelForSequenceClassification

    # norms, embeddings and biases are not quantised: the original checkpoint holds what training used
    dense = AutoModelForSequenceClassification.from_pretrained(cfg.base_model, dtype=cfg.torch_dtype, num_labels=2)
    adapter = trained.active_adapter
    counts = {"lora_layers": 0, "dequantized_layers": 0, "heads": []}
    with torch.no_grad():
        for name, module in trained.get_base_model().named_modules():
            if isinstance(module, LoraLayer):
                target, quantised = dense.get_submodule(name), isinstance(module.get_base_layer(), bnb.nn.Linear4bit)
                base = _dequantized(module.get_base_layer()) if dequantize and quantised else target.weight.float()
                _set(target, base + _lora_delta(module, adapter), _lora_bias(module, adapter))
                counts["lora_layers"] += 1
                counts["dequantized_layers"] += int(dequantize and quantised)
            elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
                # quantised but not adapted: still the dequantised weight, unless merging naively
                if dequantize:
                    _set(dense.get_submodule(name), _dequantized(module), None)
                    counts["dequantized_layers"] += 1
            elif isinstance(module, ModulesToSaveWrapper):
                # the head trained in full (score): the adapter's copy replaces the base's (new, random) one
                dense.get_submodule(name).load_state_dict(module.modules_to_save[adapter].state_dict())
                counts["heads"].append(name)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                raise NotImplementedError(f"{cfg.adapter}: {type(module).__name__} at {name} cannot be merged here")
    if "score" not in counts["heads"]:
        raise ValueError(f"{cfg.adapter}: no trained score head (modules_to_save); the merged head would be random")
    return dense, counts


def _dequantized(linear4bit) -> torch.Tensor:
    """The dense weight (out, in) in fp32 that ``Linear4bit``'s forward pass multiplies by: nf4 codes × block absmax."""
    import bitsandbytes.functional as bnb_f

    weight = linear4bit.weight
    return bnb_f.dequantize_4bit(weight.data, weight.quant_state).float()


def _lora_delta(layer, adapter: str) -> torch.Tensor:
    """``ΔW`` (out, in) in fp32, as peft computes it: ``scaling · B @ A``, scaling = lora_alpha / r (or / sqrt(r))."""
    if adapter in layer.lora_variant:
        # DoRA and the other variants rescale the merged weight; their merge is not ΔW added to W
        raise NotImplementedError(f"{type(layer.lora_variant[adapter]).__name__} adapters are not supported")
    # B (out, r) @ A (r, in): fp32 whatever the adapter dtype, so the sum is rounded once, at the output dtype
    return layer.get_delta_weight(adapter).float()


def _lora_bias(layer, adapter: str) -> torch.Tensor | None:
    """The bias (out,) LoRA adds when trained with ``lora_bias=True``; None otherwise."""
    return layer.lora_B[adapter].bias.float() if layer.lora_bias[adapter] else None


def _set(target: torch.nn.Linear, weight: torch.Tensor, extra_bias: torch.Tensor | None) -> None:
    if tuple(target.weight.shape) != tuple(weight.shape):
        raise ValueError(f"merged weight {tuple(weight.shape)} does not fit {tuple(target.weight.shape)}")
    # computed on the nf4 model's device in fp32, rounded once to the output dtype
    target.weight.copy_(weight.to(target.weight.device, target.weight.dtype))
    if extra_bias is not None:
        target.bias.copy_((target.bias.float() + extra_bias.to(target.bias.device)).to(target.bias.dtype))


def _check_rows(cfg: MergeConfig, tok) -> list[list[int]]:
    import pandas as pd

    df = pd.read_parquet(cfg.check_file).head(cfg.check_rows)
    return PromptFormatter(tok, InputConfig(max_length=cfg.check_max_length)).encode(df)


@torch.no_grad()
def logits(model, rows: list[list[int]], pad_id: int, batch_rows: int = 8) -> torch.Tensor:
    """Logits (N, 2) in fp32 on the CPU, in row order."""
    device = model_device(model)
    out = []
    for i in range(0, len(rows), batch_rows):
        batch = {k: v.to(device) for k, v in pad(rows[i : i + batch_rows], pad_id).items()}  # (B, T)
        out.append(model(**batch).logits.float().cpu())  # (B, 2)
    return torch.cat(out)


def max_logit_gap(model_a, model_b, rows: list[list[int]], pad_id: int) -> float:
    """max |logits_a - logits_b| over rows and both classes."""
    return float((logits(model_a, rows, pad_id) - logits(model_b, rows, pad_id)).abs().max())


def check_against(trained, merged, rows: list[list[int]], pad_id: int) -> dict:
    """How far the merged model is from the unmerged one, next to how far the adapter moved the base."""
    reference = logits(trained, rows, pad_id)  # (N, 2)
    with trained.disable_adapter():  # LoRA and the trained head off: the nf4 base alone
        base = logits(trained, rows, pad_id)
    return {
        "rows": len(rows),
        "compute_dtype": str(compute_dtype(model_device(merged))).removeprefix("torch."),
        "max_abs_logit_delta": float((logits(merged, rows, pad_id) - reference).abs().max()),
        "max_abs_logit_change_by_adapter": float((reference - base).abs().max()),
    }


def export_int8(cfg: MergeConfig, tok, trained=None, rows: list[list[int]] | None = None) -> dict:
    """Re-quantise the merged folder to bitsandbytes int8 (LLM.int8, head kept dense) into ``out_dir/int8``.

    With ``trained`` (the unmerged peft model) and ``rows`` the int8 model is also compared with it.
    """
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    device = pick_device(cfg.device)
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.out_dir, dtype=cfg.torch_dtype, quantization_config=quant, device_map={"": str(device)}
    )
    model.eval()
    out = cfg.out_dir / INT8_DIR
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"dir": INT8_DIR, "max_abs_logit_delta": None}
    if trained is not None and rows is not None:
        info["max_abs_logit_delta"] = max_logit_gap(trained, model, rows, tok.pad_token_id)
    return info


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(MergeConfig, argv)
    result = merge_dequantized(cfg)
    print(json.dumps(result.info, indent=2))
    print(f"merged model: {result.out_dir}")


if __name__ == "__main__":
    main()
