"""The LoRA update added inside one GEMM: ``base(x) + s * (x A^T) B^T`` as ``addmm(base(x), x A^T, B^T, alpha=s)``.

peft's LoRA linear layers (``lora.Linear`` over a full-precision base, ``lora.bnb.Linear4bit`` over nf4) compute the
update as ``lora_B(lora_A(x)) * scaling`` and add it to the base's output: a copy of the base output (``clone``, on
4-bit), a multiplication and an addition, each a full read and write of a (tokens x out features) tensor, and the
multiplication again in backward. ``addmm`` puts the scale and the addition in the GEMM's epilogue (``alpha``,
``beta = 1``); its backward passes the gradient to the base output untouched and scales only the rank-16 products.
Profiled on Qwen2.5-14B nf4 at 10K packed tokens on an H200 (``benchmarks/RESULTS.md``, 2026-12-03 night): peft's
passes took 93 ms of a 1,186 ms step's GPU time; the epilogue GEMMs and accumulation give back 76 ms, a net 2.4 %.

The arithmetic is the same up to rounding: the update is accumulated in fp32 and rounded once, where peft rounds the
product, the scaled product and the sum. LoRA dropout is applied to the adapter's input as peft applies it (the same
random draws in the same order); its own pass over the input stays, so ``lora_dropout = 0`` is still faster. Where
this path does not apply, the layer runs peft's own forward: adapters disabled or merged, several active adapters,
a LoRA variant (DoRA), extra call arguments, or mixed dtypes without autocast. Pure torch, so it runs (and is
tested) on the CPU as on a GPU.
"""

from __future__ import annotations

import torch


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA linear layers of ``model`` (full-precision and 4-bit bases)."""
    from peft.tuners.lora import Linear as LoraLinear

    kinds: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds += (Linear4bit,)
    except ImportError:  # peft without bitsandbytes: no 4-bit layers to find
        pass
    return [m for m in model.modules() if isinstance(m, kinds)]


def apply_fused_lora(model: torch.nn.Module) -> int:
    """Give each LoRA linear layer of ``model`` the one-GEMM forward (its instance only); returns how many."""
    layers = lora_layers(model)
    for layer in layers:
        layer.forward = _fused_forward(layer, layer.forward)
    return len(layers)


def _adapter(layer) -> str | None:
    """The one plain LoRA adapter this layer runs now, or None where peft's forward must run."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    return None if active[0] in layer.lora_variant else active[0]


def _fused_forward(layer, peft_forward):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # (..., in) -> (..., out)
        name = None if args or kwargs else _adapter(layer)
        if name is None:
            return peft_forward(x, *args, **kwargs)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
        if not torch.is_autocast_enabled(x.device.type) and not x.dtype == a.dtype == b.dtype:
            return peft_forward(x)  # peft casts between the input's and the adapter's dtypes
        result = layer.base_layer(x)
        h = torch.nn.functional.linear(layer.lora_dropout[name](x), a)  # (..., r); dropout drawn as peft draws it
        out = torch.addmm(
            result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=layer.scaling[name]
        )
        return out.view(result.shape)

    return forward
