"""PGD against ℓ∞-dist and SortNet nets, for the soundness tests of their certificates."""

from __future__ import annotations

import torch
from torch import nn

from certbench.certificates import margins
from certbench.nn.linf_dist import set_p

INF = float("inf")


def pgd_flips(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    steps: int = 40,
    restarts: int = 3,
    anneal: bool = False,
) -> torch.Tensor:
    """Which points a margin-loss PGD-ℓ∞ (random start, step ε/4, or ε/16 in the second half of the
    steps with ``anneal``, projected onto the ball ∩ [0, 1]) misclassifies within ``eps`` (per
    sample). Odd restarts take gradients with the distance layers at p = 8: ℓ∞-dist gradients are
    one-hot and a smooth surrogate moves every pixel; the prediction is always read at p = ∞."""
    radius = eps.view(-1, 1, 1, 1)
    found = torch.zeros(len(x), dtype=torch.bool)
    for restart in range(restarts):
        delta = (torch.rand_like(x) * 2 - 1) * radius
        for step in range(steps):
            adv = (x + delta).clamp(0, 1).requires_grad_()
            set_p(model, 8.0 if restart % 2 else INF)
            loss = -margins(model(adv), y).sum()
            (grad,) = torch.autograd.grad(loss, adv)
            size = radius / 16 if anneal and step >= steps // 2 else radius / 4
            delta = torch.max(torch.min(delta + size * grad.sign(), radius), -radius)
            set_p(model, INF)
            with torch.no_grad():
                found |= model((x + delta).clamp(0, 1)).argmax(1) != y
    return found
