"""Plain cross-entropy training, the baseline every ratio is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certbench.method import LossOutput, Method, register_method


@register_method("standard")
class Standard(Method):
    """Cross-entropy; weight decay, if any, comes from ``training.weight_decay``."""

    default_certificate = "lipschitz-l2"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        logits = model(x)
        return LossOutput(F.cross_entropy(logits, y), logits=logits)
