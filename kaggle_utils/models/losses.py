"""Losses for learning from human labels and from a teacher's probabilities (distillation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "kl", "mixed")


def preference_loss(
    logits: torch.Tensor,
    hard: torch.Tensor,
    soft: torch.Tensor,
    kind: str = "ce",
    kl_weight: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Loss of ``logits`` (B, 2) against hard labels ``hard`` (B,) and soft targets ``soft`` (B, 2).

    - ``ce``: cross-entropy on the hard labels;
    - ``kl``: KL(soft || softmax(logits / T)) * T^2 (the T^2 keeps gradients comparable across T);
    - ``mixed``: ``(1 - kl_weight) * ce + kl_weight * kl`` (the seed's equal mix is ``kl_weight=0.5``).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    logits = logits.float()
    ce = F.cross_entropy(logits, hard)
    if kind == "ce":
        return ce
    log_p = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(log_p, soft.float(), reduction="batchmean") * temperature**2
    if kind == "kl":
        return kl
    return (1 - kl_weight) * ce + kl_weight * kl
