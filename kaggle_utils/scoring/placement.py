"""Where a model runs: one copy per GPU when it fits a card, else its layers split across the GPUs.

Two T4s hold one Qwen2.5-14B nf4 copy each (7.9 GiB of weights, measured), so both score at once. A model that
does not fit one card (a merged fp16 14B: 26 GiB) can still run with its layers split over both (accelerate's
``device_map`` with a per-GPU ``max_memory``), one batch at a time. The choice is made before loading, from the
weights' size read off the safetensors headers (no tensor is read) and each card's memory limit, and the reason is
stated in the log and the report.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kaggle_utils.scoring.memory import CudaGauge

GiB = 2**30
# bytes per element of the dtypes a checkpoint is saved in
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}
# nf4: half a byte per weight, plus a fp32 absmax per 64 weights quantised again to 8 bits per block of 256
# (double quantisation): 0.5 + 1/64 + 4/(64*256) bytes per weight
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# tensors bitsandbytes leaves dense: embeddings, norms, biases, the classification head (kept in full precision)
DENSE_NAMES = ("embed", "norm", "score", "lm_head", "wte", "wpe")


def _tensors(model_path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the folder's safetensors files, read from their headers."""
    tensors = {}
    for path in sorted(Path(model_path).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        tensors |= {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
    return tensors


def weights_bytes(model_path: Path, load_in_4bit: bool, dtype_bytes: int = 2) -> int:
    """Bytes the model's weights take once loaded: nf4 for the 2-D linear weights when ``load_in_4bit`` (dense
    tensors in ``dtype_bytes``), else every tensor in ``dtype_bytes`` (fp16: 2)."""
    total = 0.0
    for name, (_, shape) in _tensors(model_path).items():
        n = 1
        for d in shape:
            n *= d
        linear = len(shape) == 2 and name.endswith(".weight") and not any(k in name for k in DENSE_NAMES)
        total += n * (NF4_BYTES_PER_WEIGHT if load_in_4bit and linear else dtype_bytes)
    return int(total)


def device_limits(devices: list[str]) -> dict[str, int | None]:
    """Bytes each device may use (a CUDA device's memory times the per-process fraction, or what it has free);
    None for the CPU."""
    return {d: CudaGauge(d).limit() if torch.device(d).type == "cuda" else None for d in devices}


@dataclass
class Placement:
    """How a pass runs: ``workers`` are the device strings of its copies (``"cuda:0+cuda:1"``: one split copy)."""

    kind: str  # "per-device", "split" or "none"
    workers: list[str]
    reason: str


def choose_placement(
    weights: int, devices: list[str], limits: dict[str, int | None], activation_reserve: int
) -> Placement:
    """One copy per device when ``weights + activation_reserve`` fits every device's limit; else one copy split
    across all of them when the weights fit their sum less a reserve on each; else none, with the reason.
    ``limits``: bytes per device, None where unknown (the CPU): such devices always take a copy."""
    known = {d: v for d, v in limits.items() if v is not None}
    need = weights + activation_reserve
    if not known or all(need <= v for v in known.values()):
        where = f"fit each {min(known.values()) / GiB:.1f} GiB device" if known else "no GPU memory limit"
        reason = f"{weights / GiB:.1f} GiB of weights + {activation_reserve / GiB:.1f} GiB for activations {where}"
        return Placement("per-device", list(devices), f"{reason}: one copy per device ({len(devices)})")
    gpus = list(known)
    room = sum(known.values()) - activation_reserve * len(gpus)
    if len(gpus) > 1 and weights <= room:
        reason = (
            f"{weights / GiB:.1f} GiB of weights + {activation_reserve / GiB:.1f} GiB for activations do not fit one "
            f"{min(known.values()) / GiB:.1f} GiB device but fit {len(gpus)} together: one copy, layers split "
            f"across {', '.join(gpus)}, one batch at a time"
        )
        return Placement("split", ["+".join(gpus)], reason)
    cards = ", ".join(f"{d} ({v / GiB:.1f} GiB)" for d, v in known.items())
    reason = (
        f"{weights / GiB:.1f} GiB of weights do not fit {cards} with {activation_reserve / GiB:.1f} GiB each for "
        "activations: load it 4-bit (load_in_4bit = true), or use more or larger GPUs"
    )
    return Placement("none", [], reason)
