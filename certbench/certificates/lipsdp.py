"""``lipsdp-l2``: margin certificate with a verified LipSDP-Neuron Lipschitz bound (Fazlyab et al. 2019).

The same two margin forms as ``lipschitz-l2``, with LipSDP bounds in place of products of norms:
the margin ``z_y − z_i`` is Lipschitz with constant ``min(√2·L, L_body·‖w_y − w_i‖)`` (Tsuzuku et al.
2018, Prop. 1 and the last-layer form of LMT), where L bounds the whole logit map and L_body the map up
to the last hidden activation (LipSDP with the identity as output layer), so no perturbation with
‖δ‖₂ < r of ``r = min_i margin_i / slope_i`` changes the prediction. Both are float64-verified bounds
from :func:`certbench.bounds.lipsdp.lipsdp` in pixel units (the Normalize layer and an input average
pooling folded in, see :class:`certbench.bounds.lipsdp.MLPStructure`). Wherever LipSDP is tighter than
the products of spectral norms (which it is in exact arithmetic), every radius is then at least the
``lipschitz-l2`` one. If the body bound is not verified in time, the √2 form alone is used; if the
whole-map bound is not verified, every sample is "error". Float rounding is covered as in
``lipschitz-l2``: the radius is :func:`certbench.certificates.proven_radius` with these slopes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.bounds.lipschitz import LipschitzEstimate
from certbench.bounds.lipsdp import SOLVERS, LipSDPResult, NotAnMLPError, lipsdp, mlp_structure, mlp_weights
from certbench.certificates import (
    ERROR,
    Certificate,
    CertificateResult,
    lipschitz_margin_result,
    register_certificate,
)

log = logging.getLogger(__name__)


@register_certificate("lipsdp-l2")
class LipSDPL2(Certificate):
    """Radius min_i margin_i/slope_i with LipSDP slopes for correctly classified points, 0 otherwise;
    MLPs only."""

    norm = "l2"
    params_schema = {
        "time_limit": {"type": "number", "exclusiveMinimum": 0, "default": 1800.0},
        "solver": {"enum": list(SOLVERS), "default": "SCS"},
    }
    time_limit: float
    solver: str

    def _refusal(self, model: nn.Module) -> str | None:
        try:
            mlp_structure(model)
        except NotAnMLPError as error:
            return str(error)
        return None

    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        weights = mlp_weights(model, tuple(x.shape[1:]))
        started = time.perf_counter()
        result = lipsdp(weights, solver=self.solver, time_limit=self.time_limit)
        extra: dict[str, float] = {"solve_seconds": result.solve_time}
        if result.raw_bound is not None:
            extra["raw_bound"] = result.raw_bound
        if result.bound is None:
            return CertificateResult(
                radius=None,
                status={float(e): np.full(len(x), ERROR) for e in eps},
                errors=[f"lipsdp {result.status}: {result.message}"],
                extra=extra,
            )
        body = self._body_bound(weights, self.time_limit - (time.perf_counter() - started))
        if body is not None:
            extra["body_solve_seconds"] = body.solve_time
            if not body.verified:
                log.warning(
                    "lipsdp-l2: body bound %s (%s); the √2 form alone is used", body.status, body.message
                )
        estimate = LipschitzEstimate(
            total=torch.tensor(result.bound, dtype=torch.float64),
            sub=None if body is None or body.bound is None else torch.tensor(body.bound, dtype=torch.float64),
            last_weight=torch.from_numpy(weights[-1]),
        )
        return lipschitz_margin_result(model, x, y, estimate, eps, extra=extra)

    def _body_bound(self, weights: list[np.ndarray], time_left: float) -> LipSDPResult | None:
        """LipSDP of the map up to the last hidden activation (identity output layer); None for a
        model without a hidden layer."""
        if len(weights) < 2:
            return None
        hidden = weights[-1].shape[1]
        return lipsdp([*weights[:-1], np.eye(hidden)], solver=self.solver, time_limit=max(time_left, 1e-3))
