"""``parseval``: Parseval networks (Cissé et al. 2017), a baseline of the LMT paper.

After every optimiser step each weight matrix W (Linear weights, Conv2d kernels reshaped to
(out, in·kh·kw)) except the last layer's is retracted towards the Stiefel manifold,
W ← (1 + β)·W − β·W·Wᵀ·W (Cissé et al. eq. 4), which maps each singular value σ to
σ + β·σ·(1 − σ²): towards 1. Residual sums become convex combinations: ``build_model`` sets every
:class:`~certbench.nn.Residual` to coefficients (0.5, 0.5).

``row_fraction`` < 1 retracts a random subset of rows per step, the paper's way to save time
(the fraction it used is not verified here); the full retraction costs about 4·out²·in flops
per layer, which dominates for large fully connected layers.

Not implemented: the paper's scaling of conv outputs by 1/√(kh·kw) (it changes the
architecture; the certificate bounds the convolution operator itself, which needs no such
scaling).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certbench.config import ConfigError
from certbench.method import LossOutput, Method, register_method
from certbench.nn import Residual
from methods._lipschitz import require_supported

CONVEX = (0.5, 0.5)


def retract(weight: torch.Tensor, beta: float, row_fraction: float = 1.0) -> None:
    """In place: W ← (1 + β)W − βWWᵀW on W viewed as (out, in·kh·kw), the cheaper product order first.

    With ``row_fraction`` < 1 only a random subset S of ⌈fraction·out⌉ rows is updated,
    W_S ← (1 + β)W_S − βW_S W_Sᵀ W_S, Cissé et al.'s way to cut the cost (∝ fraction²).
    """
    matrix = weight.view(weight.shape[0], -1)
    rows = slice(None)
    if row_fraction < 1:
        rows = torch.randperm(matrix.shape[0], device=matrix.device)[
            : math.ceil(row_fraction * matrix.shape[0])
        ]
    part = matrix[rows]
    cubic = (part @ part.t()) @ part if part.shape[0] <= part.shape[1] else part @ (part.t() @ part)
    matrix[rows] = (1 + beta) * part - beta * cubic


def retracted_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights of every Linear and Conv2d except the last one (the classifier)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return weights[:-1]


@register_method("parseval")
class Parseval(Method):
    """Cross-entropy with the Parseval retraction after each step and convex residual sums."""

    default_certificate = "lipschitz-l2"
    example_arch = ("cnn-small", {})
    params_schema = {
        "beta": {
            "type": "number",
            "exclusiveMinimum": 0,
            "exclusiveMaximum": 1,
            "default": 3e-4,
            "description": "retraction step β (paper: 1e-4 … 3e-4)",
        },
        "row_fraction": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 1.0,
            "description": "fraction of each matrix's rows retracted per step (random subset)",
        },
    }

    def check(self) -> None:
        beta, fraction = float(self.params["beta"]), float(self.params["row_fraction"])
        if not 0 < beta < 1:
            raise ConfigError(f"params.beta: must lie in (0, 1), got {beta}")
        if not 0 < fraction <= 1:
            raise ConfigError(f"params.row_fraction: must lie in (0, 1], got {fraction}")

    def build_model(self, arch: str, arch_params: Mapping[str, Any]) -> nn.Module:
        model = super().build_model(arch, arch_params)
        for module in model.modules():
            if isinstance(module, Residual):
                module.coefficients = CONVEX
        return model

    def prepare(self, model: nn.Module) -> None:
        require_supported(self.name, model)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        logits = model(x)
        return LossOutput(F.cross_entropy(logits, y), logits=logits.detach())

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for weight in retracted_weights(model):
            retract(weight, float(self.params["beta"]), float(self.params["row_fraction"]))
