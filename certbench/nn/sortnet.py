"""SortNet neurons (Zhang, Jiang, He, Wang, NeurIPS 2022, "Rethinking Lipschitz neural networks and
certified robustness: a Boolean function perspective", arXiv:2210.01787).

A SortNet unit sorts the absolute differences between its input and its weight vector and takes a
non-negative weighted sum of them:

    y_j(x) = Σ_{k=1..T} c_k · |x − w_j|_(k)  (+ b_j),

where ``|x − w_j|_(k)`` is the k-th largest of ``|x_i − w_ji|`` over the inputs i, and the
coefficients ``c_k ≥ 0`` are a buffer of the layer. The paper's practical choice, used here, is a
truncated geometric sequence with ratio ρ:

    c_k = (1 − ρ)·ρ^(k−1) / (1 − ρ^T),  k = 1..T  (Σ c_k = 1),

with T = min(terms, in_features) terms (the authors' code truncates at 10). With ``c = e_1`` (ρ = 0
or T = 1) the unit is the ℓ∞-dist neuron ``max_i |x_i − w_ji|`` of Zhang et al. (ICML 2021),
:class:`certbench.nn.linf_dist.LinfDist`.

**Lipschitz constant.** Each unit is ``‖c‖₁``-Lipschitz in ℓ∞ (the paper states it for ‖c‖₁ ≤ 1):
(i) ``x ↦ a(x) = (|x_i − w_ji|)_i`` is 1-Lipschitz coordinate-wise, so ``‖a(x) − a(x')‖∞ ≤
‖x − x'‖∞``; (ii) sorting is 1-Lipschitz in ℓ∞: if ``‖a − a'‖∞ ≤ δ`` then at least k entries of
``a'`` are ≥ ``a_(k) − δ`` (the k entries behind ``a_(k)``), so ``a'_(k) ≥ a_(k) − δ``, and
symmetrically; (iii) hence ``|y_j(x) − y_j(x')| ≤ Σ_k c_k·|a_(k) − a'_(k)| ≤ ‖c‖₁·‖x − x'‖∞``.
With ``‖c‖₁ ≤ 1`` a chain of such layers (and of mean shifts, which are translations) is
1-Lipschitz in ℓ∞, so the margin certificate of ℓ∞-dist nets (radius margin / 2, in normalised
units) holds unchanged; :meth:`SortDist.lipschitz_linf` gives ``‖c‖₁`` of the stored coefficients,
rounded up.

**Box bounds.** ``y_j`` is non-decreasing in every ``a_i`` (sorting is monotone entrywise and
``c ≥ 0``) and the box is a product, so its extremes over ``l ≤ x ≤ u`` are attained coordinate-wise,
exactly as for an ℓp distance: ``a_i^hi = max(|l_i − w_ji|, |u_i − w_ji|)`` above and
``a_i^lo = max(l_i − w_ji, w_ji − u_i, 0)`` below (:func:`sorted_distance_bounds`).

**Training.** Sorting is costly on accelerators, so the paper trains an unbiased stochastic
estimate instead: keep each input coordinate independently with probability ``q = 1 − ρ`` and take
the ℓ∞ distance over the kept ones. The k-th largest entry is the largest kept one with probability
``q·(1 − q)^(k−1)``, so ``E[max over the kept entries] = Σ_k (1 − ρ)ρ^(k−1)·a_(k)``: the geometric
SortNet unit (untruncated; the truncation at T = 10 drops ρ^10 of the weight, 6·10⁻⁶ at ρ = 0.3).
In training mode with ``sampling`` on, the layer draws one Bernoulli mask per group of
``sample_group`` samples (the authors share a mask across sub-batches of 32) and evaluates the
ℓp distance over the kept coordinates with the ℓ∞-dist kernels (:func:`lp_distance`), so the ℓp
relaxation schedule of ℓ∞-dist nets (p = 8 → ∞) applies to it unchanged. In evaluation mode, and
in training with ``sampling`` off, the layer computes the exact sorted sum above; ``p`` is then not
used, so the function every certificate sees never depends on ``p``.

The exact form never keeps a ``B × out × in`` tensor for the backward pass: the forward pass works
on slices of the output units and saves only the indices of the T largest differences; the
backward pass is a sparse scatter of ``c_k·sign(x_i − w_ji)`` at those indices (the sub-gradient
that the ℓ∞-dist layer's p = ∞ backward pass is the T = 1 case of). Plain PyTorch, any device
and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from certbench.nn.linf_dist import _check_p, _chunks, identity_init_, lp_distance

__all__ = [
    "SortDist",
    "geometric_coefficients",
    "sampled_distance",
    "set_sort_p",
    "sorted_distance",
    "sorted_distance_bounds",
]

#: Elements of a ``B × rows × in`` temporary per slice of output units (at least).
_MIN_SLICE_ELEMENTS = 1 << 22
#: The authors' truncation of the geometric sequence.
DEFAULT_TERMS = 10


def geometric_coefficients(
    rho: float, terms: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """``c_k = (1 − ρ)ρ^(k−1) / (1 − ρ^T)`` for k = 1..T, computed in float64 and rounded toward 0
    into ``dtype``, so that the stored coefficients sum to at most 1 (ρ = 0 or T = 1: exactly e_1)."""
    if not 0.0 <= rho < 1.0:  # also rejects NaN
        raise ValueError(f"rho must lie in [0, 1), got {rho}")
    if terms < 1:
        raise ValueError(f"need at least one term, got {terms}")
    k = torch.arange(terms, dtype=torch.float64)
    exact = (1.0 - rho) * torch.tensor(rho, dtype=torch.float64) ** k / (1.0 - rho**terms)
    rounded = exact.to(dtype)
    too_big = rounded.double() > exact
    rounded[too_big] = torch.nextafter(rounded[too_big], torch.zeros_like(rounded[too_big]))
    return rounded.to(device)


def _check(x: Tensor, weight: Tensor, coefficients: Tensor) -> int:
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"input ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) differ")
    terms = coefficients.numel()
    if coefficients.dim() != 1 or not 1 <= terms <= weight.shape[1]:
        raise ValueError(
            f"need 1 to {weight.shape[1]} coefficients in a vector, got shape {coefficients.shape}"
        )
    return terms


def _sorted_forward(x: Tensor, w: Tensor, c: Tensor, with_index: bool) -> tuple[Tensor, Tensor | None]:
    """``y[b, j] = Σ_k c_k · sort↓(|x_b − w_j|)_k`` (top T) slice by slice of the output units, and
    the indices of the T largest differences (int32 where they fit) when asked for."""
    terms = c.numel()
    y = x.new_empty(x.shape[0], w.shape[0])
    index_dtype = torch.int32 if x.shape[1] < 2**31 else torch.int64
    idx = torch.empty(*y.shape, terms, dtype=index_dtype, device=x.device) if with_index else None
    for sl in _chunks(x.shape[0], w.shape[0], x.shape[1], _MIN_SLICE_ELEMENTS):
        values, top = (x[:, None, :] - w[None, sl]).abs_().topk(terms, dim=-1)
        y[:, sl] = values @ c
        if idx is not None:
            idx[:, sl] = top.to(index_dtype)
    return y, idx


class _SortedDistance(torch.autograd.Function):
    """:func:`_sorted_forward` with a sparse backward pass (only the indices are saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, c: Tensor) -> Tensor:  # type: ignore[override]
        y, idx = _sorted_forward(x, w, c, with_index=True)
        ctx.save_for_backward(x, w, c, idx)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, c, idx = ctx.saved_tensors
        b, n_out, terms = idx.shape
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        rows = max(1, min(n_out, max(b * n_out, _MIN_SLICE_ELEMENTS) // max(1, b * terms)))
        for start in range(0, n_out, rows):
            sl = slice(start, min(start + rows, n_out))
            top = idx[:, sl].long()  # (B, r, T)
            r = top.shape[1]
            xi = x.gather(1, top.reshape(b, r * terms)).view(b, r, terms)
            w_top = top.permute(1, 0, 2).reshape(r, b * terms)
            wi = w[sl].gather(1, w_top).view(r, b, terms).permute(1, 0, 2)
            v = (xi - wi).sign_().mul_(c).mul_(g[:, sl, None].to(x.dtype))  # ∂y/∂x_i at the top T
            if gx is not None:
                gx.scatter_add_(1, top.reshape(b, r * terms), v.reshape(b, r * terms))
            if gw is not None:
                gw[sl] = torch.zeros_like(w[sl]).scatter_add_(
                    1, w_top, v.permute(1, 0, 2).reshape(r, b * terms).neg_()
                )
        return gx, gw, None


def sorted_distance(x: Tensor, weight: Tensor, coefficients: Tensor) -> Tensor:
    """``Σ_k c_k · |x_b − w_j|_(k)`` for ``x`` (B, in), ``weight`` (out, in), ``coefficients`` (T,)
    → (B, out); differentiable in ``x`` and ``weight`` (not in the coefficients)."""
    _check(x, weight, coefficients)
    c = coefficients.detach().to(x.dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _SortedDistance.apply(x, weight, c)
    return _sorted_forward(x, weight, c, with_index=False)[0]


@torch.no_grad()
def sorted_distance_bounds(
    lower: Tensor, upper: Tensor, weight: Tensor, coefficients: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact bounds of ``Σ_k c_k·|x − w_j|_(k)`` over the box ``lower ≤ x ≤ upper`` (``c ≥ 0``), and
    the largest ``|x_i − w_ji|`` on the box (the ℓ∞ distance's upper bound), each (B, out).

    Monotone in every ``|x_i − w_ji|``, so attained coordinate-wise (see the module docstring):
    ``max(|l_i − w_ji|, |u_i − w_ji|)`` above and ``max(l_i − w_ji, w_ji − u_i, 0)`` below.
    """
    terms = _check(lower, weight, coefficients)
    c = coefficients.to(lower.dtype)
    lo = lower.new_empty(lower.shape[0], weight.shape[0])
    hi, largest = torch.empty_like(lo), torch.empty_like(lo)
    for sl in _chunks(lower.shape[0], weight.shape[0], lower.shape[1], _MIN_SLICE_ELEMENTS):
        below = lower[:, None, :] - weight[None, sl]
        above = upper[:, None, :] - weight[None, sl]
        top = torch.maximum(below.abs(), above.abs()).topk(terms, dim=-1).values
        hi[:, sl], largest[:, sl] = top @ c, top[..., 0]
        lo[:, sl] = torch.maximum(below, above.neg_()).clamp_min_(0.0).topk(terms, dim=-1).values @ c
    return lo, hi, largest


def sampled_distance(x: Tensor, weight: Tensor, p: float, keep: float, group: int) -> Tensor:
    """The paper's stochastic SortNet unit: per group of ``group`` consecutive samples, one mask
    keeping each input coordinate with probability ``keep`` (torch's global generator, on the
    input's device), then ``‖(x − w_j)_kept‖_p`` (0 where nothing is kept)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    if keep == 1.0:
        return lp_distance(x, weight, p)
    parts = []
    for start in range(0, x.shape[0], group):
        chunk = x[start : start + group]
        kept = (torch.rand(x.shape[1], device=x.device) < keep).nonzero().squeeze(1)
        if kept.numel() == 0:
            parts.append(chunk.new_zeros(chunk.shape[0], weight.shape[0]))
        else:
            parts.append(lp_distance(chunk[:, kept], weight[:, kept], p))
    return torch.cat(parts)


def _sum_up(values: Iterable[float]) -> float:
    """The exact sum of finite floats, rounded up to a float."""
    total = sum((Fraction(v) for v in values), Fraction(0))
    rounded = float(total)
    return rounded if Fraction(rounded) >= total else math.nextafter(rounded, math.inf)


class SortDist(nn.Module):
    """SortNet layer: ``y_j = Σ_k c_k·|x − w_j|_(k) + b_j`` on inputs (B, in) (module docstring).

    ``rho`` and ``terms`` give the geometric coefficients, stored as the buffer ``coefficients``
    (in the model's dtype); ``p`` is the ℓp relaxation of the sampled training form and may be
    changed at any time (schedules). ``p`` and ``rho`` are saved with the state dict (extra state).
    ``sampling`` (off by default, set by the training method) and ``sample_group`` select the
    sampled form in training mode; neither is saved.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        rho: float = 0.3,
        terms: int = DEFAULT_TERMS,
        p: float = math.inf,
        identity_value: float | None = 10.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.identity_value = identity_value
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.rho = float(rho)
        self.register_buffer("coefficients", geometric_coefficients(self.rho, min(terms, in_features)))
        self.p = p
        self.sampling = False
        self.sample_group = 32
        self.reset_parameters()

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_p(value)

    @property
    def terms(self) -> int:
        return self.coefficients.numel()

    def reset_parameters(self) -> None:
        identity_init_(self.weight, self.identity_value)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sampling:
            y = sampled_distance(x, self.weight, self.p, 1.0 - self.rho, self.sample_group)
        else:
            y = sorted_distance(x, self.weight, self.coefficients)
        return y if self.bias is None else y + self.bias

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Exact bounds of the (exact-form) output over the box ``[lower, upper]``."""
        lo, hi, _ = sorted_distance_bounds(lower, upper, self.weight, self.coefficients)
        return (lo, hi) if self.bias is None else (lo + self.bias, hi + self.bias)

    def coefficient_problem(self) -> str | None:
        """Why the stored coefficients have no Lipschitz and rounding rule (non-finite, negative,
        not a vector of 1 to ``in_features`` entries), or None."""
        c = self.coefficients
        if c.dim() != 1 or not 1 <= c.numel() <= self.in_features:
            return f"coefficients of shape {tuple(c.shape)} (need a vector of 1 to {self.in_features})"
        if not bool(torch.isfinite(c).all()) or not bool((c >= 0).all()):
            return f"coefficients must be finite and non-negative, got {c.flatten().tolist()}"
        return None

    def lipschitz_linf(self) -> float:
        """ℓ∞→ℓ∞ Lipschitz constant of the exact form: ``‖c‖₁`` of the stored coefficients, rounded
        up (1 for the geometric coefficients up to their rounding toward 0; exactly 1 for e_1)."""
        problem = self.coefficient_problem()
        if problem is not None:
            raise ValueError(f"SortDist: {problem}")
        return _sum_up(self.coefficients.double().tolist())

    def get_extra_state(self) -> dict[str, float]:
        return {"p": self.p, "rho": self.rho}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.p, self.rho = state["p"], float(state["rho"])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rho={self.rho:g}, terms={self.terms}, p={self.p:g}"
        )


def set_sort_p(model: nn.Module, p: float) -> None:
    """Set ``p`` on every :class:`SortDist` layer of ``model``."""
    for m in model.modules():
        if isinstance(m, SortDist):
            m.p = p
