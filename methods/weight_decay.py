"""``weight-decay``: cross-entropy plus (λ/2)·Σ‖θ‖², the plain baseline of the LMT paper.

The penalty is part of the loss, over every parameter, so it acts the same under any optimiser
of the ``training`` section (with SGD it equals the optimiser's coupled weight decay; keep
``training.weight_decay`` at 0 to avoid counting it twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certbench.method import LossOutput, Method, non_negative, register_method


@register_method("weight-decay")
class WeightDecay(Method):
    """CE(z, y) + (λ/2)·Σ‖θ‖²."""

    default_certificate = "lipschitz-l2"
    params_schema = {
        "weight_decay": {"type": "number", "minimum": 0, "default": 5e-4, "description": "λ"},
    }

    def check(self) -> None:
        non_negative("weight_decay", float(self.params["weight_decay"]))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        logits = model(x)
        cross_entropy = F.cross_entropy(logits, y)
        squared = sum(p.square().sum() for p in model.parameters() if p.requires_grad)
        return LossOutput(
            cross_entropy + self.params["weight_decay"] / 2 * squared,
            {"cross_entropy": cross_entropy.item()},
            logits=logits.detach(),
        )
