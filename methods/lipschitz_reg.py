"""``lipschitz-reg``: cross-entropy plus λ·L, L the layer-wise ℓ2 Lipschitz bound (the LMT paper's baseline).

L is :class:`certbench.bounds.lipschitz.LipschitzBound` in training mode: one power-iteration step per
batch for every Linear and Conv2d, differentiable in the weights (and BatchNorm scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certbench.method import LossOutput, non_negative, register_method
from methods._lipschitz import LipschitzMethod


@register_method("lipschitz-reg")
class LipschitzRegularised(LipschitzMethod):
    """CE(z, y) + λ·L."""

    default_certificate = "lipschitz-l2"
    params_schema = {
        "lambda": {"type": "number", "minimum": 0, "default": 0.01, "description": "weight λ of the bound"},
    }

    def check(self) -> None:
        non_negative("lambda", float(self.params["lambda"]))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        bound = self.estimate(model).total
        logits = model(x)
        cross_entropy = F.cross_entropy(logits, y)
        return LossOutput(
            cross_entropy + self.params["lambda"] * bound,
            {"lipschitz": bound.item(), "cross_entropy": cross_entropy.item()},
            logits=logits.detach(),
        )
