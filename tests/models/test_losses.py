"""kaggle_utils.models.losses: cross-entropy on human labels, distillation from teacher logits, their mix."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kaggle_utils.data import schema
from kaggle_utils.models.losses import LOSSES, distill_terms, preference_loss, term_totals, term_weights

NAN = float("nan")


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (6, 2), human labels (6,) and teacher logits (6, 2), every row labelled and taught."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 2, generator=g) * 2
    hard = torch.tensor([0, 1, 1, 0, 1, 0])
    teacher = torch.randn(6, 2, generator=g) * 2
    return logits, hard, teacher


def _kl(q: list[float], p: list[float]) -> float:
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))


def test_ce_equals_torch_cross_entropy() -> None:
    logits, hard, teacher = _batch()
    torch.testing.assert_close(preference_loss(logits, hard, teacher, "ce"), F.cross_entropy(logits, hard))


def test_ce_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    hard = torch.tensor([0, 0])
    # p(label) = 0.5 and 0.75
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    got = preference_loss(logits, hard, torch.full((2, 2), NAN), "ce").item()
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0, 5.0])
def test_kd_is_zero_when_student_logits_match_the_teacher_up_to_a_constant(temperature: float) -> None:
    logits, hard, _ = _batch()
    teacher = logits + torch.tensor([[3.0], [-1.0], [0.5], [0.0], [2.0], [-7.0]])  # softmax ignores a per-row shift
    got = preference_loss(logits, hard, teacher, "kl", temperature=temperature).item()
    assert got == pytest.approx(0.0, abs=1e-6)


def test_kd_hand_computed_at_several_temperatures() -> None:
    student = torch.tensor([[0.0, 0.0]])  # 0.5 / 0.5 at every T
    teacher = torch.tensor([[math.log(4.0), 0.0]])  # 0.8 / 0.2 at T=1
    hard = torch.tensor([-1])  # no human label: the KD term alone
    got = preference_loss(student, hard, teacher, "kl").item()
    assert got == pytest.approx(_kl([0.8, 0.2], [0.5, 0.5]), rel=1e-5)
    # T=2 softens the teacher too: softmax([log 4, 0] / 2) = (2/3, 1/3), and the KL is multiplied by T^2 = 4
    got_t = preference_loss(student, hard, teacher, "kl", temperature=2.0).item()
    assert got_t == pytest.approx(4 * _kl([2 / 3, 1 / 3], [0.5, 0.5]), rel=1e-5)
    # T=0.5 sharpens it: softmax([2 log 4, 0]) = (16/17, 1/17), times 1/4
    got_s = preference_loss(student, hard, teacher, "kl", temperature=0.5).item()
    assert got_s == pytest.approx(0.25 * _kl([16 / 17, 1 / 17], [0.5, 0.5]), rel=1e-5)


def test_cosine_term_hand_computed() -> None:
    student = torch.tensor([[0.0, 0.0]])  # (0.5, 0.5)
    teacher = torch.tensor([[math.log(4.0), 0.0]])  # (0.8, 0.2)
    cos = (0.5 * 0.8 + 0.5 * 0.2) / (math.sqrt(0.5) * math.sqrt(0.8**2 + 0.2**2))
    kd, cos_term = distill_terms(student, teacher)
    assert cos_term.item() == pytest.approx(1 - cos, rel=1e-5)
    got = preference_loss(student, torch.tensor([-1]), teacher, "kl", cos_weight=0.3).item()
    assert got == pytest.approx(kd.item() + 0.3 * (1 - cos), rel=1e-5)


def test_labelled_row_without_teacher_takes_ce_in_the_kd_term() -> None:
    """The one-hot fallback: KL to a one-hot label at T=1 is the cross-entropy, so ``kl`` on labels alone is CE."""
    logits, hard, _ = _batch(1)
    no_teacher = torch.full((6, 2), NAN)
    torch.testing.assert_close(preference_loss(logits, hard, no_teacher, "kl"), F.cross_entropy(logits, hard))
    torch.testing.assert_close(preference_loss(logits, hard, no_teacher, "mixed"), F.cross_entropy(logits, hard))


def test_ce_counts_only_rows_with_a_human_label() -> None:
    """A pseudo-labelled row (hard = -1) adds no CE and does not dilute it: with ``ce`` the loss is the labelled
    row's CE (a teacher-only row in the denominator would silently lower the learning rate)."""
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    hard = torch.tensor([0, -1])
    teacher = torch.tensor([[NAN, NAN], [0.0, 0.0]])
    ce0 = math.log(2.0)
    kd1 = _kl([0.5, 0.5], [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
    assert preference_loss(logits, hard, teacher, "ce").item() == pytest.approx(ce0, rel=1e-5)
    # row 0 has no teacher: its KD term is its CE; every row counts in the KD term
    assert preference_loss(logits, hard, teacher, "kl").item() == pytest.approx((ce0 + kd1) / 2, rel=1e-5)
    got = preference_loss(logits, hard, teacher, "mixed", kl_weight=0.25).item()
    assert got == pytest.approx(0.75 * ce0 + 0.25 * (ce0 + kd1) / 2, rel=1e-5)


def test_micro_batch_shares_add_up_to_the_step_loss() -> None:
    """With the step's term totals, the micro-batches' losses (and so their gradients) sum to the whole batch's."""
    logits, hard, teacher = _batch(3)
    hard[1], teacher[2:4] = -1, NAN  # one row teacher-only, two label-only
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    labelled, taught = hard >= 0, torch.isfinite(teacher).all(-1)
    totals = term_totals(labelled, taught, w)
    kwargs = {"kind": "mixed", "kl_weight": 0.4, "cos_weight": 0.2}
    whole = preference_loss(logits, hard, teacher, row_weight=w, **kwargs)
    parts = [
        preference_loss(logits[s], hard[s], teacher[s], row_weight=w[s], totals=totals, **kwargs)
        for s in (slice(0, 2), slice(2, 5), slice(5, 6))
    ]
    torch.testing.assert_close(sum(parts), whole)


def test_row_weights_make_a_weighted_mean() -> None:
    logits, hard, teacher = _batch(5)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 3.0])
    per_row = torch.stack(
        [preference_loss(logits[i : i + 1], hard[i : i + 1], teacher[i : i + 1], "mixed") for i in range(6)]
    )
    expected = (w * per_row).sum() / w.sum()
    torch.testing.assert_close(preference_loss(logits, hard, teacher, "mixed", row_weight=w), expected)


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_mixed_is_weighted_mean(w: float) -> None:
    logits, hard, teacher = _batch(2)
    ce = preference_loss(logits, hard, teacher, "ce")
    kl = preference_loss(logits, hard, teacher, "kl")
    assert not torch.isclose(ce, kl)
    mixed = preference_loss(logits, hard, teacher, "mixed", kl_weight=w)
    torch.testing.assert_close(mixed, (1 - w) * ce + w * kl)


def test_loss_is_float32_for_half_logits() -> None:
    logits, hard, teacher = _batch(3)
    out = preference_loss(logits.to(torch.bfloat16), hard, teacher, "mixed")
    assert out.dtype == torch.float32


def test_gradients_flow_and_stay_finite_next_to_rows_without_a_teacher() -> None:
    logits, hard, teacher = _batch(4)
    teacher[1:3] = NAN
    logits.requires_grad_(True)
    preference_loss(logits, hard, teacher, "mixed", cos_weight=0.5).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all()


def test_a_row_with_neither_label_nor_teacher_is_an_error() -> None:
    with pytest.raises(ValueError, match="human label"):
        preference_loss(torch.zeros(1, 2), torch.tensor([-1]), torch.full((1, 2), NAN), "kl")


def test_unknown_kind_raises() -> None:
    logits, hard, teacher = _batch()
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        preference_loss(logits, hard, teacher, "mse")
    assert LOSSES == ("ce", "kl", "mixed")
    assert term_weights("mixed", 0.3) == (0.7, 0.3)


# --- calibration: what the student converges to ------------------------------------------------------------
def _fit_student(teacher: torch.Tensor, hard: torch.Tensor, kind: str, temperature: float, old: bool = False) -> float:
    """Fit a tiny logistic model (margin = x @ w + b on 2 noise features) by gradient descent; its mean p(A).

    ``old``: the loss this module had before issue 10 (teacher probabilities fixed, only the student divided by T).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(teacher), 2, generator=g)
    w = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)  # Adam: the step size does not depend on T's scale of the gradient
    for _ in range(500):
        margin = x @ w + b  # (N,)
        logits = torch.stack([margin, torch.zeros_like(margin)], dim=1)  # (N, 2)
        if old:
            q = torch.softmax(teacher, -1)
            loss = F.kl_div(F.log_softmax(logits / temperature, -1), q, reduction="batchmean") * temperature**2
        else:
            loss = preference_loss(logits, hard, teacher, kind, temperature=temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(torch.sigmoid(x @ w + b).mean())


N_ROWS = 200


def _teacher_at(p: float, as_probabilities: bool) -> torch.Tensor:
    """Teacher logits of N_ROWS rows at p(A) = p: raw logits, or log(p) of a probability-only file."""
    if as_probabilities:
        df = pd.DataFrame({"p_a": [p] * N_ROWS, "p_b": [1 - p] * N_ROWS})
        return torch.from_numpy(schema.teacher_logits(df))
    raw = np.array([[0.3 + math.log(p / (1 - p)), 0.3]], dtype=np.float32)  # logits with an offset, as a model gives
    return torch.from_numpy(np.repeat(raw, N_ROWS, 0))


@pytest.mark.parametrize("as_probabilities", [False, True], ids=["logits", "probabilities"])
@pytest.mark.parametrize("temperature", [0.25, 1.0, 2.0, 5.0])
def test_student_fitted_to_a_teacher_keeps_its_calibration(temperature: float, as_probabilities: bool) -> None:
    teacher = _teacher_at(0.7, as_probabilities)
    hard = torch.full((N_ROWS,), -1)
    assert _fit_student(teacher, hard, "kl", temperature) == pytest.approx(0.7, abs=0.005)


@pytest.mark.parametrize("temperature", [0.25, 2.0])
def test_mixed_with_labels_at_the_teachers_rate_keeps_calibration(temperature: float) -> None:
    teacher = _teacher_at(0.7, as_probabilities=False)
    hard = torch.from_numpy((np.arange(N_ROWS) % 10 >= 7).astype(np.int64))  # 70% won by A
    assert _fit_student(teacher, hard, "mixed", temperature) == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("temperature,ends_at", [(2.0, 0.845), (0.25, 0.553)])
def test_the_old_student_only_temperature_lost_calibration(temperature: float, ends_at: float) -> None:
    """The measurement of issue 10: softening only the student moves its optimum to sigmoid(T * logit(0.7))."""
    teacher = _teacher_at(0.7, as_probabilities=False)
    got = _fit_student(teacher, torch.full((N_ROWS,), -1), "kl", temperature, old=True)
    assert got == pytest.approx(ends_at, abs=0.01)
