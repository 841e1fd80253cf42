"""``mtl-ibp``: MTL-IBP (De Palma, Bunel, Dvijotham, Kumar, Stanforth, Lomuscio, ICLR 2024, "Expressive
losses for verified robustness via convex combinations").

The robust loss is a convex combination of the adversarial and the IBP loss (their Sec. 3, where
MTL-IBP is defined beside CC-IBP and Exp-IBP):

    L_α = (1 − α)·CE(f(x_adv), y) + α·CE(−lb, y),

where x_adv is a PGD point in [x − f·ε, x + f·ε] ∩ [0, 1] (f = ``attack_eps_factor``, 1 but for their
CIFAR-10 2/255 runs, 2.1), lb the IBP lower bounds of the margins z_y − z_j over the ε-box and
CE(−lb, y) IBP's robust cross-entropy (Zhang et al. 2020, eq. 5, as ``ibp``). α = 1 is IBP's loss,
α = 0 adversarial training. The adversarial logits are computed in training mode after the attack
(which runs in eval mode), as in the authors' code (github.com/alessandrodepalma/expressive-losses,
``train.py``, ``attack.py``): a uniform random start and ``attack_steps`` signed-gradient steps of
``attack_step_size`` times the box's half-width per pixel, the point of highest CE kept (after a
single step their code keeps the stepped point; here the better of it and the start). The attack of
most of their published runs, one step of size 10 (to a vertex of the box from a random start), is
the default here; their CIFAR-10 2/255 runs use 8 steps of 0.25.

The ε ramp, κ, the Shi et al. options and the robust-error statistic (the fraction IBP does not
certify) are those of :class:`BoundPropagationMethod`, with the defaults of
:class:`~methods._bound_propagation.AdversarialBoundMethod` (the authors' ``--method=fast``: IBP
initialisation and warm-up regularisers during the ramp; CE alone before it). Differences: their loss
has no natural term once ε > 0; here κ follows ε during the ramp (κ_final = 0: none after it). On a
BatchNorm model (Shi et al. 2021) the adversarial logits, like the IBP bounds and the attack,
normalise with the clean batch's statistics (theirs: the adversarial batch's, in training mode), so
the running statistics are updated once per step, by the natural forward pass. Their
L1 penalty (``--l1_coeff``, weights of Linear and Conv2d layers only) is ``l1``. ``alpha`` is their
``--mtlibp_coeff``; its default 0.5 is their CIFAR-10 8/255 setting (0.01 MNIST 0.1 with
ε_train = 0.2, 0.08 MNIST 0.3 with ε_train = 0.4, 0.004 CIFAR-10 2/255): the small values of the other
settings suit the branch-and-bound verifiers they certify with, not IBP certificates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certbench.method import register_method, unit_interval
from methods._bound_propagation import AdversarialBoundMethod, as_bounded, attack_params


@register_method("mtl-ibp")
class MTLIBP(AdversarialBoundMethod):
    """MTL-IBP-trained ReLU network (mlp, cnn-small, cnn-large): adversarial and IBP loss combined."""

    default_certificate = "cascade"
    params_schema = {
        **AdversarialBoundMethod.params_schema,
        "alpha": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "α: weight of the IBP loss against the adversarial loss (their --mtlibp_coeff)",
        },
        "attack_eps_factor": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 1.0,
            "description": "the attack's box is f·ε wide (their --attack_eps_factor)",
        },
        **attack_params(steps=1, step_size=10.0),
    }

    def check(self) -> None:
        super().check()
        unit_interval("alpha", float(self.params["alpha"]))

    def attack_radius(self, eps: float) -> float:
        return min(1.0, float(self.params["attack_eps_factor"]) * eps)

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, float]:
        alpha = float(self.params["alpha"])
        adversarial = self.attack(model, x, y, eps)
        # IBP first: building a BoundedModule rewrites the parameters, so the forward pass comes after
        verified, robust_error = super().robust_loss(model, x, y, eps)
        # a BatchNorm model in training: the clean batch's statistics, as the bounds (differentiable,
        # as BatchNorm training's), so CE at x_adv and the IBP loss are a lower and an upper bound of
        # one worst case, and the running statistics move only with the natural forward pass
        with as_bounded(model, x, differentiable=True):
            adversarial_logits = model(adversarial)
        adversarial_loss = F.cross_entropy(adversarial_logits, y)
        self.robust_stats |= {
            "ibp_loss": verified.item(),
            "adversarial_loss": adversarial_loss.item(),
            "adversarial_error": float((adversarial_logits.argmax(1) != y).float().mean()),
        }
        return (1 - alpha) * adversarial_loss + alpha * verified, robust_error
