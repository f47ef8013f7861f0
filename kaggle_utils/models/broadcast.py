"""Rank 0's loaded model copied into every other rank of a launch (``torch.distributed``): a base read once.

Used for a 4-bit base under FSDP2 (:func:`kaggle_utils.models.loading.load_classifier`, ``read_once``). Rank 0 loads
it from the weight files as usual; every other rank builds the same quantised structure without weights (parameters
on the meta device, ``Linear4bit`` where rank 0 has them) and fills it with rank 0's tensors. What travels, in this
order:

1. a manifest (``broadcast_object_list``): each tensor's name, shape and dtype, which parameters require a gradient,
   and rank 0's random-number state;
2. each tensor's bytes (``broadcast``), in the manifest's order: every parameter and buffer, a ``Params4bit`` as its
   packed nf4 codes, and for each ``Params4bit`` its quant_state as bitsandbytes serialises it
   (``QuantState.as_dict(packed=True)``: absmax, code, the nested absmax and code of double quantisation, and one
   tensor holding blocksize, shape, dtypes and offset).

The receiving rank rebuilds each ``Params4bit`` with ``Params4bit.from_prequantized``, the constructor transformers
uses for a saved 4-bit checkpoint: the same bytes and the same quant_state, no quantisation run again.
"""

from __future__ import annotations

import torch

# a 4-bit weight's quant_state tensors travel as "<module>.weight.<key>" (key: QuantState.as_dict(packed=True)'s),
# the names transformers saves them under
WEIGHT_STATS = "weight."


def _outgoing(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor rank 0 sends, by name: parameters (a Params4bit: its packed codes), buffers, and the quant_state
    tensors of each 4-bit weight under ``<module>.weight.<key>``."""
    import bitsandbytes as bnb

    tensors = {name: p.data for name, p in model.named_parameters()}
    tensors.update(model.named_buffers())
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            for key, value in module.weight.quant_state.as_dict(packed=True).items():
                tensors[f"{name}.{WEIGHT_STATS}{key}"] = value
    return tensors


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _broadcast_bytes(tensor: torch.Tensor) -> None:
    """``tensor`` (contiguous) from rank 0 into every rank's ``tensor`` of the same shape and dtype, as raw bytes: the
    packed codes are stored in a float dtype under FSDP (bnb_4bit_quant_storage), and no arithmetic touches them."""
    torch.distributed.broadcast(tensor.reshape(-1).view(torch.uint8), src=0)


def send_model(model: torch.nn.Module, device: torch.device) -> None:
    """Rank 0: send ``model`` (loaded, on ``device``) to the ranks calling :func:`receive_model`. A collective."""
    tensors = _outgoing(model)
    manifest = {
        "tensors": [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()],
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        # the LoRA is drawn next, on every rank: today's every-rank load leaves every rank's generator where rank 0's
        # is (a head missing from the checkpoint is drawn while loading); the skeleton's build draws nothing
        "rng": _rng_state(device),
    }
    torch.distributed.broadcast_object_list([manifest], src=0)
    for t in tensors.values():
        # the packed quant_state entry is made on the CPU; NCCL sends only tensors on this rank's GPU
        _broadcast_bytes(t.contiguous().to(device))


def receive_model(model: torch.nn.Module, device: torch.device) -> None:
    """Ranks > 0: fill ``model``, rank 0's structure on the meta device (its Linear4bit in the same places), with
    the tensors :func:`send_model` sends, on ``device``. A collective."""
    box: list = [None]
    torch.distributed.broadcast_object_list(box, src=0)
    manifest = box[0]
    received = {}
    for name, shape, dtype in manifest["tensors"]:
        received[name] = torch.empty(shape, dtype=dtype, device=device)
        _broadcast_bytes(received[name])
    _place_4bit(model, received, device)
    _place_others(model, received, set(manifest["trainable"]))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"rank 0 sent no value for {left[:5]} ({len(left)} tensors): the two models differ")
    _set_rng_state(manifest["rng"], device)


def _place_4bit(model: torch.nn.Module, received: dict[str, torch.Tensor], device: torch.device) -> None:
    """Each Linear4bit's weight rebuilt from rank 0's packed codes and quant_state (taken out of ``received``)."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        prefix = f"{name}.{WEIGHT_STATS}"
        if f"{name}.weight" not in received:
            raise RuntimeError(f"rank 0 sent no 4-bit weight for {name}: the two models differ")
        stats = {key.removeprefix(prefix): received.pop(key) for key in [k for k in received if k.startswith(prefix)]}
        # sets module.quant_state too: bitsandbytes restores the weight's quant_state from it after FSDP's all-gather
        module.weight = bnb.nn.Params4bit.from_prequantized(
            received.pop(f"{name}.weight"), stats, requires_grad=False, device=device, module=module
        )


def _place_others(model: torch.nn.Module, received: dict[str, torch.Tensor], trainable: set[str]) -> None:
    """The remaining parameters and buffers, each where the name says, trainable where rank 0's is."""
    for name, value in received.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            setattr(module, leaf, torch.nn.Parameter(value, requires_grad=name in trainable))
        elif leaf in module._buffers:
            module._buffers[leaf] = value  # keeps the buffer's persistence, unlike register_buffer
        else:
            raise RuntimeError(f"rank 0 sent {name}, which this rank's model does not have: the two models differ")
