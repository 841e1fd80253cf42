"""``crown-ibp``: CROWN-IBP training (Zhang et al., ICLR 2020) through auto_LiRPA.

As :mod:`methods.ibp`, with the margin lower bound mixed from two relaxations,
``lb = β·lb_CROWN-IBP + (1−β)·lb_IBP`` (Zhang et al. eq. 7), where CROWN-IBP bounds the
hidden layers by IBP and the margins by CROWN's backward pass. β = 1 − (ε/ε_train)(1 − β_final)
goes from pure CROWN-IBP at ε = 0 to β_final at ε_train; both bounds share one IBP pass.
"""

from __future__ import annotations

import torch
from torch import nn

from certbench.method import register_method
from methods.ibp import IBP, unit_interval


@register_method("crown-ibp")
class CROWNIBP(IBP):
    """CROWN-IBP-trained ReLU network (mlp, cnn-small, cnn-large)."""

    default_certificate = "crown-ibp"
    params_schema = {
        **IBP.params_schema,
        "beta_final": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                       "description": "weight of the CROWN-IBP bound once ε = eps_train (1 for CIFAR 2/255)"},
    }

    def check(self) -> None:
        super().check()
        unit_interval("beta_final", float(self.params["beta_final"]))

    def weights(self, eps: float) -> dict[str, float]:
        return super().weights(eps) | {"beta": self.mix(eps, float(self.params["beta_final"]))}

    def lower_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        beta = self.weights(eps)["beta"]
        mixture = {"IBP": 1.0 - beta, "CROWN-IBP": beta}
        used = [method for method, weight in mixture.items() if weight > 0]
        bounds = self.bounder.margin_lower_bounds(model, x, y, eps, used)
        return sum(mixture[method] * bounds[method] for method in used)
