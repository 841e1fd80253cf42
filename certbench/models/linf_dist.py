"""ℓ∞-dist net architectures (Zhang et al. 2021, §4 and §5; v2 2022).

Both keep the data set's ``Normalize(mean, std)`` as first layer, like every model here. The
division by ``std`` scales ℓ∞ distances by ``1/std``: the logit map is ``1/min(std)``-Lipschitz
in pixel units at ``p = ∞``, which the ``linf-dist`` certificate (through
:func:`certbench.bounds.linf_dist.lipschitz_linf`) and the training losses (ε in normalised units,
as in the paper) account for.
"""

from __future__ import annotations

from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.models import register_arch
from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate


def _trunk(
    spec: DatasetSpec, layers: int, width: int, identity_value: float | None
) -> tuple[list[nn.Module], int]:
    """Normalize → flatten → (LinfDist(no bias) → MeanShift) × layers; also the output width."""
    if layers < 0 or width < 1:
        raise ValueError(f"need depth ≥ 1 and width ≥ 1, got {layers} hidden layers of width {width}")
    modules: list[nn.Module] = [Normalize(spec.mean, spec.std), nn.Flatten()]
    previous = spec.input_dim
    for _ in range(layers):
        modules += [LinfDist(previous, width, identity_value=identity_value), MeanShift(width)]
        previous = width
    return modules, previous


#: ``identity_value``: see :class:`certbench.nn.linf_dist.LinfDist` (null: no identity initialisation).
IDENTITY_VALUE = {"type": ["number", "null"], "default": 10.0}


@register_arch(
    "linf-dist-mlp",
    params_schema={
        "depth": {"type": "integer", "minimum": 1, "default": 5},
        "width": {"type": "integer", "minimum": 1, "default": 5120},
        "identity_value": IDENTITY_VALUE,
    },
)
def linf_dist_mlp(
    spec: DatasetSpec, *, depth: int, width: int, identity_value: float | None
) -> nn.Sequential:
    """``depth`` ℓ∞-dist layers: ``depth − 1`` hidden ones of ``width`` units, each followed by
    MeanShift, then one to the classes with a bias; logits are the negated distances."""
    modules, previous = _trunk(spec, depth - 1, width, identity_value)
    modules += [LinfDist(previous, spec.num_classes, bias=True, identity_value=identity_value), Negate()]
    return nn.Sequential(*modules)


@register_arch(
    "linf-dist-mlp+head",
    params_schema={
        "depth": {"type": "integer", "minimum": 1, "default": 4},
        "width": {"type": "integer", "minimum": 1, "default": 5120},
        "hidden": {"type": "integer", "minimum": 1, "default": 512},
        "identity_value": IDENTITY_VALUE,
    },
)
def linf_dist_mlp_head(
    spec: DatasetSpec, *, depth: int, width: int, hidden: int, identity_value: float | None
) -> nn.Sequential:
    """ "ℓ∞-dist Net+MLP": a trunk of ``depth`` ℓ∞-dist layers (each followed by MeanShift), then
    Linear(width → hidden) → tanh → Linear(hidden → classes), certified by interval bounds."""
    if depth < 1 or hidden < 1:
        raise ValueError(f"need depth ≥ 1 and hidden ≥ 1, got depth={depth}, hidden={hidden}")
    modules, previous = _trunk(spec, depth, width, identity_value)
    return nn.Sequential(
        *modules, nn.Linear(previous, hidden), nn.Tanh(), nn.Linear(hidden, spec.num_classes)
    )
