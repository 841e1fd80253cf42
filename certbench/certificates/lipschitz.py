"""``lipschitz-l2``: the Lipschitz-margin certificate of LMT (Tsuzuku et al. 2018).

With L a bound on the ℓ2 Lipschitz constant of the logit map, each logit difference z_y − z_i is
√2·L-Lipschitz, so a correctly classified x keeps its label for ‖δ‖₂ < m/(√2·L), m the margin
(LMT Prop. 1). When the model ends in a Linear layer with rows w_i on top of a map with bound
L_sub, z_y − z_i is L_sub·‖w_y − w_i‖-Lipschitz, which gives the tighter
min_{i≠y} (z_y − z_i)/(L_sub·‖w_y − w_i‖) (LMT Prop. 2). Both are sound; the larger is recorded.
(With L = L_sub·‖W‖₂, as here, the last-layer form is never the smaller one, since
‖w_y − w_i‖ = ‖Wᵀ(e_y − e_i)‖ ≤ √2·‖W‖₂.)
L and L_sub come from :class:`certbench.lipschitz.LipschitzBound` in its rigorous exact mode,
computed once per set of weights and cached; ``extra`` records them as ``lipschitz_bound`` and
``lipschitz_bound_sub``, with ``bound_seconds``.

Float rounding: the logits are computed in the model's float precision, which the guarantee (a
statement about exact arithmetic) does not cover. As in the ``linf-dist`` certificate, every
logit difference is reduced by τ = 4·eps_mach·Σ_layers max|output| (per sample, over the layers
of the forward pass that round, see :func:`certbench.certificates.logits_with_allowance`) before it is divided: a
heuristic allowance for the error of the forward passes at x and at x + δ, not a proven bound.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certbench.certificates import (Certificate, CertificateResult, eval_mode, logits_with_allowance,
                                    register_certificate, statuses_from_radius)
from certbench.lipschitz import LipschitzBound, LipschitzEstimate, UnsupportedLayerError, check_supported

_Key = tuple[tuple[int, ...], tuple[tuple[int, int], ...]]
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[_Key, LipschitzEstimate, float]] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def exact_bound(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[LipschitzEstimate, float]:
    """The exact-mode bound of ``model`` and the seconds it took, cached while the weights stay the same."""
    key = (tuple(input_shape), _fingerprint(model))
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    started = time.perf_counter()
    estimate = LipschitzBound(model, input_shape).compute(exact=True)
    seconds = time.perf_counter() - started
    _CACHE[model] = (key, estimate, seconds)
    return estimate, seconds


def radii(logits: torch.Tensor, y: torch.Tensor, tau: torch.Tensor,
          estimate: LipschitzEstimate) -> tuple[torch.Tensor, torch.Tensor]:
    """(radius of the √2·L form, radius of the last-layer form or −inf), float64, 0 where not positive.

    Both use the logit differences z_y − z_i − τ.
    """
    logits = logits.double()
    diff = logits.gather(1, y[:, None]) - logits - tau[:, None]
    diff.scatter_(1, y[:, None], math.inf)
    margin = diff.min(dim=1).values
    plain = (margin / (math.sqrt(2.0) * estimate.total.to(diff.device))).clamp_min(0)
    if estimate.sub is None:
        return plain, torch.full_like(plain, -math.inf)
    weight = estimate.last_weight.detach().double().to(diff.device)
    distances = torch.cdist(weight, weight)[y] * estimate.sub.to(diff.device)
    pairwise = diff / distances  # label column: +inf/0 = +inf; 0/0 (a tie between equal rows): nan → 0
    pairwise = torch.where(pairwise.isnan(), 0.0, pairwise)
    return plain, pairwise.min(dim=1).values.clamp_min(0)


@register_certificate("lipschitz-l2")
class LipschitzL2(Certificate):
    """LMT's margin/Lipschitz radius, the larger of the √2·L and the last-layer forms."""

    norm = "l2"

    def __init__(self, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = int(batch_size)

    def applies(self, model: nn.Module) -> bool:
        try:
            check_supported(model)
        except UnsupportedLayerError:
            return False
        return True

    @torch.no_grad()
    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        with eval_mode(model):
            estimate, seconds = exact_bound(model, tuple(x.shape[1:]))
            batches = [logits_with_allowance(model, x[start:start + self.batch_size])
                       for start in range(0, len(x), self.batch_size)]
        logits, tau = (torch.cat(parts) for parts in zip(*batches))
        r_plain, r_tight = (r.cpu().numpy() for r in radii(logits, y, tau, estimate))
        is_correct = (logits.argmax(1) == y).cpu().numpy()
        radius = np.where(is_correct, np.maximum(r_plain, r_tight), 0.0)
        # keys as the other certificates' (the Lipschitz-vs-accuracy figure reads "lipschitz_bound")
        extra = {"lipschitz_bound": float(estimate.total), "bound_seconds": seconds}
        if estimate.sub is not None:
            extra["lipschitz_bound_sub"] = float(estimate.sub)
        return CertificateResult(radius=radius, status=statuses_from_radius(radius, is_correct, eps), extra=extra)
