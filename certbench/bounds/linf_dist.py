"""Bounds of ℓ∞-dist networks (Zhang et al., ICML 2021; v2 ICLR 2022) and SortNets (Zhang et al.,
NeurIPS 2022) over a box of inputs.

At ``p = ∞`` every ℓ∞-dist unit is 1-Lipschitz in ℓ∞, so an ℓ∞-dist net with logits ``−y``
certifies ``‖δ‖∞ < margin / 2`` (paper Prop. 3.1 / Thm. 3.2); :func:`lipschitz_linf` bounds a
chain at any ``p``. A SortNet unit (:class:`certbench.nn.sortnet.SortDist`) is ``‖c‖₁``-Lipschitz
in ℓ∞ whatever ``p`` (its proof is in :mod:`certbench.nn.sortnet`), so the same chain rule holds
with its own constant. Each distance layer type has its own rule here, matched by exact type (a
SortDist is not a LinfDist, nor the other way round). Interval bounds through every module of these
networks are exact per layer (each layer's ``interval``, see :mod:`certbench.nn.linf_dist` and
:mod:`certbench.nn.sortnet`), see :func:`interval_bounds`;
:func:`margin_lower_bound` folds the last ``Linear`` into the margins, and :func:`split_trunk`
separates the ℓ∞-dist trunk from a head that the interval bounds go through.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from certbench.nn.layers import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate
from certbench.nn.sortnet import SortDist

__all__ = ["DISTANCE_LAYERS", "interval_bounds", "lipschitz_linf", "margin_lower_bound", "split_trunk"]


#: The distance layers, each with its own rule below (exact types).
DISTANCE_LAYERS = (LinfDist, SortDist)
_TRUNK_TYPES = (*DISTANCE_LAYERS, MeanShift)


def _modules(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return list(model) if type(model) is nn.Sequential or isinstance(model, (list, tuple)) else [model]


def split_trunk(model: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """``(trunk, head)``: the trunk ends with the last ℓ∞-dist, SortNet or mean-shift module."""
    last = max(i for i, m in enumerate(model) if type(m) in _TRUNK_TYPES)
    return model[: last + 1], model[last + 1 :]


def lipschitz_linf(model: nn.Module | Sequence[nn.Module]) -> float:
    """ℓ∞→ℓ∞ Lipschitz bound of a chain of Normalize / Flatten / LinfDist / SortDist / MeanShift / Negate.

    ``Normalize`` contributes ``1 / min(std)`` of its buffer as it is now (ValueError unless finite
    and positive); a ℓ∞-dist layer ``n_in^{1/p}``; a SortNet layer ``‖c‖₁`` of its coefficients
    (ValueError unless finite and non-negative). Layers are matched by exact type: any other
    module, a subclass included, raises ``TypeError`` (a bound for it would need its own argument).
    """
    bound = 1.0
    for m in _modules(model):
        kind = type(m)
        if kind is Normalize:
            problem = m.buffer_problem()
            if problem is not None:
                raise ValueError(f"Normalize: {problem}")
            bound /= float(m.std.min())
        elif kind in DISTANCE_LAYERS:
            bound *= m.lipschitz_linf()
        elif kind not in (MeanShift, Negate, nn.Flatten, nn.Identity):
            raise TypeError(f"no ℓ∞ Lipschitz bound for {kind.__name__} (exact types only)")
    return bound


def interval_bounds(
    model: nn.Module | Sequence[nn.Module], lower: Tensor, upper: Tensor
) -> tuple[Tensor, Tensor]:
    """Propagate the box ``[lower, upper]`` through a chain of modules (interval arithmetic).

    Exact per layer for Normalize, Flatten, LinfDist, SortDist, MeanShift, Negate and monotone
    activations; ``Linear`` uses the centre/radius form ``W c + b ± |W| r``. Differentiable except
    through the distance layers. Layers are matched by exact type; other modules (subclasses included) raise
    ``TypeError``, a Normalize with a non-finite or non-positive std ``ValueError``.
    """
    for m in _modules(model):
        kind = type(m)
        if kind is nn.Linear:
            centre, radius = (upper + lower) / 2, (upper - lower) / 2
            centre, radius = m(centre), radius @ m.weight.abs().t()
            lower, upper = centre - radius, centre + radius
        elif kind in (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Flatten, nn.Identity, Normalize):
            if kind is Normalize and m.buffer_problem() is not None:
                raise ValueError(f"Normalize: {m.buffer_problem()}")
            lower, upper = m(lower), m(upper)  # monotone non-decreasing (Normalize: std > 0)
        elif kind in (*DISTANCE_LAYERS, MeanShift, Negate):
            lower, upper = m.interval(lower, upper)
        else:
            raise TypeError(f"no interval bound for {kind.__name__} (exact types only)")
    return lower, upper


def margin_lower_bound(final: nn.Linear, lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    """Lower bounds of ``z_y − z_j`` over the box ``[lower, upper]`` of the input of the last
    ``Linear`` (rows ``e_y − e_j`` folded into the layer, as in IBP with an elided last layer).
    Shape (B, K) with 0 at ``j = y``; the point is certified when every entry ``j ≠ y`` is > 0."""
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    diff = final.weight[y][:, None, :] - final.weight[None]  # (B, K, H)
    bias = 0.0 if final.bias is None else final.bias[y][:, None] - final.bias[None]
    return (diff @ centre[:, :, None]).squeeze(-1) - (diff.abs() @ radius[:, :, None]).squeeze(-1) + bias
