"""``linf-dist`` / ``linf-dist-l2``: certificates of ℓ∞-dist nets (Zhang et al. 2021).

* Plain ℓ∞-dist nets (the last ℓ∞-dist layer gives the logits): the logit map is L-Lipschitz in
  ℓ∞ with ``L = lipschitz_linf(model)`` — ``1/min(std)`` for the input normalisation, times
  ``n_in^{1/p}`` per layer (1 at ``p = ∞``, so a model trained to the end of its p schedule gets
  exactly ``1/min(std)``). No ‖δ‖∞ < r with ``r = (margin − τ)/(2L)`` changes the prediction
  (paper Thm. 3.2: each logit moves by at most L‖δ‖∞). ``τ`` covers float rounding in the forward
  pass at x and at x + δ (:func:`certbench.certificates.logits_with_allowance`, a ℓ∞-dist layer
  with finite p weighted by ``1 + n_in/p`` for its summation).
* "+MLP" nets (a Linear/tanh head after the trunk): no radius; at each ε the box
  ``[x − ε, x + ε] ∩ [0, 1]`` is propagated exactly through Normalize and every ℓ∞-dist and
  MeanShift layer, by interval arithmetic through the head, with the last Linear folded into the
  margins; certified iff every lower bound of ``z_y − z_j`` is positive.

Since ‖δ‖∞ ≤ ‖δ‖₂, every ℓ∞ guarantee also holds for ℓ2 balls of the same radius:
``linf-dist-l2`` reports it in the ℓ2 column (loose, but sound).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.certificates import (CERTIFIED, NOT_CERTIFIED, Certificate, CertificateResult, eval_mode,
                                    input_box, logits_with_allowance, margins, register_certificate,
                                    statuses_from_radius)
from certbench.nn.linf_dist import (LinfDist, Negate, interval_bounds, lipschitz_linf, margin_lower_bound,
                                    split_trunk)


def _summation_factor(module: nn.Module) -> float:
    """A ℓ∞-dist layer with finite p sums n_in powers: its rounding error grows with 1 + n_in/p."""
    return 1.0 + module.in_features / module.p if isinstance(module, LinfDist) else 1.0


@register_certificate("linf-dist")
class LinfDistCertificate(Certificate):
    """Margin radius of plain ℓ∞-dist nets; interval bounds at each ε for nets with a head."""

    norm = "linf"

    def applies(self, model: nn.Module) -> bool:
        if not isinstance(model, nn.Sequential) or not any(isinstance(m, LinfDist) for m in model):
            return False
        head = split_trunk(model)[1]
        if all(isinstance(m, Negate) for m in head):
            try:
                lipschitz_linf(model)
            except TypeError:
                return False
            return True
        supported = (nn.Linear, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity, Negate)
        return isinstance(head[-1], nn.Linear) and all(isinstance(m, supported) for m in head)

    @torch.no_grad()
    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        with eval_mode(model):
            if all(isinstance(m, Negate) for m in split_trunk(model)[1]):
                return self._radius(model, x, y, eps)
            return self._intervals(model, x, y, eps)

    @staticmethod
    def _radius(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]) -> CertificateResult:
        logits, tau = logits_with_allowance(model, x, _summation_factor)
        lipschitz = lipschitz_linf(model)
        margin = margins(logits, y).double()
        correct = (margin > 0).cpu().numpy()
        radius = ((margin - tau).clamp_min(0) / (2 * lipschitz)).cpu().numpy()
        radius = np.where(correct, radius, 0.0)
        return CertificateResult(radius=radius, status=statuses_from_radius(radius, correct, eps),
                                 extra={"lipschitz_bound": lipschitz,
                                        "max_rounding_allowance": float(tau.max()) if len(tau) else 0.0,
                                        "p_is_inf": float(all(math.isinf(m.p) for m in model
                                                              if isinstance(m, LinfDist)))})

    @staticmethod
    def _intervals(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]) -> CertificateResult:
        status = {}
        for e in eps:
            lower, upper = interval_bounds(model[:-1], *input_box(x, e))
            bound = margin_lower_bound(model[-1], lower, upper, y)
            others = torch.ones_like(bound, dtype=torch.bool).scatter_(1, y[:, None], False)
            certified = torch.where(others, bound > 0, True).all(1).cpu().numpy()
            status[float(e)] = np.where(certified, CERTIFIED, NOT_CERTIFIED)
        return CertificateResult(radius=None, status=status)


@register_certificate("linf-dist-l2")
class LinfDistL2Certificate(LinfDistCertificate):
    """The ℓ∞ guarantee read in ℓ2: the ℓ2 ball of radius r lies inside the ℓ∞ ball of radius r."""

    norm = "l2"
