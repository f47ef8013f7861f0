"""Adversarial weight perturbation (AWP) for a training step: the gradient taken at the worst nearby weights."""

from __future__ import annotations

from collections.abc import Callable

import torch


class AWP:
    """Adversarial weight perturbation, the form Kaggle NLP solutions use (after Wu et al., 2020).

    For a micro-batch: the clean loss's gradient g gives each chosen weight tensor w a step
    ``lr * ||w|| * g / ||g||``, clipped elementwise to ``w ± eps * |w|``; the loss at the perturbed weights is
    backpropagated into ``.grad``; then every weight is restored bit for bit. The optimiser so steps with the
    gradient taken at the worst nearby weights, which favours flat minima.

    Unlike the widely copied Kaggle class (``attack_backward`` calling ``optimizer.zero_grad()``), the clean gradient
    is taken with ``torch.autograd.grad`` and never touches ``.grad``, so the attack cannot wipe the micro-batches
    accumulated before it; the restore runs in a ``finally`` (an exception, an out-of-memory error, cannot leave the
    model perturbed) and copies the originals back in place, bit for bit, so the optimiser's references stay valid.
    A non-finite clean gradient (an fp16 overflow) gives its tensor no step; an overflow in the adversarial gradient
    is the GradScaler's to catch, as in any step.
    """

    def __init__(self, model: torch.nn.Module, lr: float, eps: float, steps: int = 1, name_filter: str = "weight"):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad and name_filter in n}
        if not self.params:
            raise ValueError(f"AWP: no trainable parameter name contains {name_filter!r}; check awp_params")
        self.lr, self.eps, self.steps = lr, eps, steps

    @torch.no_grad()
    def _attack(self, grads: tuple[torch.Tensor | None, ...], originals: list[torch.Tensor]) -> None:
        for p, g, w in zip(self.params.values(), grads, originals, strict=True):
            if g is None:  # a weight the loss does not reach
                continue
            g_norm = torch.linalg.vector_norm(g.float())
            # no .item(): a host sync per tensor would stall the GPU; a zero or non-finite norm gives no step
            ok = torch.isfinite(g_norm) & (g_norm > 0)
            step = torch.where(ok, self.lr * torch.linalg.vector_norm(w.float()) / g_norm.clamp_min(1e-12), 0.0)
            p.add_(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) * step.to(p.dtype))
            bound = self.eps * w.abs()
            torch.clamp(p, w - bound, w + bound, out=p)

    def backward(self, loss_fn: Callable[[], torch.Tensor], scale: Callable[[torch.Tensor], torch.Tensor]):
        """Perturb, backpropagate ``scale(loss_fn())`` at the perturbed weights into ``.grad``, restore.

        ``loss_fn`` runs the forward pass and returns the loss; ``scale`` weights it for accumulation and loss scaling
        (the clean gradient's scale cancels in g / ||g||). Returns (clean loss, adversarial loss) as floats.
        """
        params = list(self.params.values())
        originals = [p.detach().clone() for p in params]
        clean = None
        try:
            for _ in range(self.steps):
                loss = loss_fn()
                clean = loss.detach() if clean is None else clean
                self._attack(torch.autograd.grad(scale(loss), params, allow_unused=True), originals)
            adversarial = loss_fn()
            scale(adversarial).backward()
        finally:
            with torch.no_grad():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)
        return float(clean), float(adversarial.detach())
