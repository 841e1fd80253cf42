"""``lipsdp-l2``: margin certificate with a verified LipSDP-Neuron Lipschitz bound (Fazlyab et al. 2019).

For an MLP with global ℓ2 Lipschitz bound L of its logit map, no perturbation with ‖δ‖₂ < r of
``r = margin / (√2·L)`` can change the prediction (Tsuzuku et al. 2018, Prop. 1: each difference of
two logits is √2·L-Lipschitz). L is the float64-verified LipSDP bound from :func:`certbench.bounds.lipsdp.lipsdp`
in pixel units (the Normalize layer and an input average pooling folded in, see
:class:`certbench.bounds.lipsdp.MLPStructure`); if no bound is verified, every sample is "error".
Float rounding is covered as in ``lipschitz-l2``: the radius is
:func:`certbench.certificates.proven_radius` with the slope √2·L for every class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.bounds.lipsdp import SOLVERS, NotAnMLPError, lipsdp, mlp_structure, mlp_weights
from certbench.certificates import (
    ERROR,
    Certificate,
    CertificateResult,
    eval_mode,
    proven_radius,
    register_certificate,
    statuses_from_radius,
)


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

    def _refusal(self, model: nn.Module) -> str | None:
        try:
            mlp_structure(model)
        except NotAnMLPError as error:
            return str(error)
        return None

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        result = lipsdp(mlp_weights(model, tuple(x.shape[1:])), solver=self.solver, time_limit=self.time_limit)
        extra = {"solve_seconds": result.solve_time}
        if result.raw_bound is not None:
            extra["raw_bound"] = result.raw_bound
        if result.bound is None:
            return CertificateResult(radius=None, status={float(e): np.full(len(x), ERROR) for e in eps},
                                     errors=[f"lipsdp {result.status}: {result.message}"], extra=extra)
        with torch.no_grad(), eval_mode(model):
            logits = model(x)
            slopes = torch.full(logits.shape, math.sqrt(2.0) * result.bound, dtype=torch.float64)
            radius = proven_radius(model, x, y, slopes, "l2").cpu().numpy()
        correct = (logits.argmax(1) == y).cpu().numpy()
        radius = np.where(correct, radius, 0.0)
        return CertificateResult(radius=radius, status=statuses_from_radius(radius, correct, eps),
                                 extra={**extra, "lipschitz_bound": result.bound})
