"""kaggle_utils.models.losses: cross-entropy on human labels, KL to a teacher, and their mix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kaggle_utils.models.losses import LOSSES, preference_loss


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 2, generator=g) * 2
    hard = torch.tensor([0, 1, 1, 0, 1, 0])
    p_a = torch.rand(6, generator=g)
    soft = torch.stack([p_a, 1 - p_a], dim=1)
    return logits, hard, soft


def test_ce_equals_torch_cross_entropy() -> None:
    logits, hard, soft = _batch()
    torch.testing.assert_close(preference_loss(logits, hard, soft, "ce"), F.cross_entropy(logits, hard))


def test_ce_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    hard = torch.tensor([0, 0])
    # p(label) = 0.5 and 0.75
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert preference_loss(logits, hard, torch.zeros(2, 2), "ce").item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_when_student_matches_teacher() -> None:
    logits, hard, _ = _batch()
    soft = torch.softmax(logits, dim=-1)
    assert preference_loss(logits, hard, soft, "kl").item() == pytest.approx(0.0, abs=1e-6)
    # ... and with a temperature, when softmax(logits / T) matches
    soft_t = torch.softmax(logits / 2.0, dim=-1)
    assert preference_loss(logits, hard, soft_t, "kl", temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0]])  # student 0.5 / 0.5
    soft = torch.tensor([[0.8, 0.2]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = preference_loss(logits, torch.tensor([0]), soft, "kl").item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 0
    # temperature scales by T^2 (student softmax(0 / T) is still uniform)
    got_t = preference_loss(logits, torch.tensor([0]), soft, "kl", temperature=3.0).item()
    assert got_t == pytest.approx(9 * expected, rel=1e-5)


def test_kl_to_one_hot_equals_ce() -> None:
    logits, hard, _ = _batch(1)
    one_hot = F.one_hot(hard, 2).float()
    torch.testing.assert_close(preference_loss(logits, hard, one_hot, "kl"), F.cross_entropy(logits, hard))


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_mixed_is_weighted_mean(w: float) -> None:
    logits, hard, soft = _batch(2)
    ce = preference_loss(logits, hard, soft, "ce")
    kl = preference_loss(logits, hard, soft, "kl")
    assert not torch.isclose(ce, kl)
    mixed = preference_loss(logits, hard, soft, "mixed", kl_weight=w)
    torch.testing.assert_close(mixed, (1 - w) * ce + w * kl)


def test_loss_is_float32_for_half_logits() -> None:
    logits, hard, soft = _batch(3)
    out = preference_loss(logits.to(torch.bfloat16), hard, soft, "mixed")
    assert out.dtype == torch.float32


def test_gradients_flow() -> None:
    logits, hard, soft = _batch(4)
    logits.requires_grad_(True)
    preference_loss(logits, hard, soft, "mixed").backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_unknown_kind_raises() -> None:
    logits, hard, soft = _batch()
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        preference_loss(logits, hard, soft, "mse")
    assert LOSSES == ("ce", "kl", "mixed")
