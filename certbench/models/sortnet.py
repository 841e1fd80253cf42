"""SortNet MLP (Zhang, Jiang, He, Wang, NeurIPS 2022, and the authors' ``SortMLPModel``).

The same chain as ``linf-dist-mlp`` (:mod:`certbench.models.linf_dist`) with SortNet layers
(:class:`certbench.nn.sortnet.SortDist`) in place of the ℓ∞-dist layers after the first: as in the
authors' model, the layer on the input is a plain ℓ∞-dist layer and every later one (the hidden
ones and the one to the classes, with a bias) is a SortNet layer with geometric coefficients of
ratio ``rho`` truncated at ``terms`` terms. Logits are the negated outputs. Every layer is
1-Lipschitz in ℓ∞ at ``p = ∞`` (in normalised units; the input normalisation scales by
``1/min(std)``), so the ``linf-dist`` certificate applies with its SortNet rule.

``rho`` is ``1 −`` the authors' ``dropout`` argument (their probability of keeping a coordinate in
the sampled training form): 0.3 for MNIST at ε = 0.1, 0.25 for MNIST at 0.3 and CIFAR-10 at
2/255, 0.15 for CIFAR-10 at 8/255. ``rho = 0`` gives exactly ``linf-dist-mlp``'s function.
"""

from __future__ import annotations

from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.models import register_arch
from certbench.models.linf_dist import IDENTITY_VALUE
from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate
from certbench.nn.sortnet import DEFAULT_TERMS, SortDist


@register_arch(
    "sortnet-mlp",
    params_schema={
        "depth": {"type": "integer", "minimum": 2, "default": 5},
        "width": {"type": "integer", "minimum": 1, "default": 5120},
        "rho": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.3},
        "terms": {"type": "integer", "minimum": 1, "default": DEFAULT_TERMS},
        "identity_value": IDENTITY_VALUE,
    },
)
def sortnet_mlp(
    spec: DatasetSpec, *, depth: int, width: int, rho: float, terms: int, identity_value: float | None
) -> nn.Sequential:
    """``depth`` distance layers: an ℓ∞-dist layer on the input, ``depth − 2`` hidden SortNet layers
    of ``width`` units, each of the hidden layers followed by MeanShift, then a SortNet layer to
    the classes with a bias; logits are the negated distances."""
    if depth < 2 or width < 1:
        raise ValueError(f"need depth ≥ 2 and width ≥ 1, got depth={depth}, width={width}")
    modules: list[nn.Module] = [
        Normalize(spec.mean, spec.std),
        nn.Flatten(),
        LinfDist(spec.input_dim, width, identity_value=identity_value),
        MeanShift(width),
    ]
    sort = {"rho": rho, "terms": terms, "identity_value": identity_value}
    for _ in range(depth - 2):
        modules += [SortDist(width, width, **sort), MeanShift(width)]
    modules += [SortDist(width, spec.num_classes, bias=True, **sort), Negate()]
    return nn.Sequential(*modules)
