"""``linf-dist`` / ``linf-dist-l2``: certificates of ℓ∞-dist nets (Zhang et al. 2021) and SortNets
(Zhang et al. 2022).

* Plain ℓ∞-dist nets and SortNets (the last distance layer gives the logits): the logit map is
  L-Lipschitz in ℓ∞ with ``L = lipschitz_linf(model)`` — ``1/min(std)`` for the input
  normalisation, times ``n_in^{1/p}`` per ℓ∞-dist layer (1 at ``p = ∞``, so a model trained to the
  end of its p schedule gets exactly ``1/min(std)``) and ``‖c‖₁`` per SortNet layer (at most 1 for
  the geometric coefficients; the proof is in :mod:`certbench.nn.sortnet`). No ‖δ‖∞ < r changes
  the prediction (ℓ∞-dist paper Thm. 3.2: each logit moves by at most L‖δ‖∞, so each margin by
  2L‖δ‖∞), with r from :func:`certbench.certificates.proven_radius` (slope 2L), which also covers
  float rounding (the SortNet layer's own rule: :func:`certbench.bounds.rounding._sort_dist`).
* "+MLP" nets (a Linear/tanh head after the trunk): no radius; at each ε the box
  ``[x − ε, x + ε] ∩ [0, 1]`` is propagated through Normalize and every ℓ∞-dist, SortNet and
  MeanShift layer (exact per layer) and by interval arithmetic through the head, with the last Linear folded
  into the margins, in float64 with outward widening; certified iff every lower bound of
  ``z_y − z_j`` exceeds the float error bound of the margin on the box
  (:func:`certbench.bounds.rounding.margin_bounds`).

Since ‖δ‖∞ ≤ ‖δ‖₂, every ℓ∞ guarantee also holds for ℓ2 balls of the same radius:
``linf-dist-l2`` reports it in the ℓ2 column (loose, but sound).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.bounds.linf_dist import DISTANCE_LAYERS, lipschitz_linf, split_trunk
from certbench.bounds.rounding import input_region, margin_bounds
from certbench.certificates import (
    CERTIFIED,
    NOT_CERTIFIED,
    Certificate,
    CertificateResult,
    eval_mode,
    proven_radius,
    register_certificate,
    statuses_from_radius,
)
from certbench.nn import Normalize
from certbench.nn.linf_dist import MeanShift, Negate

#: Layers of the chain with an ℓ∞-dist rule (exact types; each distance layer type has its own
#: Lipschitz, interval and rounding rule); the head after the trunk takes ``_HEAD``.
_KNOWN = (
    Normalize,
    nn.Flatten,
    nn.Identity,
    *DISTANCE_LAYERS,
    MeanShift,
    Negate,
    nn.Linear,
    nn.Tanh,
    nn.ReLU,
    nn.Sigmoid,
)
_HEAD = (nn.Linear, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity, Negate)


@register_certificate("linf-dist")
class LinfDistCertificate(Certificate):
    """Margin radius of plain ℓ∞-dist nets and SortNets; interval bounds at each ε for nets with a head."""

    norm = "linf"

    def _refusal(self, model: nn.Module) -> str | None:
        """Exact layer types only: a subclass of LinfDist or SortDist (or of any layer here) may
        compute something else."""
        if type(model) is not nn.Sequential:
            return f"not an ℓ∞-dist net: the model is a {type(model).__name__}, not an nn.Sequential"
        for index, module in enumerate(model):
            if type(module) not in _KNOWN:
                return f"layer {index} ({type(module).__name__}) has no ℓ∞-dist rule (exact types only)"
        if not any(type(m) in DISTANCE_LAYERS for m in model):
            return "not an ℓ∞-dist net: no LinfDist or SortDist layer"
        head = split_trunk(model)[1]
        if all(type(m) is Negate for m in head):
            try:
                lipschitz_linf(model)
            except (TypeError, ValueError) as error:
                return str(error)
            return None
        if type(head[-1]) is not nn.Linear:
            return (
                f"the head after the last distance layer must end in nn.Linear, not {type(head[-1]).__name__}"
            )
        unsupported = sorted({type(m).__name__ for m in head if type(m) not in _HEAD})
        return f"no interval rule for head layers {', '.join(unsupported)}" if unsupported else None

    @torch.no_grad()
    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        with eval_mode(model):
            if all(isinstance(m, Negate) for m in split_trunk(model)[1]):
                return self._radius(model, x, y, eps)
            return self._intervals(model, x, y, eps)

    @staticmethod
    def _radius(
        model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        logits = model(x)
        lipschitz = lipschitz_linf(model)
        correct = (logits.argmax(1) == y).cpu().numpy()
        slopes = torch.full(logits.shape, 2 * lipschitz, dtype=torch.float64)
        radius = np.where(correct, proven_radius(model, x, y, slopes, "linf").cpu().numpy(), 0.0)
        return CertificateResult(
            radius=radius,
            status=statuses_from_radius(radius, correct, eps),
            extra={"lipschitz_bound": lipschitz},
        )

    @staticmethod
    def _intervals(
        model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        status = {}
        correct = model(x).argmax(1) == y
        for e in eps:
            certified = margin_bounds(model, input_region(x, float(e)), y).certified() & correct
            status[float(e)] = np.where(certified.cpu().numpy(), CERTIFIED, NOT_CERTIFIED)
        return CertificateResult(radius=None, status=status)


@register_certificate("linf-dist-l2")
class LinfDistL2Certificate(LinfDistCertificate):
    """The ℓ∞ guarantee read in ℓ2: the ℓ2 ball of radius r lies inside the ℓ∞ ball of radius r."""

    norm = "l2"
