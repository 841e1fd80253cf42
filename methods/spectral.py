"""``spectral``: spectral-norm regularisation (Yoshida & Miyato 2017), a baseline of the LMT paper.

loss = CE + (λ/2)·Σ_layers σ(W)², over every Linear weight and every Conv2d kernel reshaped to
(out, in·kh·kw) as in the paper. σ = ‖W v‖ after one power-iteration step per update from a
persistent vector, with the iteration vectors detached (Yoshida & Miyato, Sec. 3), so
∂σ/∂W = u vᵀ. The vectors are the method's checkpoint state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipschitz import power_step
from certbench.method import LossOutput, Method, non_negative, register_method
from methods._lipschitz import require_supported


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear weight and Conv2d kernel of ``model`` as an (out, in·kh·kw) view, by layer name."""
    return {
        name: m.weight.view(m.weight.shape[0], -1)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@register_method("spectral")
class SpectralNormRegularised(Method):
    """CE + (λ/2)·Σ σ(W)² with one power step per update."""

    default_certificate = "lipschitz-l2"
    params_schema = {
        "lambda": {"type": "number", "minimum": 0, "default": 0.01, "description": "weight λ (paper: 0.01)"},
    }

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self.vectors: dict[str, torch.Tensor] = {}

    def check(self) -> None:
        non_negative("lambda", float(self.params["lambda"]))

    def prepare(self, model: nn.Module) -> None:
        require_supported(self.name, model)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Σ σ(W)² with one power-iteration step per matrix."""
        squares = []
        for name, matrix in weight_matrices(model).items():
            u = self.vectors.get(name)
            if u is None or u.shape != (matrix.shape[0],):
                u = torch.randn(matrix.shape[0])
            sigma, self.vectors[name] = power_step(
                matrix.mv, matrix.t().mv, u.to(matrix.device, matrix.dtype)
            )
            squares.append(sigma.square())
        return torch.stack(squares).sum()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        penalty = self.penalty(model)
        logits = model(x)
        cross_entropy = F.cross_entropy(logits, y)
        return LossOutput(
            cross_entropy + self.params["lambda"] / 2 * penalty,
            {"sum_sigma_squared": penalty.item(), "cross_entropy": cross_entropy.item()},
            logits=logits.detach(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": {name: v.detach().clone() for name, v in self.vectors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vectors = {name: v.clone() for name, v in state.get("vectors", {}).items()}
