"""``lipschitz-l2``: the Lipschitz-margin certificate of LMT (Tsuzuku et al. 2018).

With L a bound on the ℓ2 Lipschitz constant of the logit map, each logit difference z_y − z_i is
√2·L-Lipschitz, so a correctly classified x keeps its label for ‖δ‖₂ < m/(√2·L), m the margin
(LMT Prop. 1). When the model ends in a Linear layer with rows w_i on top of a map with bound
L_sub, z_y − z_i is L_sub·‖w_y − w_i‖-Lipschitz, which gives the tighter
min_{i≠y} (z_y − z_i)/(L_sub·‖w_y − w_i‖) (LMT Prop. 2). Both are sound; the larger is recorded.
(With L = L_sub·‖W‖₂, as here, the last-layer form is never the smaller one, since
‖w_y − w_i‖ = ‖Wᵀ(e_y − e_i)‖ ≤ √2·‖W‖₂.)
L and L_sub come from :class:`certbench.bounds.lipschitz.LipschitzBound` in its rigorous exact mode,
computed once per set of weights and cached; ``extra`` records them as ``lipschitz_bound`` and
``lipschitz_bound_sub``, with ``bound_seconds``.

Float rounding: the radius is :func:`certbench.certificates.proven_radius` with the slopes √2·L and
L_sub·‖w_y − w_i‖ (the smaller per class): the exact margin at x is bounded below in float64 and
the float error of any forward pass in the box around x is bounded above
(:mod:`certbench.bounds.rounding`), so the prediction is constant on the ball both in exact arithmetic
and for the float pass.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from certbench.bounds.fingerprint import fingerprint
from certbench.bounds.lipschitz import (
    LipschitzBound,
    LipschitzEstimate,
    UnsupportedLayerError,
    check_supported,
)
from certbench.certificates import (
    Certificate,
    CertificateResult,
    eval_mode,
    lipschitz_margin_result,
    register_certificate,
)

_Key = tuple[tuple[int, ...], str]
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[_Key, LipschitzEstimate, float]] = (
    weakref.WeakKeyDictionary()
)


def exact_bound(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[LipschitzEstimate, float]:
    """The exact-mode bound of ``model`` and the seconds it took, cached while the model's structure
    and content (:func:`~certbench.bounds.fingerprint.fingerprint`) stay the same."""
    key = (tuple(input_shape), fingerprint(model))
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    started = time.perf_counter()
    estimate = LipschitzBound(model, input_shape).compute(exact=True)
    seconds = time.perf_counter() - started
    _CACHE[model] = (key, estimate, seconds)
    return estimate, seconds


@register_certificate("lipschitz-l2")
class LipschitzL2(Certificate):
    """LMT's margin/Lipschitz radius, the larger of the √2·L and the last-layer forms."""

    norm = "l2"
    params_schema = {"batch_size": {"type": "integer", "minimum": 1, "default": 256}}
    batch_size: int

    def _refusal(self, model: nn.Module) -> str | None:
        try:
            check_supported(model)
        except UnsupportedLayerError as error:
            return str(error)
        return None

    @torch.no_grad()
    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        with eval_mode(model):
            estimate, seconds = exact_bound(model, tuple(x.shape[1:]))
        return lipschitz_margin_result(
            model, x, y, estimate, eps, self.batch_size, {"bound_seconds": seconds}
        )
