"""``crown-ibp``: CROWN-IBP training (Zhang et al., ICLR 2020) through auto_LiRPA.

As :mod:`methods.ibp` (both build on :class:`methods._bound_propagation.BoundPropagationMethod`), with
the margin lower bound mixed from two relaxations,
``lb = β·lb_CROWN-IBP + (1−β)·lb_IBP`` (Zhang et al. eq. 7), where CROWN-IBP bounds the
hidden layers by IBP and the margins by CROWN's backward pass. β = 1 − (ε/ε_train)(1 − β_final)
goes from pure CROWN-IBP at ε = 0 to β_final at ε_train; both bounds share one IBP pass.

With ``loss_fusion`` (Xu et al., NeurIPS 2020: auto_LiRPA's scalable training) the bounds are
on the cross-entropy itself, per sample, rather than on the K−1 margins, so CROWN's
backward pass carries one row instead of K−1; the robust loss is then the mean of
β·CE_CROWN-IBP + (1−β)·CE_IBP, a convex combination of upper bounds on the worst-case CE.
The fused CROWN-IBP bound differs from the margin form (its exp relaxation), the IBP one
is equal. The published CROWN-IBP figures were trained without it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certbench.method import register_method, unit_interval
from methods._bound_propagation import BoundPropagationMethod


@register_method("crown-ibp")
class CROWNIBP(BoundPropagationMethod):
    """CROWN-IBP-trained ReLU network (mlp, cnn-small, cnn-large)."""

    default_certificate = "crown-ibp"
    params_schema = {
        **BoundPropagationMethod.params_schema,
        "beta_final": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.0,
            "description": "weight of the CROWN-IBP bound once ε = eps_train (1 for CIFAR 2/255)",
        },
        "loss_fusion": {
            "type": "boolean",
            "default": False,
            "description": "bound the cross-entropy instead of the margins (faster, Xu et al. 2020)",
        },
    }

    def check(self) -> None:
        super().check()
        unit_interval("beta_final", float(self.params["beta_final"]))

    def weights(self, eps: float) -> dict[str, float]:
        return super().weights(eps) | {"beta": self.mix(eps, float(self.params["beta_final"]))}

    def mixture(self, eps: float) -> dict[str, float]:
        """{bound: weight} of the bounds mixed at ε, those of weight 0 left out."""
        beta = self.weights(eps)["beta"]
        return {
            method: weight for method, weight in {"IBP": 1.0 - beta, "CROWN-IBP": beta}.items() if weight > 0
        }

    def lower_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        mixture = self.mixture(eps)
        bounds = self.bounder.margin_lower_bounds(model, x, y, eps, list(mixture))
        return sum(weight * bounds[method] for method, weight in mixture.items())

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, float]:
        if not self.params["loss_fusion"]:
            return super().robust_loss(model, x, y, eps)
        mixture = self.mixture(eps)
        bounds = self.bounder.fused_cross_entropy_upper_bounds(model, x, y, eps, list(mixture))
        upper = sum(weight * bounds[method] for method, weight in mixture.items())
        # CE < log 2 means Σ_{j≠y} exp(z_j − z_y) < 1, so every margin is positive: certified
        return upper.mean(), float((upper >= math.log(2)).float().mean())
