"""Padding-free training: a micro-batch's rows laid end to end in one sequence, attention kept inside each row.

A padded micro-batch of rows x longest row computes the padding too: at the competition's length profile a 16K
budget of 2,500-token batches is a fifth padding, and recomputing it under gradient checkpointing costs twice. A
*packed* micro-batch is one sequence of exactly its rows' tokens (the LMSYS 2nd and WSDM 2nd teams trained so, at
16K tokens a GPU). Three things make it the same computation as one row at a time:

* **Attention stays inside each row.** The model is loaded with attention ``packed_<inner>`` (``packed_sdpa``, or
  ``packed_eager`` for Gemma2): given the rows' boundaries (``cu_seq_lens_q``, the name transformers' varlen
  kernels use, passed through the model's keyword arguments, so gradient checkpointing replays them) it runs the
  inner attention once per row, causal, on that row's slice of q/k/v: the cost is the sum of the rows' squared
  lengths, not the square of the pack. Without boundaries (validation, inference: padded batches) it *is* the
  inner attention, with the mask the inner kernel gets.
* **Positions restart at every row** (``position_ids``), so rotary embeddings are those of the row alone.
* **One pooled token per row.** A sequence classifier pools one token per sequence; a hook on its head (``score``)
  keeps the head's output at every position, and each row's logits are taken at its last token.

No mask is built for a packed call (the mask function returns none without an ``attention_mask``): a 16K pack
would otherwise cost a 16K x 16K mask. On CUDA with bf16/fp16, ``sdpa`` per row runs the flash kernel.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch

PREFIX = "packed_"


def packed_name(inner: str) -> str:
    """The attention implementation to load a model with for packed training over ``inner`` (registered here)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if inner.startswith(PREFIX):
        return inner
    if inner not in ("sdpa", "eager"):
        raise ValueError(f"packing runs over 'sdpa' or 'eager' attention, not {inner!r}")
    name = PREFIX + inner
    inner_mask = ALL_MASK_ATTENTION_FUNCTIONS[inner]

    def mask(*args, attention_mask=None, **kwargs):
        # a packed call has no attention_mask: the rows' boundaries travel with the attention call instead
        return None if attention_mask is None else inner_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(name, _attention(inner))
    AttentionMaskInterface.register(name, mask)
    return name


def _inner_attention(inner: str, module: torch.nn.Module) -> Callable:
    if inner == "eager":  # each architecture has its own eager function (Gemma2's soft-caps the scores)
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _row_mask(length: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (1, 1, L, L) of one row for eager attention (a sliding window if the layer has one)."""
    i = torch.arange(length, device=device)
    allowed = i[None, :] <= i[:, None]  # key j <= query i
    if window is not None:
        allowed &= i[:, None] - i[None, :] < window
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)[
        None, None
    ]


def _attention(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, cu_seq_lens_q=None, **kwargs):
        attend = _inner_attention(inner, module)
        if cu_seq_lens_q is None:  # a padded batch: the inner attention as it is
            return attend(module, query, key, value, attention_mask, *args, **kwargs)
        for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(k, None)
        bounds = cu_seq_lens_q.tolist()  # a CPU tensor: no device sync per layer
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):  # query/key/value: (1, heads, T, head_dim)
            q, k, v = (t[:, :, start:end] for t in (query, key, value))
            mask = None
            if inner == "eager":
                mask = _row_mask(end - start, kwargs.get("sliding_window"), query.dtype, query.device)
            outs.append(attend(module, q, k, v, mask, *args, **kwargs)[0])  # (1, L, heads, head_dim)
        return torch.cat(outs, dim=1), None

    return attention


def pack(rows: list[list[int]] | list[np.ndarray]) -> tuple[dict, np.ndarray]:
    """The model inputs of ``rows`` packed into one sequence, and each row's last position.

    Returns ``{"input_ids": (1, T), "position_ids": (1, T), "cu_seq_lens_q": (n + 1,) int32 on the CPU, ...}``
    (T = the rows' tokens in all) and ``ends`` (n,): the index of each row's last token.
    """
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    if len(lengths) == 0 or lengths.min() < 1:
        raise ValueError("cannot pack an empty batch or an empty row")
    cu = np.concatenate([[0], np.cumsum(lengths)])
    ids = torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))[None]
    positions = torch.from_numpy(np.arange(cu[-1]) - np.repeat(cu[:-1], lengths))[None]
    bounds = torch.from_numpy(cu.astype(np.int32))
    longest = int(lengths.max())
    inputs = {
        "input_ids": ids,
        "position_ids": positions,
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    return inputs, cu[1:] - 1


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head (``score``) of a sequence classifier, under peft's and DDP's wrappers."""
    inner = model.module if hasattr(model, "module") else model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no `score` head: packing needs a decoder sequence classifier")
    return head


def packed_logits(model: torch.nn.Module, head: torch.nn.Module, inputs: dict, ends: np.ndarray) -> torch.Tensor:
    """Logits (n, num_labels) of each packed row: the head's output at the row's last token.

    ``model`` is what is called (DDP or peft around the classifier); ``head`` its ``score`` module
    (:func:`classifier_head`), whose output at every position a hook keeps for the call.
    """
    kept: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    device = kept[-1].device
    return kept[-1][0, torch.from_numpy(ends).to(device)]  # (1, T, C) -> (n, C)
