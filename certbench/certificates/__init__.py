"""Certificate registry and the result every certificate returns.

A certificate either gives a per-sample radius in its norm (certified at ε iff the
point is classified correctly and its radius exceeds ε) or only per-ε statuses
(bound-propagation verifiers). Every sample of every ε gets exactly one status;
verifier failures are ``error``, never folded into the other two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from certbench.config import check_params
from certbench.registry import Registry

if TYPE_CHECKING:
    from certbench.bounds.lipschitz import LipschitzEstimate

CERTIFIED, NOT_CERTIFIED, ERROR = "certified", "not_certified", "error"
Norm = Literal["l2", "linf"]


@dataclass
class CertificateResult:
    """Per-sample outcome of one certificate on one batch or test set.

    ``verifier``, for a certificate that runs several verifiers (``cascade``): per ε, the name of the
    one that certified each sample ('' where none did); evaluation writes it to the per-sample records.
    """

    radius: np.ndarray | None
    status: dict[float, np.ndarray]
    errors: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    verifier: dict[float, np.ndarray] | None = None


class Certificate:
    """Base class: ``refusal`` says why the model cannot be certified at all (None: it can).

    Subclasses implement :meth:`_refusal` for their own rule: accept layers by exact type
    (``type(m) is X``; a subclass may change ``forward``) and only with the settings their
    bound is proven for. The checks every certificate shares run first
    (:func:`certbench.applicability.common_refusal`: hooks, a patched ``forward``, invalid
    ``Normalize`` buffers), then the rounding rules: every certificate's promise includes the float
    forward pass, so a layer without a proven rounding rule (:func:`certbench.bounds.rounding.check`)
    refuses the model for all of them.
    """

    name: ClassVar[str]
    norm: ClassVar[Norm]
    #: JSON-schema ``properties`` of the certificate's parameters, each with a ``default``
    #: (:func:`certbench.config.check_params`); each becomes an attribute of the instance.
    params_schema: ClassVar[dict[str, dict[str, Any]]] = {}
    #: False: a costly certificate that ``certificates: [all]`` leaves out; it runs only when named.
    in_all: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        filled = check_params(self.params_schema, params, f"evaluation.certificate_params.{self.name}.")
        for key, value in filled.items():
            setattr(self, key, value)

    def refusal(self, model: nn.Module) -> str | None:
        """None when the certificate applies to ``model``, else a one-line reason."""
        from certbench.applicability import common_refusal
        from certbench.bounds.rounding import RoundingUnsupported, check

        reason = common_refusal(model)
        if reason is not None:
            return reason
        try:
            check(model)
        except RoundingUnsupported as error:
            return f"float rounding: {error}"
        return self._refusal(model)

    def _refusal(self, model: nn.Module) -> str | None:
        """The certificate's own rule. A certificate written against the older interface, which
        overrides :meth:`applies` instead, is asked that (after the common checks)."""
        if type(self).applies is not Certificate.applies:
            return None if self.applies(model) else f"certificate '{self.name}' does not apply to this model"
        raise NotImplementedError

    def applies(self, model: nn.Module) -> bool:
        """Whether :meth:`refusal` finds nothing."""
        return self.refusal(model) is None

    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        raise NotImplementedError


CERTIFICATES: Registry[type[Certificate]] = Registry("certificate", "certbench.certificates")
register_certificate = CERTIFICATES.register


def statuses_from_radius(
    radius: np.ndarray, correct: np.ndarray, eps: Sequence[float]
) -> dict[float, np.ndarray]:
    """Certified at ε iff correctly classified with radius strictly above ε."""
    return {float(e): np.where(correct & (radius > e), CERTIFIED, NOT_CERTIFIED) for e in eps}


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per sample (negative when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluate with running statistics and restore every module's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def proven_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    slopes: torch.Tensor,
    norm: Norm,
    batch_size: int = 256,
) -> torch.Tensor:
    """A radius r (float64, per sample, 0 where none) with, for every class j ≠ y,

        lower_j(x) − slopes_j · r − error_j(ball of radius r around x, in ``norm``) > 0,

    where ``slopes`` (B, K) are Lipschitz constants of the exact margins z_y − z_j in the
    certificate's norm (column y is ignored), ``lower_j`` is the proven float64 lower bound of the
    exact margin at x and ``error_j`` bounds how far any float pass anywhere in the box can move it
    (:func:`certbench.bounds.rounding.margin_bounds`). The exact margin at x' is ≥ lower_j − slopes_j·‖x' − x‖
    (the Lipschitz property), and the float margin at x' is within error_j of it (the ball is
    described as the box of radius r, for ℓ2 intersected with the ball carried through the layers).
    Two passes: r₀ from the error at x alone, then r from the error on the ball of radius r₀, which
    contains the ball of radius r ≤ r₀ (so the error bound used covers every point of the final ball).
    """
    from certbench.bounds.rounding import input_region, margin_bounds

    radii = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        k = slopes[start : start + batch_size].double().scatter(1, yb[:, None], 1.0).to(xb.device)
        point = margin_bounds(model, input_region(xb), yb)
        first = ((point.lower - point.error) / k).min(dim=1).values.clamp_min(0) * (1 - 4 * 2.0**-53)
        region = margin_bounds(model, input_region(xb, first, l2=norm == "l2"), yb, tight=False)
        final = ((point.lower - region.error) / k).min(dim=1).values.clamp_min(0) * (1 - 4 * 2.0**-53)
        radii.append(torch.minimum(final, first))
    return torch.cat(radii)


def lipschitz_margin_result(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    estimate: LipschitzEstimate,
    eps: Sequence[float],
    batch_size: int = 256,
    extra: dict[str, float] | None = None,
) -> CertificateResult:
    """The margin certificate of a Lipschitz bound (LMT's two forms, :func:`margin_slopes`) with the
    float rounding covered by :func:`proven_radius`: radius 0 for misclassified points."""
    from certbench.bounds.lipschitz import margin_slopes

    with torch.no_grad(), eval_mode(model):
        logits = torch.cat([model(x[start : start + batch_size]) for start in range(0, len(x), batch_size)])
        slopes = margin_slopes(y, estimate, logits.shape[1])
        radius = proven_radius(model, x, y, slopes, "l2", batch_size).cpu().numpy()
    correct = (logits.argmax(1) == y).cpu().numpy()
    radius = np.where(correct, radius, 0.0)
    # keys shared by the Lipschitz certificates (the Lipschitz-vs-accuracy figure reads "lipschitz_bound")
    extra = {**(extra or {}), "lipschitz_bound": float(estimate.total)}
    if estimate.sub is not None:
        extra["lipschitz_bound_sub"] = float(estimate.sub)
    return CertificateResult(radius=radius, status=statuses_from_radius(radius, correct, eps), extra=extra)
