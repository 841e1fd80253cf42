"""Certificate registry and the result every certificate returns.

A certificate either gives a per-sample radius in its norm (certified at ε iff the
point is classified correctly and its radius exceeds ε) or only per-ε statuses
(bound-propagation verifiers). Every sample of every ε gets exactly one status;
verifier failures are ``error``, never folded into the other two.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from certbench.registry import Registry

CERTIFIED, NOT_CERTIFIED, ERROR = "certified", "not_certified", "error"
Norm = Literal["l2", "linf"]


@dataclass
class CertificateResult:
    """Per-sample outcome of one certificate on one batch or test set."""

    radius: np.ndarray | None
    status: dict[float, np.ndarray]
    errors: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)


class Certificate:
    """Base class: ``applies`` says whether the model can be certified at all."""

    name: ClassVar[str]
    norm: ClassVar[Norm]

    def __init__(self, **params: object) -> None:
        if params:
            raise TypeError(f"certificate '{self.name}' takes no parameters, got {sorted(params)}")

    def applies(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        raise NotImplementedError


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


CERTIFICATES: Registry[type[Certificate]] = Registry("certificate", discover=_import_all)
register_certificate = CERTIFICATES.register


def statuses_from_radius(radius: np.ndarray, correct: np.ndarray, eps: Sequence[float]) -> dict[float, np.ndarray]:
    """Certified at ε iff correctly classified with radius strictly above ε."""
    return {float(e): np.where(correct & (radius > e), CERTIFIED, NOT_CERTIFIED) for e in eps}


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per sample (negative when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ℓ∞ ball of radius ε around x, clipped to the input domain [0, 1]."""
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


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


#: Layers whose float output is exact (a selection or sign test of their input): no rounding to allow for.
EXACT_LAYERS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Unflatten,
                nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def logits_with_allowance(model: nn.Module, x: torch.Tensor,
                          factor: Callable[[nn.Module], float] = lambda module: 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, τ) with τ = 4·eps_mach·Σ factor(layer)·max|output| per sample (float64), over the layers
    that round: every leaf layer but :data:`EXACT_LAYERS`, and every residual sum.

    Certificates subtract τ from each logit difference: a heuristic allowance for the float error of
    the forward passes at x and at x + δ (the guarantees are statements about exact arithmetic).
    ``factor`` weights layers that sum many terms.
    """
    from certbench.nn import Residual

    total = torch.zeros(len(x), dtype=torch.float64, device=x.device)

    def add(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        flat = output.detach().flatten(1)
        total.add_(factor(module) * torch.maximum(flat.amax(1), -flat.amin(1)).double())

    rounding = [m for m in model.modules() if isinstance(m, Residual) or
                (not list(m.children()) and not isinstance(m, EXACT_LAYERS))]
    hooks = [m.register_forward_hook(add) for m in rounding]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, 4 * torch.finfo(logits.dtype).eps * total
