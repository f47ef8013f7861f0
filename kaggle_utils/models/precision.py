"""fp32 compute for a moment on a loaded fp16 classifier: the safe path for rows whose fp16 logits overflow.

On a T4 (sm_75, no bf16) the classifiers run in fp16, whose largest value is 65,504. A long input can push an
activation past it (Gemma2 is known for it: its embeddings are multiplied by sqrt(hidden) = 59.9 in the weights'
dtype, and massive activations live in a few channels), and the row's logits come out inf/NaN.
:func:`fp32_compute` re-runs such a row in fp32 arithmetic on the very weights that are loaded: no reload and no
second copy of the big weights.

What changes inside the context, and why the forward then computes in fp32 throughout (read against
bitsandbytes 0.50.2, transformers 5.24 Qwen2/Gemma2 and peft 0.21.2):

* **bitsandbytes ``Linear4bit``**: ``compute_dtype`` is set to fp32. Its ``forward`` casts the input to
  ``compute_dtype``, and with no autograd ``matmul_4bit`` calls ``gemm_4bit``, which dequantises the 4-bit codes
  straight to the input's dtype (fp32 codes x fp32 absmax, no fp16 rounding) and returns ``.to(input dtype)``.
  So the layer computes exactly what a load with ``bnb_4bit_compute_dtype=fp32`` of the same codes computes.
  The packed weights are not touched.
* **Input embeddings**: a forward hook replaces the output by the same lookup cast to fp32 (exact: every fp16
  value is an fp32 value). Gemma2's scaled embedding multiplies by its scale *inside* the module in the weights'
  dtype (the product can already be inf, and sqrt(3584) is rounded to 59.875), so for a module with
  ``embed_scale`` the hook redoes the lookup and multiplies in fp32 by the scale an fp32 load would use. The
  embedding matrix (1.5 GiB for Qwen2.5-14B) is never upcast.
* **Unquantised ``torch.nn.Linear`` layers** (a model loaded without 4-bit; the classification head): their
  fp16 weight and bias are upcast *one call at a time* — a forward pre-hook puts an fp32 copy in ``.data`` and a
  forward hook (``always_call``, so also when the call raises) puts the original tensor back. The extra memory
  is one fp32 copy of the largest such weight (Qwen2.5-14B's ``gate_proj``: 5120 x 13824 -> 283 MB), not a
  second model. F.linear refuses mixed dtypes, so upcasting is needed, not dtype promotion.
* **Every other half-precision parameter and buffer** (RMSNorm weights, q/k/v biases of 4-bit layers, LoRA A/B,
  Gemma2's ``embed_scale``): small, so upcast for the whole context. Dtype promotion would cover the norms
  (Qwen2RMSNorm returns ``weight * x``; Gemma2RMSNorm computes in ``.float()``), but not LoRA: peft casts the
  layer input to ``lora_A.weight.dtype`` before the adapter, so an fp16 adapter would put the row back in fp16.

Attention masks are built in ``inputs_embeds.dtype`` and rotary cos/sin are cast to the hidden states' dtype,
so both follow the fp32 hidden states; the eager softmax is already fp32.

Exact restore: the original tensors are kept (referenced, never written) and put back into ``.data`` /
``_buffers`` on exit, also when the body raises; ``compute_dtype`` and ``compute_type_is_set`` of each 4-bit
layer are put back and the hooks removed. Parameters are the same objects with the same storage afterwards.

Not handled (an error names the parameter): other quantised weights (bitsandbytes int8, GPTQ), weights
offloaded to the CPU or disk by accelerate. One model, one thread: the context changes the model in place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)


@dataclass
class Fp32Compute:
    """What :func:`fp32_compute` switched to fp32 on the model, and the memory that costs."""

    # bitsandbytes Linear4bit layers whose compute dtype was switched from fp16/bf16 to fp32
    quantized_layers: int = 0
    # unquantised half-precision nn.Linear layers upcast one call at a time
    streamed_linears: int = 0
    # small half-precision parameters and buffers held in fp32 for the whole context
    upcast_tensors: int = 0
    # bytes of those fp32 copies (the originals stay allocated, to be put back)
    upcast_bytes: int = 0
    # bytes of the largest streamed fp32 weight: the transient extra during one layer's call
    largest_streamed_bytes: int = 0
    # the input embeddings' output is cast (or recomputed) in fp32
    embeddings_hooked: bool = False

    @property
    def changed(self) -> bool:
        """False when the model already computed in fp32: a rescore would repeat the same arithmetic."""
        return bool(self.quantized_layers or self.streamed_linears or self.upcast_tensors or self.embeddings_hooked)


def _linear4bit_class():
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # a machine without bitsandbytes has no 4-bit layers to switch
        return None
    return Linear4bit


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """Modules inside peft adapter layers (``lora_A``, ``lora_B``, ...): upcast whole, never streamed.

    peft tuner layers list their adapter sub-modules in ``adapter_layer_names``.
    """
    ids: set[int] = set()
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()):
            sub = getattr(module, attr, None)
            if isinstance(sub, nn.Module):
                ids.update(id(m) for m in sub.modules())
    return ids


def _embedding_scale(module: nn.Module) -> torch.Tensor | None:
    """Gemma-style scaled embeddings: the fp32 scale an fp32 load would hold; None for a plain lookup."""
    if type(module) is nn.Embedding:
        return None
    if isinstance(module, nn.Embedding) and hasattr(module, "embed_scale"):
        # the python float the buffer was made from; the fp16 buffer is rounded (59.866 -> 59.875 for 3584)
        scale = getattr(module, "scalar_embed_scale", None)
        if scale is None:
            return module.embed_scale.detach().float()
        return torch.tensor(scale, dtype=torch.float32, device=module.weight.device)
    raise TypeError(
        f"fp32_compute: input embeddings of type {type(module).__name__} are neither nn.Embedding nor a scaled "
        "embedding with embed_scale; add the rule for this class in kaggle_utils/models/precision.py"
    )


def _embeddings_in_fp32(scale: torch.Tensor | None):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if scale is None:
            return output.float()  # exact: every fp16 value is an fp32 value
        ids = args[0] if args else kwargs["input"]
        # redo the scaled lookup: the module multiplied in fp16, which may have overflowed already
        return nn.Embedding.forward(module, ids).float() * scale

    return hook


def _swap(originals: dict[nn.Parameter, torch.Tensor], upcast: bool):
    """Forward (pre-)hook putting fp32 copies of ``originals`` into ``.data``, or the originals back."""

    def hook(module: nn.Module, *_) -> None:
        for param, data in originals.items():
            param.data = data.float() if upcast else data

    return hook


@contextmanager
def fp32_compute(model: nn.Module) -> Iterator[Fp32Compute]:
    """Run ``model`` (fp16/bf16, 4-bit nf4 or not, with or without a peft adapter) in fp32 compute inside the block.

    Yields a :class:`Fp32Compute` saying what was switched. Autocast is off inside the block, also under a
    caller's autocast. Everything is put back exactly on exit, also when the block raises. See the module
    docstring for the mechanism and why it computes in fp32 throughout.
    """
    embeddings = model.get_input_embeddings()
    hook_embeddings = embeddings.weight.dtype in HALF
    scale = _embedding_scale(embeddings) if hook_embeddings else None
    # classify first, change nothing yet: an unsupported parameter fails before the model is touched
    plan = _plan_fp32(model, embeddings)
    saved_4bit = [(m, m.compute_dtype, m.compute_type_is_set) for m in plan.quantized]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    device_type = embeddings.weight.device.type
    try:
        _switch_to_fp32(plan, handles)
        if hook_embeddings:
            handles.append(embeddings.register_forward_hook(_embeddings_in_fp32(scale), with_kwargs=True))
        # an autocast around the caller (training's validation) would put every matmul back in half precision
        with torch.autocast(device_type, enabled=False):
            yield plan.report(embeddings_hooked=hook_embeddings)
    finally:
        _put_back(plan, saved_4bit, handles)


@dataclass
class _Fp32Plan:
    """What :func:`fp32_compute` switches, each tensor with its original (kept to be put back)."""

    # bitsandbytes Linear4bit layers whose compute dtype is not fp32 yet
    quantized: list[nn.Module] = field(default_factory=list)
    # unquantised half-precision nn.Linear layers -> {parameter: original data}, upcast one call at a time
    streamed: dict[nn.Module, dict[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    # small half-precision parameters -> original data, upcast for the whole context
    whole: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    # half-precision buffers (module, name, original), upcast for the whole context
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = field(default_factory=list)

    def report(self, embeddings_hooked: bool) -> Fp32Compute:
        """The counts and the fp32 copies' bytes of this plan."""
        whole, buffers, streamed = self.whole, self.buffers, self.streamed
        return Fp32Compute(
            quantized_layers=len(self.quantized),
            streamed_linears=len(streamed),
            upcast_tensors=len(whole) + len(buffers),
            upcast_bytes=4 * (sum(d.numel() for d in whole.values()) + sum(b.numel() for *_, b in buffers)),
            largest_streamed_bytes=4 * max((d.numel() for o in streamed.values() for d in o.values()), default=0),
            embeddings_hooked=embeddings_hooked,
        )


def _plan_fp32(model: nn.Module, embeddings: nn.Module) -> _Fp32Plan:
    """Sort every half-precision tensor of ``model`` into how it is switched; refuse one that cannot be."""
    linear4bit = _linear4bit_class()
    adapter_ids = _adapter_module_ids(model)
    plan = _Fp32Plan()
    seen: set[int] = set()
    for name, module in model.named_modules():
        is_4bit = linear4bit is not None and isinstance(module, linear4bit)
        if is_4bit and module.compute_dtype != torch.float32:
            plan.quantized.append(module)
        stream = type(module) is nn.Linear and id(module) not in adapter_ids and module.weight.dtype in HALF
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied / shared parameters: once
                continue
            seen.add(id(param))
            if not _upcast_param(f"{name}.{pname}", module, pname, param, is_4bit, embeddings):
                continue
            if stream:
                plan.streamed.setdefault(module, {})[param] = param.data
            else:
                plan.whole[param] = param.data
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.dtype in HALF:
                plan.buffers.append((module, bname, buf))
    return plan


def _upcast_param(
    qualname: str, module: nn.Module, pname: str, param: nn.Parameter, is_4bit: bool, embeddings: nn.Module
) -> bool:
    """Whether ``param`` is upcast; raises TypeError for a parameter fp32 compute cannot handle."""
    if not param.is_floating_point():
        if is_4bit and pname == "weight":
            return False  # packed 4-bit codes: dequantised to fp32 by the compute dtype switch
        raise TypeError(
            f"fp32_compute: {qualname} is {param.dtype} in a {type(module).__name__}; only "
            "bitsandbytes 4-bit and unquantised weights can be switched to fp32 compute"
        )
    if param.device.type == "meta":
        raise TypeError(f"fp32_compute: {qualname} is offloaded (meta device); load it onto the device")
    # the embedding matrix is never upcast: its output is (the forward hook)
    return param.dtype in HALF and not (module is embeddings and pname == "weight")


def _switch_to_fp32(plan: _Fp32Plan, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Apply ``plan``; each hook's handle goes to ``handles`` as it is added, so a failure half-way is undone too."""
    for module in plan.quantized:
        module.compute_dtype = torch.float32
        module.compute_type_is_set = True  # else its first call picks the input dtype and keeps it
    for param, data in plan.whole.items():
        param.data = data.float()
    for module, bname, buf in plan.buffers:
        module._buffers[bname] = buf.float()
    for module, originals in plan.streamed.items():
        handles.append(module.register_forward_pre_hook(_swap(originals, upcast=True)))
        handles.append(module.register_forward_hook(_swap(originals, upcast=False), always_call=True))


def _put_back(
    plan: _Fp32Plan,
    saved_4bit: list[tuple[nn.Module, torch.dtype, bool]],
    handles: list[torch.utils.hooks.RemovableHandle],
) -> None:
    """Undo :func:`_switch_to_fp32` exactly: hooks removed, the original tensors and 4-bit settings back."""
    for handle in handles:
        handle.remove()
    for originals in plan.streamed.values():
        for param, data in originals.items():
            param.data = data
    for param, data in plan.whole.items():
        param.data = data
    for module, bname, buf in plan.buffers:
        module._buffers[bname] = buf
    for module, dtype, is_set in saved_4bit:
        module.compute_dtype = dtype
        module.compute_type_is_set = is_set


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the weights of ``src`` (same architecture): its 4-bit codes and states, its other parameters.

    Two loads of one folder with different compute dtypes quantise separately, and fp16 and fp32 inputs round a
    few 4-bit codes differently. After this copy an nf4 load with fp32 compute differs from an nf4 load with fp16
    compute in the arithmetic alone: the reference that :func:`fp32_compute` is measured against. Each parameter
    keeps ``dst``'s dtype (the fp16 values are exact in fp32).
    """
    linear4bit = _linear4bit_class()
    src_modules = dict(src.named_modules())
    src_params = dict(src.named_parameters())
    with torch.no_grad():
        for name, module in dst.named_modules():
            if linear4bit is not None and isinstance(module, linear4bit):
                module.weight.data = src_modules[name].weight.data.clone()
                module.weight.quant_state = copy.deepcopy(src_modules[name].weight.quant_state)
        for name, param in dst.named_parameters():
            if param.is_floating_point():
                param.data = src_params[name].data.to(param.dtype, copy=True)
