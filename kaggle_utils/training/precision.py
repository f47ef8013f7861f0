"""How a training step computes: bf16 or fp16 autocast (with loss scaling) or fp32, and fp32 trainable weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kaggle_utils.models.loading import compute_dtype


@dataclass(frozen=True)
class Precision:
    """How a step computes: the autocast dtype (None: as the weights are) and whether the loss is scaled."""

    autocast: torch.dtype | None
    scale_loss: bool

    @classmethod
    def choose(cls, device: torch.device, requested: str = "auto", *, weights_in_dtype: bool = True) -> Precision:
        """bf16 on sm_80+ (no scaling: bf16 has fp32's range), fp16 with loss scaling below, fp32 on the CPU.

        fp16 gradients underflow to 0 below 6e-8 and overflow above 65,504: the scaler multiplies the loss so
        small gradients survive, and skips the steps whose gradients overflowed, lowering the scale.
        ``weights_in_dtype``: the weights were loaded in the compute dtype (the train stage), so off the GPU they
        compute as they are; False (fp32 weights, the multiple-choice baseline): a requested half precision is an
        autocast on any device.
        """
        dtype = compute_dtype(device, requested)  # the same rule the weights were loaded by
        if dtype == torch.float32 or (device.type != "cuda" and weights_in_dtype):
            return cls(None, False)
        return cls(dtype, dtype == torch.float16)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a step computes in (fp32 where there is no autocast and the weights are fp32)."""
        return self.autocast or torch.float32

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The loss scaler of a run: on for fp16, a pass-through otherwise."""
        return torch.amp.GradScaler(device.type, enabled=self.scale_loss)


def trainable_in_fp32(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters (LoRA and the head), cast to fp32 where loaded in half precision.

    An fp16 head updated by Adam loses updates smaller than its rounding and overflows in the moments; fp32
    master weights under autocast are the standard mixed-precision recipe (the frozen base stays half).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return params
