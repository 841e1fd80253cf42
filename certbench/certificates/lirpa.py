"""ℓ∞ certificates by bound propagation through auto_LiRPA: IBP, CROWN, CROWN-IBP and α-CROWN.

A sample is certified at ε iff it is classified correctly and the lower bound of every
margin z_y − z_j (j ≠ y) over the clipped box [x − ε, x + ε] ∩ [0, 1] is positive
(Gowal et al. 2018, eq. 6; Zhang et al. 2020, eq. 3). A batch on which auto_LiRPA fails
is retried sample by sample; a sample that still fails gets status ``error``. A batch that runs
past α-CROWN's time limit is not retried: its samples get status ``error``.

Rounding. auto_LiRPA rounds to nearest with no outward rounding, so its bounds are computed on a
float64 copy of the model and lowered by ``LIRPA_SLACK·(depth + 2)`` times the float64 forward error
bound of the margin on the box. That bound is read off the model's own error bound
(:func:`certbench.bounds.rounding.margin_bounds`) scaled by u₆₄/u: every term of the error
recursion is non-decreasing in the unit roundoff u and γ_k(u₆₄)/γ_k(u) ≤ u₆₄/u, so by induction over
the layers the error bound at u₆₄ is at most u₆₄/u times the one at u (one walk serves both). That
first-order bound is of the same form as the rounding of each back-substitution product
Λ_{k+1}·D_k·W_k, whose entries are bounded by those of |W_L|⋯|W_k| (relaxation slopes in [0, 1],
α-CROWN's optimised ones included,
intercepts bounded by the layer's interval magnitudes; Higham Thm. 3.5 per product), one product
per layer; the factor 1024 covers the constants this argument leaves open, at a cost of about
2⁻¹⁹ of the float32 term. A sample is certified at ε iff each such lower bound also exceeds the
float32 error bound of its margin on the box, so the float32 pass of the model agrees as well.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from certbench.bounds.fingerprint import fingerprint
from certbench.bounds.lirpa import (
    AlphaCROWN,
    Bounder,
    BoundMethod,
    BoundTimeLimitExceeded,
    input_box,
    unsupported_reason,
)
from certbench.bounds.rounding import U64, input_region, layers, margin_bounds, model_roundoff
from certbench.certificates import (
    CERTIFIED,
    ERROR,
    NOT_CERTIFIED,
    Certificate,
    CertificateResult,
    register_certificate,
)
from certbench.progress import Progress

log = logging.getLogger(__name__)

#: Safety factor on the first-order float64 error bound of auto_LiRPA's margin bounds (module docstring).
LIRPA_SLACK = 1024.0
#: Peak memory one CROWN batch may use; full CROWN keeps, per sample, A matrices of about
#: (neurons of a layer) × (neurons of all earlier layers) entries (in patches mode fewer).
CROWN_MEMORY_BYTES = 2 * 1024**3


def crown_batch_size(model: nn.Module, x: torch.Tensor, limit: int = 64, copies: int = 1) -> int:
    """Samples per CROWN call so that ``copies`` × max_l n_l · Σ_{k≤l} n_k floats fit
    ``CROWN_MEMORY_BYTES``."""
    sizes: list[int] = [x[0].numel()]
    hooks = [
        m.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0][0].numel()))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for hook in hooks:
            hook.remove()
    per_sample = 4 * copies * max(n * sum(sizes[: i + 1]) for i, n in enumerate(sizes))
    return max(1, min(limit, CROWN_MEMORY_BYTES // per_sample))


def needed_margins(
    model: nn.Module, depth: int, x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """What each float64 margin bound (B, K−1) must exceed over the box of radius ``eps``: its
    rounding slack plus the float32 error bound of the margin (module docstring); ``depth`` is the
    number of layers of ``model``."""
    error = margin_bounds(model, input_region(x, eps), y).error
    slack = LIRPA_SLACK * (depth + 2) * (U64 / model_roundoff(model)) * error
    others = torch.ones_like(error, dtype=torch.bool).scatter_(1, y[:, None], False)
    return (slack + error)[others].view(len(y), -1).double()


def proven(lower: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """Per sample (B,): whether every float64 margin bound exceeds its entry of ``needed``."""
    if not torch.isfinite(lower).all():
        raise FloatingPointError("non-finite margin bound")
    return (lower - needed > 0).all(dim=1)


class LiRPACertificate(Certificate):
    """Per-ε statuses from auto_LiRPA margin bounds; ``radius`` is None (ε-based)."""

    norm = "linf"
    method: ClassVar[BoundMethod]
    default_batch_size: ClassVar[int | None]
    #: Memory of one sample's bound relative to CROWN's A matrices, when batches are sized by memory.
    memory_copies: ClassVar[int] = 1

    #: ``batch_size`` null: the method's default, or as many samples as fit in memory (CROWN).
    params_schema = {"batch_size": {"type": ["integer", "null"], "minimum": 1, "default": None}}
    batch_size: int | None

    def _refusal(self, model: nn.Module) -> str | None:
        return unsupported_reason(model)

    def _lower_bounds(
        self,
        bounder: Bounder,
        model64: nn.Module,
        x64: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        needed: torch.Tensor,
    ) -> torch.Tensor:
        """Float64 lower bounds (B, K−1) on the margins z_y − z_j over the box; a sample is
        certified iff each exceeds its entry of ``needed`` (slack plus float32 error bound)."""
        return bounder.margin_lower_bounds(model64, x64, y, eps, [self.method])[self.method]

    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        started = time.perf_counter()
        training = model.training
        model.eval()
        try:
            status, errors = self._statuses(model, x, y, eps)
        finally:
            model.train(training)
        return CertificateResult(
            radius=None, status=status, errors=errors, extra={"seconds": time.perf_counter() - started}
        )

    def _statuses(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> tuple[dict[float, np.ndarray], list[str]]:
        batch = self._batch(model, x)
        with torch.no_grad():
            correct = (
                torch.cat(
                    [model(x[i : i + batch]).argmax(1) == y[i : i + batch] for i in range(0, len(x), batch)]
                )
                .cpu()
                .numpy()
            )
        candidates = np.flatnonzero(correct)  # misclassified samples stay not_certified
        bounder, errors = Bounder(), []
        model64 = copy.deepcopy(model).double().eval().requires_grad_(False)
        depth = sum(1 for _ in layers(model))
        status: dict[float, np.ndarray] = {}
        batches = -(-len(candidates) // batch)
        # a log line at most every 30 s (and one at the end) in a log file; a bar on a terminal
        with Progress(
            total=len(eps) * batches, desc=self.name, unit="batch", log=log, every_seconds=30.0
        ) as progress:
            for e in eps:
                status[float(e)] = np.full(len(x), NOT_CERTIFIED, dtype=f"<U{len(NOT_CERTIFIED)}")
                for start in range(0, len(candidates), batch):
                    index = candidates[start : start + batch]
                    try:
                        status[float(e)][index] = self._certified(
                            bounder, model, model64, depth, x, y, index, e
                        )
                    except BoundTimeLimitExceeded as error:  # not retried: each sample would run as long
                        status[float(e)][index] = ERROR
                        errors.extend(f"sample {i}, eps {e}: {type(error).__name__}: {error}" for i in index)
                    except Exception:
                        for i in index:  # retry one by one; a fresh BoundedModule is built after a failure
                            try:
                                one = np.array([i])
                                status[float(e)][i] = self._certified(
                                    bounder, model, model64, depth, x, y, one, e
                                )[0]
                            except Exception as error:
                                status[float(e)][i] = ERROR
                                errors.append(f"sample {i}, eps {e}: {type(error).__name__}: {error}")
                    progress.update(eps=float(e))
        return status, errors

    def _batch(self, model: nn.Module, x: torch.Tensor) -> int:
        """Samples per bound call: ``batch_size``, else the method's default, else as many as fit
        in memory (:func:`crown_batch_size`)."""
        return (
            self.batch_size
            or self.default_batch_size
            or crown_batch_size(model, x, copies=self.memory_copies)
        )

    def _certified(
        self,
        bounder: Bounder,
        model: nn.Module,
        model64: nn.Module,
        depth: int,
        x: torch.Tensor,
        y: torch.Tensor,
        index: np.ndarray,
        eps: float,
    ) -> np.ndarray:
        """Certified iff every float64 margin bound, lowered by its slack and by the float32 error
        bound on the box, is positive (module docstring)."""
        picked = torch.as_tensor(index, device=x.device)
        xb, yb = x[picked], y[picked]
        with torch.no_grad():
            needed = needed_margins(model, depth, xb, yb, eps)
            lower = self._lower_bounds(bounder, model64, xb.double(), yb, eps, needed)
        return np.where(proven(lower, needed).cpu().numpy(), CERTIFIED, NOT_CERTIFIED)


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


class CrownMemo:
    """CROWN's float64 margin lower bounds of the samples of one model, so that α-CROWN, which starts
    from them, does not compute them again after ``crown`` ran in the same process (a certify job
    runs both on the same points).

    A bound is served only for the same model content (:func:`~certbench.bounds.fingerprint.fingerprint`
    of the float32 model), ε, label and input bytes; a sample's CROWN bounds do not depend on the
    rest of its batch (shim 11 of :mod:`certbench.bounds.lirpa_compat`), so a bound computed in any
    batch is the one this batch would compute. Only the latest model's bounds are kept.
    """

    def __init__(self) -> None:
        self.model: str | None = None
        self.rows: dict[tuple[float, int, bytes], torch.Tensor] = {}

    def clear(self) -> None:
        self.model, self.rows = None, {}

    @staticmethod
    def _keys(x64: torch.Tensor, y: torch.Tensor, eps: float) -> list[tuple[float, int, bytes]]:
        rows = x64.detach().cpu().flatten(1).numpy()
        return [
            (float(eps), int(label), hashlib.blake2b(row.tobytes(), digest_size=16).digest())
            for row, label in zip(rows, y.tolist(), strict=True)
        ]

    def store(self, model: str, x64: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor) -> None:
        if model != self.model:
            self.clear()
            self.model = model
        self.rows.update(zip(self._keys(x64, y, eps), lower.detach().clone(), strict=True))

    def lookup(self, model: str, x64: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor | None:
        """The stored bounds (B, K−1) of every sample, or None unless all are stored."""
        if model != self.model:
            return None
        found = [self.rows.get(key) for key in self._keys(x64, y, eps)]
        return None if any(row is None for row in found) else torch.stack(found).to(x64.device)  # type: ignore[misc]


CROWN_MEMO = CrownMemo()


@register_certificate("crown")
class CROWNCertificate(LiRPACertificate):
    """Full CROWN (Zhang et al. 2018): every hidden layer bounded backwards; costly, so
    batches are sized by :func:`crown_batch_size` unless ``batch_size`` is given. Its bounds are kept
    in :data:`CROWN_MEMO` for α-CROWN."""

    method = "CROWN"
    default_batch_size = None
    #: The fingerprint of the model being certified, set for the duration of :meth:`_statuses`.
    _model: str | None = None

    def _statuses(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> tuple[dict[float, np.ndarray], list[str]]:
        with self.memo_for(model):
            return super()._statuses(model, x, y, eps)

    @contextmanager
    def memo_for(self, model: nn.Module) -> Iterator[None]:
        """Within the block, CROWN's bounds are read from and kept in :data:`CROWN_MEMO` under
        ``model``'s fingerprint."""
        self._model = fingerprint(model)
        try:
            yield
        finally:
            self._model = None

    def _crown_bounds(
        self, bounder: Bounder, model64: nn.Module, x64: torch.Tensor, y: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """CROWN's margin lower bounds, from :data:`CROWN_MEMO` where it has them all."""
        if self._model is not None:
            known = CROWN_MEMO.lookup(self._model, x64, y, eps)
            if known is not None:
                return known
        lower = bounder.margin_lower_bounds(model64, x64, y, eps, ["CROWN"])["CROWN"]
        if self._model is not None:
            CROWN_MEMO.store(self._model, x64, y, eps, lower)
        return lower

    def _lower_bounds(
        self,
        bounder: Bounder,
        model64: nn.Module,
        x64: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        needed: torch.Tensor,
    ) -> torch.Tensor:
        return self._crown_bounds(bounder, model64, x64, y, eps)


@register_certificate("alpha-crown")
class AlphaCROWNCertificate(CROWNCertificate):
    """α-CROWN (Xu et al., ICLR 2021): CROWN with the lower ReLU slopes optimised per margin by
    ``iterations`` Adam steps of rate ``lr`` (auto_LiRPA's ``CROWN-Optimized``), never looser than
    CROWN. CROWN runs first (its bounds taken from :data:`CROWN_MEMO` when ``crown`` already ran on
    the same model and points); the optimisation runs only on the samples whose CROWN bounds do not
    already certify them and that ``falsify_steps`` steps of PGD on the float64 model do not refute
    (:func:`refuted`), and stops for a sample once all its bounds do. Both are valid bounds, so the
    larger one is kept per margin. A batch whose optimisation takes longer than
    ``time_limit`` seconds gets status ``error``. It keeps α and the autograd graph of every
    layer's bound, so memory-sized batches assume 4× CROWN's memory per sample (an allowance, not
    a measured figure). It costs several times CROWN (``benchmarks/alpha_crown.py``), so
    ``certificates: [all]`` leaves it out: name it to run it."""

    method = "alpha-CROWN"
    in_all = False
    memory_copies = 4
    params_schema = {
        **LiRPACertificate.params_schema,
        "iterations": {"type": "integer", "minimum": 1, "default": 20},
        "lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.5},
        "time_limit": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": 600.0},
        "falsify_steps": {
            "type": "integer",
            "minimum": 0,
            "default": 10,
            "description": "PGD steps looking for a point refuting a sample before it is optimised (0: off)",
        },
    }
    iterations: int
    lr: float
    time_limit: float | None
    falsify_steps: int

    def _lower_bounds(
        self,
        bounder: Bounder,
        model64: nn.Module,
        x64: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        needed: torch.Tensor,
    ) -> torch.Tensor:
        return self.optimised_bounds(bounder, model64, x64, y, eps, needed, self.time_limit)

    def optimised_bounds(
        self,
        bounder: Bounder,
        model64: nn.Module,
        x64: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        needed: torch.Tensor,
        time_limit: float | None,
    ) -> torch.Tensor:
        """α-CROWN's bounds, starting from CROWN's: the optimisation runs on the samples CROWN leaves
        unproven, within ``time_limit`` seconds, and the larger bound is kept."""
        lower = self._crown_bounds(bounder, model64, x64, y, eps).clone()
        open_ = ~(lower > needed).all(dim=1)
        if open_.any() and self.falsify_steps:
            open_[open_.clone()] = ~refuted(
                model64, x64[open_], y[open_], eps, needed[open_], self.falsify_steps
            )
        if open_.any():
            settings = AlphaCROWN(iterations=self.iterations, lr=self.lr, time_limit=time_limit)
            optimised = bounder.margin_lower_bounds(
                model64, x64[open_], y[open_], eps, ["alpha-CROWN"], alpha=settings, targets=needed[open_]
            )["alpha-CROWN"]
            lower[open_] = torch.maximum(lower[open_], optimised)
        return lower


def refuted(
    model64: nn.Module, x64: torch.Tensor, y: torch.Tensor, eps: float, needed: torch.Tensor, steps: int
) -> torch.Tensor:
    """Per sample: a point of the box [x − ε, x + ε] ∩ [0, 1] was found where some margin
    z_y − z_j is at most its entry of ``needed`` (B, K−1), by ``steps`` steps of sign-gradient descent
    (PGD, Madry et al. 2018) on min_j (z_y − z_j − needed_j) from the box's centre.

    Any lower bound of a margin over the box is at most the margin at every point of it, so no bound
    (α-CROWN's included) can exceed ``needed`` for a refuted sample, up to float64 rounding of the
    margin at the point found: skipping the optimisation there gives up nothing it could prove.
    This only ever removes work; it certifies nothing.
    """
    lower, upper = input_box(x64, eps)
    others = torch.ones(len(y), needed.shape[1] + 1, dtype=torch.bool, device=y.device)
    others[torch.arange(len(y)), y] = False
    point, step = x64.clone(), 2.5 * eps / steps
    found = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    with torch.enable_grad():
        for _ in range(steps + 1):
            point.requires_grad_(True)
            logits = model64(point)
            margins = logits.gather(1, y[:, None]) - logits[others].view(len(y), -1)
            slack = (margins - needed).min(dim=1).values
            found |= slack.detach() <= 0
            (gradient,) = torch.autograd.grad(slack.sum(), point)
            point = torch.minimum(torch.maximum(point.detach() - step * gradient.sign(), lower), upper)
    return found
