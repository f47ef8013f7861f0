"""Losses for learning from human labels and from a teacher's logits (distillation), per row and weighted.

Distillation follows Hinton et al. and the competition's winners: the teacher's *logits* and the student's are
both divided by the temperature T, ``KL(softmax(t / T) || softmax(s / T)) * T^2``. Softening both sides keeps the
minimum where the student's distribution equals the teacher's at every T (the student stays calibrated); the
T^2 keeps the gradient's size comparable across T. Softening only the student (what this module did before)
moves the minimum: fitted to a teacher at p = 0.70 the student ended at 0.845 with T=2 and 0.553 with T=0.25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "kl", "mixed")


def term_weights(kind: str, kl_weight: float) -> tuple[float, float]:
    """``(ce_weight, kd_weight)`` of a loss kind: ``ce`` (1, 0), ``kl`` (0, 1), ``mixed`` (1 - w, w)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    return {"ce": (1.0, 0.0), "kl": (0.0, 1.0), "mixed": (1.0 - kl_weight, kl_weight)}[kind]


def distill_terms(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(kd, cos)``, each (B,): ``KL(softmax(t/T) || softmax(s/T)) * T^2`` and ``1 - cos(p_s, p_t)``.

    ``logits`` and ``teacher_logits`` are (B, C) and finite. The cosine term compares the two softened
    distributions; it is 0 where they agree and bounded by 1, so it cannot blow up on confident rows.
    """
    log_s = F.log_softmax(logits / temperature, dim=-1)  # (B, C)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    kd = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature**2  # (B,)
    cos = 1.0 - F.cosine_similarity(log_s.exp(), log_t.exp(), dim=-1)  # (B,)
    return kd, cos


def preference_loss(
    logits: torch.Tensor,
    hard: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "ce",
    kl_weight: float = 0.5,
    temperature: float = 1.0,
    cos_weight: float = 0.0,
    row_weight: torch.Tensor | None = None,
    totals: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """Weighted loss of student ``logits`` (B, 2): ``ce_w * CE + kd_w * KD + cos_weight * (1 - cos)``.

    - ``hard`` (B,) int: the human label (0 = A, 1 = B), or -1 where the row has none (a pseudo-labelled row);
    - ``teacher_logits`` (B, 2): the teacher's raw logits, NaN where the row has no teacher;
    - ``(ce_w, kd_w)`` from ``kind`` and ``kl_weight`` (:func:`term_weights`). CE counts only on rows with a human
      label and KD / cosine only on rows with a teacher; a labelled row without a teacher takes CE in place of KD
      (the KL to its one-hot label at T=1), so ``kl`` on human labels alone is plain cross-entropy;
    - each term is the ``row_weight``-weighted mean over the rows it counts on (:func:`term_totals`): with
      ``loss = "ce"`` a teacher-only row neither adds to nor dilutes the CE. ``totals`` (the weight behind each
      term across a whole optimiser step) makes the result this batch's share of the step's loss, so the
      micro-batches of a step add up to it; None: the batch's own totals.
    """
    ce_w, kd_w = term_weights(kind, kl_weight)
    logits = logits.float()
    labelled = hard >= 0  # (B,)
    taught = torch.isfinite(teacher_logits).all(-1)  # (B,)
    if not (labelled | taught).all():
        raise ValueError("every row needs a human label (hard >= 0) or finite teacher logits")
    ce = F.cross_entropy(logits, hard.clamp(min=0), reduction="none")  # (B,)
    # NaN teacher rows replaced before any arithmetic: a NaN would reach the gradient even when masked afterwards
    teacher = torch.where(taught[:, None], teacher_logits.float(), torch.zeros_like(logits))
    kd, cos = distill_terms(logits, teacher, temperature)
    w = torch.ones_like(ce) if row_weight is None else row_weight.to(ce)
    zero = torch.zeros_like(ce)
    sums = (
        (w * torch.where(labelled, ce, zero)).sum(),
        (w * torch.where(taught, kd, ce)).sum(),
        (w * torch.where(taught, cos, zero)).sum(),
    )
    if totals is None:
        totals = term_totals(labelled, taught, w)
    loss = logits.sum() * 0.0  # in the graph even when no term counts (every process must run a backward)
    for coef, part, total in zip((ce_w, kd_w, cos_weight), sums, totals, strict=True):
        if coef and float(total) > 0:  # a term no row counts on adds nothing (not 0 / 0)
            loss = loss + coef * part / total
    return loss


def term_totals(labelled, taught, weight) -> tuple[float, float, float]:
    """The row weight each loss term averages over, ``(ce, kd, cos)``: labelled rows, every row (KD, or CE in its
    place), rows with a teacher. Takes numpy arrays or tensors of shape (N,)."""
    return float((weight * labelled).sum()), float(weight.sum()), float((weight * taught).sum())
