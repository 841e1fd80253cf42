"""``sabr``: Small Adversarial Bounding Regions (Müller, Eckert, Fischer, Vechev, ICLR 2023, "Certified
training: small boxes are all you need").

The robust loss is IBP's robust cross-entropy (as :mod:`methods.ibp`), but over a *small* box of
radius τ = λ·ε inside the ε-box, placed around an adversarial point, rather than over the ε-box
itself (their Sec. 3, the method):

1. x* = a PGD point of high cross-entropy in B = [x − ε, x + ε] ∩ [0, 1] = [l, u] (their code: a
   uniform random start, 8 steps of 0.5 times the box's half-width, the step × 0.1 after 50, 80
   and 90 % of the steps, the point of highest CE kept; :func:`methods._bound_propagation.pgd_linf`);
2. the centre x′ is x* projected so that the small box fits in B (their Sec. 3; their code clamps
   x* to [l + τ, u − τ] per pixel), with τ_i = min(τ, (u_i − l_i)/2): where [0, 1] cuts B narrower
   than 2τ the small box is all of B in that pixel (their clamp alone can then leave B);
3. the propagated box is B_τ = [max(x′ − τ, l), min(x′ + τ, u)] ⊆ B, exactly (the max/min keep
   it inside B under floating-point rounding too);
4. L_robust = CE(−lb, y), lb the IBP lower bounds of the margins z_y − z_j over B_τ
   (Zhang et al. 2020, eq. 5, as ``ibp``).

λ = 1 gives back IBP's box B (up to rounding) and λ → 0 adversarial training at x*. The ε ramp, κ
and the Shi et al. options are those of :class:`BoundPropagationMethod` (its robust-error statistic
is here the fraction of the batch whose small box IBP does not certify); the
defaults of :class:`~methods._bound_propagation.AdversarialBoundMethod` follow the authors' code
(github.com/eth-sri/SABR: IBP initialisation and Shi et al.'s warm-up regulariser with λ = 0.5 during
the ramp, robust loss alone after it, an L1 penalty in most published runs). Differences: κ
follows ε during the ramp (their κ drops to 0 when the ramp starts), the PGD step is relative to
each pixel's half-width (theirs to the largest), and their L1 penalty also counts the biases.
``subselection_ratio`` is their λ (``--lambda_ratio``); its default 0.4 is their MNIST ε = 0.1
setting (0.6 MNIST 0.3, 0.1 CIFAR-10 2/255, 0.7 CIFAR-10 8/255).
"""

from __future__ import annotations

import torch
from torch import nn

from certbench.bounds.lirpa import input_box, robust_cross_entropy
from certbench.config import ConfigError
from certbench.method import register_method
from methods._bound_propagation import AdversarialBoundMethod, attack_params


def small_box(
    x: torch.Tensor, adversarial: torch.Tensor, eps: float, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SABR's propagation region: the box of radius τ = ratio·ε (per pixel at most half of B's
    width) centred at ``adversarial`` projected into B = [x − ε, x + ε] ∩ [0, 1], intersected with B,
    so it always lies in B."""
    lower, upper = input_box(x, eps)
    radius = torch.minimum(torch.full_like(x, ratio * eps), (upper - lower) / 2)
    centre = torch.clamp(adversarial, lower + radius, upper - radius)
    return torch.maximum(centre - radius, lower), torch.minimum(centre + radius, upper)


@register_method("sabr")
class SABR(AdversarialBoundMethod):
    """SABR-trained ReLU network (mlp, cnn-small, cnn-large): IBP over a small box around a PGD point."""

    default_certificate = "cascade"
    attack_decay = (0.5, 0.8, 0.9)
    params_schema = {
        **AdversarialBoundMethod.params_schema,
        "subselection_ratio": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.4,
            "description": "λ: the propagated box's radius τ = λ·ε (their --lambda_ratio)",
        },
        **attack_params(steps=8, step_size=0.5),
    }

    def check(self) -> None:
        super().check()
        ratio = float(self.params["subselection_ratio"])
        if not 0 < ratio <= 1:
            raise ConfigError(f"params.subselection_ratio: must lie in (0, 1], got {ratio}")

    def propagation_region(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The small box B_τ of each sample: PGD in the ε-box, then :func:`small_box`."""
        adversarial = self.attack(model, x, y, eps)
        return small_box(x, adversarial, eps, float(self.params["subselection_ratio"]))

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, float]:
        box = self.propagation_region(model, x, y, eps)
        lower = self.bounder.margin_lower_bounds(model, x, y, eps, ["IBP"], box=box)["IBP"]
        self.robust_stats["tau"] = float(self.params["subselection_ratio"]) * eps
        # the fraction of the batch whose *small* box IBP does not certify (not the ε-box's)
        return robust_cross_entropy(lower), float((lower <= 0).any(1).float().mean())
