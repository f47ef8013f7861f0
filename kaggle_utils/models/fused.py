"""Speed options for a loaded classifier on a GPU: fused Triton kernels (liger-kernel) and compiled decoder layers.

``apply_fused_kernels`` swaps three memory-bound pieces of every decoder layer for liger-kernel's Triton kernels:
the RMSNorms (one pass instead of square / mean / rsqrt / scale, each a full read and write of the activations),
the gated MLP's activation (``act(gate) * up`` in one kernel, its backward without the saved intermediate) and RoPE
(q and k rotated in place). The linear layers are untouched: the MLP's new forward calls the module's own
``gate_proj`` / ``up_proj`` / ``down_proj``, so a LoRA on them (peft wraps those three modules, not the MLP) is
applied and trained as before, and the 4-bit base multiplies as before. Attention is not touched either, so
Gemma2's attention-logit soft-capping (in its eager attention) is kept; its final-logit soft-capping belongs to
the causal-LM head, which a sequence classifier does not have.

Why not liger's own ``apply_liger_kernel_to_qwen2(model=...)``: its default ``fused_linear_cross_entropy=True``
replaces ``model.forward`` with the causal-LM forward (wrong for a classifier), it reaches the decoder through
``model.base_model_prefix`` (a peft-wrapped model answers with the wrong object) and it swaps the classes in
``transformers``' modules for the whole process, so every model built afterwards, on the CPU too, gets Triton
modules. Here each norm and MLP instance of this model gets its own forward; only RoPE, a module-level function
that the attention calls by name, is replaced in its modeling module, by a dispatcher that takes liger's kernel for
CUDA tensors and the original function for any other (the CPU's results are unchanged).

Supported: Qwen2 (Qwen2.5), Llama and Gemma2 (``(1 + w)`` RMSNorm, computed in fp32 as transformers does; GeGLU
with the tanh GELU Gemma2 uses). Not installed by ``make``: the ``fused`` extra, ``pip install -e '.[train,fused]'``
(liger-kernel; it needs triton, which a CUDA torch brings). On a device other than CUDA both options print one line
and change nothing: the kernels are Triton GPU kernels, and the model's own torch code, which they reproduce, runs
instead, so a recipe that asks for them still runs in the CPU demo and tests.

``compile_decoder_layers``: ``torch.compile`` on each decoder layer (dynamic shapes: micro-batches vary in rows and
length), compiled at their first calls; the 4-bit matmuls and LoRA are traced as they are.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch

INSTALL = (
    "pip install -e '.[train,fused]', or pip install liger-kernel (0.8.5 was measured; it needs triton, which a CUDA "
    "build of torch brings)"
)


class FusedKernelsError(RuntimeError):
    """The fused kernels cannot be applied here; the message names why and what to change."""


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its norm, MLP and RoPE, and how its RMSNorm computes."""

    modeling: str  # the transformers module holding the classes and apply_rotary_pos_emb
    norm: str  # RMSNorm class name
    mlp: str  # gated MLP class name
    activation_key: str  # the config attribute naming the MLP's activation
    activations: tuple[str, ...]  # the activations the fused gate computes exactly
    gate: str  # liger's fused gate: "liger_swiglu" (silu(a) * b) or "liger_geglu" (tanh-GELU(a) * b)
    offset: float  # RMSNorm scale is (offset + w): 0 for Llama / Qwen2, 1 for Gemma2
    casting: str  # liger's casting mode, as transformers computes: "llama" (scale in the input dtype), "gemma" (fp32)
    in_place: bool  # backward writes dX over dY: liger's setting per family (off for Gemma2's extra norms)


FAMILIES = {
    "qwen2": Family(
        "transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP", "hidden_act", ("silu", "swish"),
        "liger_swiglu", 0.0, "llama", True,
    ),
    "llama": Family(
        "transformers.models.llama.modeling_llama", "LlamaRMSNorm", "LlamaMLP", "hidden_act", ("silu", "swish"),
        "liger_swiglu", 0.0, "llama", True,
    ),
    "gemma2": Family(
        "transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm", "Gemma2MLP", "hidden_activation",
        ("gelu_pytorch_tanh",), "liger_geglu", 1.0, "gemma", False,
    ),
}  # fmt: skip


def family_of(model) -> Family:
    """The model's :class:`Family`; an architecture or activation the kernels do not reproduce is refused."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise FusedKernelsError(
            f"fused_kernels: no fused kernels for model_type {config.model_type!r} (supported: {sorted(FAMILIES)}); "
            "set fused_kernels = false for this model"
        )
    activation = getattr(config, family.activation_key, None)
    if activation not in family.activations:
        raise FusedKernelsError(
            f"fused_kernels: {config.model_type} with {family.activation_key}={activation!r}; the fused gate "
            f"computes {family.activations} only: set fused_kernels = false for this model"
        )
    return family


def liger_ops() -> SimpleNamespace:
    """liger-kernel's four functional ops, or a :class:`FusedKernelsError` naming the install."""
    try:
        from liger_kernel.transformers import functional
    except ImportError as err:  # liger-kernel or triton missing
        why = f"fused_kernels needs liger-kernel, which is not importable here ({err}): {INSTALL}"
        raise FusedKernelsError(why) from err
    names = ("liger_rms_norm", "liger_swiglu", "liger_geglu", "liger_rope")
    return SimpleNamespace(**{n: getattr(functional, n) for n in names})


def apply_fused_kernels(model, device: torch.device) -> dict[str, int]:
    """liger-kernel's RMSNorm, gated activation and RoPE on ``model`` (a transformers classifier, peft-wrapped or
    not) on a CUDA ``device``; returns how many modules of each kind were patched (none off CUDA: a printed no-op).
    """
    family = family_of(model)  # refused on every device: a recipe that cannot run on the GPU fails on the CPU too
    if device.type != "cuda":
        print(f"fused_kernels: {device} is not a CUDA device; the model's own torch code runs (Triton kernels)")
        return {}
    counts = patch_model(model, family, liger_ops())
    print(f"fused_kernels: liger-kernel on {counts}")
    return counts


def patch_model(model, family: Family, ops, device_type: str = "cuda") -> dict[str, int]:
    """Bind ``ops`` (liger's functional ops, or stand-ins with their signatures) into ``model``'s norms and MLPs, and
    route its family's RoPE through ``ops.liger_rope`` for tensors on ``device_type``."""
    modeling = importlib.import_module(family.modeling)
    norm_cls, mlp_cls = getattr(modeling, family.norm), getattr(modeling, family.mlp)
    gate = getattr(ops, family.gate)
    counts = {"rms_norm": 0, "mlp": 0}
    for module in model.modules():
        if isinstance(module, norm_cls):
            module.forward = _fused_norm(module, family, ops.liger_rms_norm)
            counts["rms_norm"] += 1
        elif isinstance(module, mlp_cls):
            module.forward = _fused_mlp(module, gate)
            counts["mlp"] += 1
    _route_rope(modeling, ops.liger_rope, device_type)
    counts["rope"] = len(decoder_layers(model))  # the function every layer's attention calls
    return counts


def _fused_norm(module, family: Family, rms_norm):
    eps = getattr(module, "variance_epsilon", None) or module.eps  # Qwen2 / Llama name it variance_epsilon

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:  # (..., hidden)
        return rms_norm(hidden_states, module.weight, eps, family.offset, family.casting, family.in_place)

    return forward


def _fused_mlp(module, gate):
    def forward(x: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., intermediate) -> (..., hidden)
        # the projections are the module's own (LoRA-wrapped where peft put a LoRA): only act(gate) * up is fused
        return module.down_proj(gate(module.gate_proj(x), module.up_proj(x)))

    return forward


def _route_rope(modeling, liger_rope, device_type: str) -> None:
    """Replace ``modeling.apply_rotary_pos_emb`` by a dispatcher: liger's kernel on ``device_type``, else the
    original. Process-wide (the attention calls it by name), hence the dispatch: a model on another device in the
    same process computes as before. Applied once per module; later calls keep the first dispatcher."""
    if getattr(modeling.apply_rotary_pos_emb, "torch_rope", None) is not None:
        return
    original = modeling.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # q (b, heads, t, d), k (b, kv heads, t, d)
        if q.device.type == device_type:
            return liger_rope(q, k, cos, sin, None, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.torch_rope = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def restore_torch_rope() -> None:
    """Put back every family's own ``apply_rotary_pos_emb`` (undoes :func:`_route_rope` for the whole process: a
    benchmark that measures a variant without the kernels after one with them)."""
    for family in FAMILIES.values():
        modeling = importlib.import_module(family.modeling)
        original = getattr(modeling.apply_rotary_pos_emb, "torch_rope", None)
        if original is not None:
            modeling.apply_rotary_pos_emb = original


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers classifier, peft-wrapped or not (``model.model.layers``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix).layers


def compile_decoder_layers(model, device: torch.device) -> int:
    """``torch.compile`` each decoder layer in place, with dynamic shapes (micro-batches vary in rows and length);
    returns how many (0 off CUDA: a printed no-op). They compile at their first forward: the first steps are slow."""
    if device.type != "cuda":
        print(f"compile_layers: {device} is not a CUDA device; the layers run uncompiled")
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    print(f"compile_layers: {len(layers)} decoder layers compile at their first forward (dynamic shapes)")
    return len(layers)
