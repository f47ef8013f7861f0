"""Average LoRA adapters of fold students into one adapter (the WSDM 1st place averaged its students' weights).

The 1st place fine-tuned in full and averaged the weights. For a LoRA the weights a student adds to the shared base
are ``ΔW_i = s · B_i @ A_i`` (``s = lora_alpha / r``), and the weight average of the students is the base plus
``Σ w_i ΔW_i``. Averaging ``A`` and ``B`` separately is not that: ``(Σ w_i B_i)(Σ w_i A_i)`` adds the cross terms
``w_i w_j B_i A_j``, which are small only while the students' ``A`` stay near their shared initialisation.

* ``method = "concat"`` (the default) is the exact average, still a LoRA: ``A = [A_1; …; A_k]`` (k·r × in) and
  ``B = [w_1 B_1, …, w_k B_k]`` (out × k·r), so ``B @ A = Σ w_i B_i A_i``; rank and alpha both grow k-fold, which
  keeps ``s``. The adapter is k times larger, and so is its (small) share of the forward pass.
* ``method = "naive"`` averages ``A`` and ``B`` separately at rank r (what averaging peft state dicts does).

Both write, per LoRA layer, the relative distance ``‖(Σ w_i B_i)(Σ w_i A_i) − Σ w_i B_i A_i‖ / ‖Σ w_i B_i A_i‖`` (what
the naive average misses) and the distance of the adapter written to the exact average, into ``average_info.json``.
The head (peft's ``modules_to_save``: ``score``) is averaged with the same weights; it is a plain linear layer.

Adapters of a different base model, rank, alpha, target layers or input settings (``train_config.json``) are refused
before anything is written. The output is what the train stage writes in ``out_dir/adapter``: adapter_config.json,
adapter_model.safetensors, the tokenizer, peft's README.md and train_config.json (the first adapter's, with the new
rank and alpha and ``val_fold = -1``: the average has seen every fold). No calibration.json: each fold's fitted
temperature belongs to its own student; inference then applies none (identity) until one is fitted for the average.

``python -m kaggle_utils.models.average --adapters A B C --out-dir D [--weights 0.5 0.25 0.25] [--method naive]``
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kaggle_utils.config.cli import config_to_dict, field_docs
from kaggle_utils.models.loading import check_adapter_dir

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TRAIN_CONFIG = "train_config.json"
INFO_FILE = "average_info.json"
METHODS = ("concat", "naive")
# adapter_config.json keys that every adapter must share (rank and alpha are checked on their own)
SHARED_ADAPTER_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "modules_to_save", "bias", "lora_bias")
# train_config.json keys that every adapter must share: the base model and the settings that make its token ids
SHARED_TRAIN_KEYS = (
    "model_path",
    "max_length",
    "template",
    "truncation",
    "prompt_fraction",
    "head_fraction",
    "split_special_tokens",
)
# files of an adapter folder copied from the first adapter: the tokenizer (whatever save_pretrained wrote) and peft's
# model card
COPIED_GLOBS = ("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "chat_template.jinja", "README.md")


class AdapterMismatchError(ValueError):
    """Adapters that cannot be averaged; the message names the adapters, the setting and both values."""


@dataclass
class AverageConfig:
    """Average LoRA adapters trained from the same base into one adapter folder."""

    # adapter folders written by the train stage (out_dir/adapter), e.g. one per fold
    adapters: list[Path]
    # folder that receives the averaged adapter (the same files as a trained adapter/) and average_info.json
    out_dir: Path
    # one weight per adapter (normalised to sum 1); empty: equal weights
    weights: list[float] = field(default_factory=list)
    # "concat": the exact average of the weight updates B @ A, at k times the rank; "naive": A and B averaged apart
    method: str = "concat"

    def __post_init__(self) -> None:
        self.adapters = [Path(a) for a in self.adapters]
        self.out_dir = Path(self.out_dir)
        if not self.adapters:
            raise ValueError("no adapters given: pass --adapters A [B ...]")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        if self.weights and len(self.weights) != len(self.adapters):
            raise ValueError(f"{len(self.weights)} weights for {len(self.adapters)} adapters: give one per adapter")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"weights {self.weights} must all be > 0")
        if self.out_dir.resolve() in {a.resolve() for a in self.adapters}:
            raise ValueError(f"out_dir {self.out_dir} is one of the adapters: write the average elsewhere")

    @property
    def normalised_weights(self) -> list[float]:
        raw = self.weights or [1.0] * len(self.adapters)
        return [w / sum(raw) for w in raw]


@dataclass
class Adapter:
    """One adapter folder, read: its peft config, its tensors and its training config (empty if absent)."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    train_config: dict


def read_adapter(path: Path) -> Adapter:
    from safetensors.torch import load_file

    check_adapter_dir(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    train_file = path / TRAIN_CONFIG
    train_config = json.loads(train_file.read_text()) if train_file.is_file() else {}
    return Adapter(path, config, load_file(path / WEIGHTS_FILE), train_config)


def check_compatible(adapters: list[Adapter]) -> None:
    """Same base, rank, alpha, targets, head and input settings, and tensors of the same names and shapes."""
    first = adapters[0]
    if first.config.get("peft_type") != "LORA":
        raise AdapterMismatchError(f"{first.path}: peft_type {first.config.get('peft_type')!r}; only LoRA is averaged")
    extras = {k: first.config.get(k) for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")}
    if any(extras.values()):
        raise AdapterMismatchError(f"{first.path}: {extras}; only plain LoRA (what the train stage writes) is averaged")

    def differ(other: Adapter, what: str, mine, theirs) -> AdapterMismatchError:
        return AdapterMismatchError(
            f"cannot average {first.path} and {other.path}: {what} is {mine!r} in the first and {theirs!r} in the "
            "second; average only adapters trained from the same base with the same LoRA and input settings"
        )

    for other in adapters[1:]:
        for key in ("r", "lora_alpha", *SHARED_ADAPTER_KEYS):
            a, b = first.config.get(key), other.config.get(key)
            if key == "modules_to_save":
                a, b = sorted(a or []), sorted(b or [])
            if a != b:
                raise differ(other, f"adapter_config.json {key}", a, b)
        a, b = sorted(first.config.get("target_modules") or []), sorted(other.config.get("target_modules") or [])
        if a != b:
            raise differ(other, "adapter_config.json target_modules", a, b)
        for key in SHARED_TRAIN_KEYS:
            if key in first.train_config and key in other.train_config:
                if first.train_config[key] != other.train_config[key]:
                    raise differ(other, f"train_config.json {key}", first.train_config[key], other.train_config[key])
        if set(first.tensors) != set(other.tensors):
            only = sorted(set(first.tensors) ^ set(other.tensors))[:3]
            raise differ(other, "the set of saved tensors (e.g. these differ)", only, "")
        for name, t in first.tensors.items():
            if t.shape != other.tensors[name].shape:
                raise differ(other, f"the shape of {name}", tuple(t.shape), tuple(other.tensors[name].shape))


def _lora_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Key prefixes of the LoRA layers: ``P`` for every ``P.lora_A.weight`` (sorted)."""
    return sorted(k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))


def average_tensors(adapters: list[Adapter], weights: list[float], method: str) -> tuple[dict, dict]:
    """The averaged tensors, and per LoRA layer the relative distances that ``average_info.json`` reports."""
    first = adapters[0].tensors
    layers = _lora_layers(first)
    out: dict[str, torch.Tensor] = {}
    distances: dict[str, dict[str, float]] = {}
    for prefix in layers:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        A = [ad.tensors[a_key].double() for ad in adapters]  # each (r, in)
        B = [ad.tensors[b_key].double() for ad in adapters]  # each (out, r)
        exact = sum(w * b @ a for w, a, b in zip(weights, A, B, strict=True))  # (out, in): Σ w_i B_i A_i
        a_mean = sum(w * a for w, a in zip(weights, A, strict=True))  # (r, in)
        b_mean = sum(w * b for w, b in zip(weights, B, strict=True))  # (out, r)
        if method == "concat":
            a_new = torch.cat(A, dim=0)  # (k·r, in)
            b_new = torch.cat([w * b for w, b in zip(weights, B, strict=True)], dim=1)  # (out, k·r)
        else:
            a_new, b_new = a_mean, b_mean
        norm = exact.norm().item()
        scale = norm if norm > 0 else 1.0  # an all-zero update (B = 0, untrained): report absolute distances
        distances[prefix] = {
            "naive_vs_exact": (b_mean @ a_mean - exact).norm().item() / scale,
            "written_vs_exact": (b_new @ a_new - exact).norm().item() / scale,
        }
        dtype = first[a_key].dtype
        out[a_key], out[b_key] = a_new.to(dtype).contiguous(), b_new.to(dtype).contiguous()
    lora_keys = set(out)
    for name, t in first.items():  # the head (modules_to_save) and anything else saved: a plain weighted mean
        if name not in lora_keys:
            out[name] = sum(w * ad.tensors[name].double() for w, ad in zip(weights, adapters, strict=True)).to(t.dtype)
    return out, distances


def average(cfg: AverageConfig) -> dict:
    """Write the averaged adapter to ``cfg.out_dir``; returns what ``average_info.json`` holds."""
    from safetensors.torch import save_file

    adapters = [read_adapter(p) for p in cfg.adapters]
    check_compatible(adapters)  # before anything is written
    weights = cfg.normalised_weights
    tensors, distances = average_tensors(adapters, weights, cfg.method)
    k = len(adapters) if cfg.method == "concat" else 1

    first = adapters[0]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(first.config)
    config["r"], config["lora_alpha"] = first.config["r"] * k, first.config["lora_alpha"] * k  # same alpha / r
    (cfg.out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, cfg.out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    for pattern in COPIED_GLOBS:
        for path in first.path.glob(pattern):
            shutil.copyfile(path, cfg.out_dir / path.name)
    if first.train_config:
        train_config = first.train_config | {"lora_r": config["r"], "lora_alpha": config["lora_alpha"], "val_fold": -1}
        (cfg.out_dir / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2) + "\n")

    naive = [d["naive_vs_exact"] for d in distances.values()]
    written = [d["written_vs_exact"] for d in distances.values()]
    info = {
        "config": config_to_dict(cfg),
        "weights": weights,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "layers": len(distances),
        # relative Frobenius distance to the exact average of the updates B @ A, over the LoRA layers
        "naive_vs_exact": {"mean": sum(naive) / len(naive), "max": max(naive)} if naive else None,
        "written_vs_exact": {"mean": sum(written) / len(written), "max": max(written)} if written else None,
        "per_layer": distances,
    }
    (cfg.out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def parse_args(argv: list[str] | None = None) -> AverageConfig:
    """``--adapters A B C`` as a plain list (the other stages take JSON lists: this one is typed by hand)."""
    docs = field_docs(AverageConfig)
    parser = argparse.ArgumentParser(description=AverageConfig.__doc__)
    parser.add_argument("--adapters", nargs="+", type=Path, required=True, help=docs["adapters"])
    parser.add_argument("--out-dir", type=Path, required=True, help=docs["out_dir"])
    parser.add_argument("--weights", nargs="*", type=float, default=[], help=docs["weights"])
    parser.add_argument("--method", choices=METHODS, default="concat", help=docs["method"])
    return AverageConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    info = average(cfg)
    print(
        f"averaged {len(cfg.adapters)} adapters ({cfg.method}, weights {[round(w, 4) for w in info['weights']]}) "
        f"into {cfg.out_dir}: r={info['r']}, alpha={info['lora_alpha']}, {info['layers']} LoRA layers; relative "
        f"distance to the exact average of B@A: naive {info['naive_vs_exact']}, written {info['written_vs_exact']}"
    )


if __name__ == "__main__":
    main()
