"""ℓ∞ certificates by bound propagation through auto_LiRPA: IBP, CROWN and CROWN-IBP.

A sample is certified at ε iff it is classified correctly and the lower bound of every
margin z_y − z_j (j ≠ y) over the clipped box [x − ε, x + ε] ∩ [0, 1] is positive
(Gowal et al. 2018, eq. 6; Zhang et al. 2020, eq. 3). A batch on which auto_LiRPA fails
is retried sample by sample; a sample that still fails gets status ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from certbench.certificates import CERTIFIED, ERROR, NOT_CERTIFIED, Certificate, CertificateResult, register_certificate
from certbench.lirpa import BoundMethod, Bounder, supports

#: Peak memory one CROWN batch may use; full CROWN keeps, per sample, A matrices of about
#: (neurons of a layer) × (neurons of all earlier layers) entries (in patches mode fewer).
CROWN_MEMORY_BYTES = 2 * 1024**3


def crown_batch_size(model: nn.Module, x: torch.Tensor, limit: int = 64) -> int:
    """Samples per CROWN call so that max_l n_l · Σ_{k≤l} n_k floats fit ``CROWN_MEMORY_BYTES``."""
    sizes: list[int] = [x[0].numel()]
    hooks = [m.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0][0].numel()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    per_sample = 4 * max(n * sum(sizes[: i + 1]) for i, n in enumerate(sizes))
    return max(1, min(limit, CROWN_MEMORY_BYTES // per_sample))


class LiRPACertificate(Certificate):
    """Per-ε statuses from auto_LiRPA margin bounds; ``radius`` is None (ε-based)."""

    norm = "linf"
    method: ClassVar[BoundMethod]
    default_batch_size: ClassVar[int | None]

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"certificate '{self.name}': batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size

    def applies(self, model: nn.Module) -> bool:
        return supports(model)

    def certify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Sequence[float]) -> CertificateResult:
        started = time.perf_counter()
        training = model.training
        model.eval()
        try:
            status, errors = self._statuses(model, x, y, eps)
        finally:
            model.train(training)
        return CertificateResult(radius=None, status=status, errors=errors,
                                 extra={"seconds": time.perf_counter() - started})

    def _statuses(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  eps: Sequence[float]) -> tuple[dict[float, np.ndarray], list[str]]:
        batch = self.batch_size or self.default_batch_size or crown_batch_size(model, x)
        with torch.no_grad():
            correct = torch.cat([model(x[i:i + batch]).argmax(1) == y[i:i + batch]
                                 for i in range(0, len(x), batch)]).cpu().numpy()
        candidates = np.flatnonzero(correct)  # misclassified samples stay not_certified
        bounder, errors = Bounder(), []
        status: dict[float, np.ndarray] = {}
        for e in eps:
            status[float(e)] = np.full(len(x), NOT_CERTIFIED, dtype=f"<U{len(NOT_CERTIFIED)}")
            for start in range(0, len(candidates), batch):
                index = candidates[start:start + batch]
                try:
                    status[float(e)][index] = self._certified(bounder, model, x, y, index, e)
                except Exception:
                    for i in index:  # retry one by one; a fresh BoundedModule is built after a failure
                        try:
                            status[float(e)][i] = self._certified(bounder, model, x, y, np.array([i]), e)[0]
                        except Exception as error:
                            status[float(e)][i] = ERROR
                            errors.append(f"sample {i}, eps {e}: {type(error).__name__}: {error}")
        return status, errors

    def _certified(self, bounder: Bounder, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   index: np.ndarray, eps: float) -> np.ndarray:
        picked = torch.as_tensor(index, device=x.device)
        with torch.no_grad():
            lower = bounder.margin_lower_bounds(model, x[picked], y[picked], eps, [self.method])[self.method]
        if not torch.isfinite(lower).all():
            raise FloatingPointError("non-finite margin bound")
        return np.where((lower > 0).all(dim=1).cpu().numpy(), CERTIFIED, NOT_CERTIFIED)


@register_certificate("ibp")
class IBPCertificate(LiRPACertificate):
    """Interval bound propagation (Gowal et al. 2018): about 3× a forward pass."""

    method = "IBP"
    default_batch_size = 512


@register_certificate("crown-ibp")
class CROWNIBPCertificate(LiRPACertificate):
    """IBP for the hidden layers, CROWN's linear relaxation back from the margins (Zhang et al. 2020)."""

    method = "CROWN-IBP"
    default_batch_size = 256


@register_certificate("crown")
class CROWNCertificate(LiRPACertificate):
    """Full CROWN (Zhang et al. 2018): every hidden layer bounded backwards; costly, so
    batches are sized by :func:`crown_batch_size` unless ``batch_size`` is given."""

    method = "CROWN"
    default_batch_size = None
