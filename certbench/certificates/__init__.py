"""Certificate registry and the result every certificate returns.

A certificate either gives a per-sample radius in its norm (certified at ε iff the
point is classified correctly and its radius exceeds ε) or only per-ε statuses
(bound-propagation verifiers). Every sample of every ε gets exactly one status;
verifier failures are ``error``, never folded into the other two.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
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
