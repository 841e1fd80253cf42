"""``lipsdp-l2``: margin certificate with a verified LipSDP-Neuron Lipschitz bound (Fazlyab et al. 2019).

For an MLP with global ℓ2 Lipschitz bound L of its logit map, no perturbation with ‖δ‖₂ < r of
``r = margin / (√2·L)`` can change the prediction (Tsuzuku et al. 2018, Prop. 1: each difference of
two logits is √2·L-Lipschitz). L is the float64-verified LipSDP bound from :func:`certbench.lipsdp.lipsdp`
in pixel units (the Normalize layer and an input average pooling folded in, see
:class:`certbench.lipsdp.MLPStructure`); if no bound is verified, every sample is "error".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.certificates import (ERROR, Certificate, CertificateResult, margins, register_certificate,
                                    statuses_from_radius)
from certbench.lipsdp import SOLVERS, is_mlp, lipsdp, mlp_weights


@register_certificate("lipsdp-l2")
class LipSDPL2(Certificate):
    """Radius margin/(√2·L_SDP) for correctly classified points, 0 otherwise; MLPs only."""

    norm = "l2"

    def __init__(self, time_limit: float = 1800.0, solver: str = "SCS") -> None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be positive, got {time_limit}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver '{solver}'; known: {', '.join(SOLVERS)}")
        self.time_limit = float(time_limit)
        self.solver = solver

    def applies(self, model: nn.Module) -> bool:
        return is_mlp(model)

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        result = lipsdp(mlp_weights(model, tuple(x.shape[1:])), solver=self.solver, time_limit=self.time_limit)
        extra = {"solve_seconds": result.solve_time}
        if result.raw_bound is not None:
            extra["raw_bound"] = result.raw_bound
        if result.bound is None:
            return CertificateResult(radius=None, status={float(e): np.full(len(x), ERROR) for e in eps},
                                     errors=[f"lipsdp {result.status}: {result.message}"], extra=extra)
        with torch.no_grad():
            margin = margins(model(x), y).double().cpu().numpy()
        correct = margin > 0
        radius = np.where(correct, margin / (math.sqrt(2.0) * result.bound), 0.0)
        return CertificateResult(radius=radius, status=statuses_from_radius(radius, correct, eps),
                                 extra={**extra, "lipschitz_bound": result.bound})
