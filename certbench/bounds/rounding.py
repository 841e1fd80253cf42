"""Proven enclosures of a network's exact outputs and of its floating-point forward error.

Every certificate promises that the prediction of the network given by the stored weights is
constant on a ball, in exact real arithmetic *and* for the float forward pass certbench runs. Both
halves rest on one walk over the layers of a region ``[lower, upper]`` of inputs (a point, or a box
that contains the certified ball), which carries per activation

* an **enclosure** ``[lo, hi]`` of the exact (real-arithmetic) activation over the region:
  interval arithmetic in float64 in the midpoint–radius form, each affine layer widened by
  ``γ₆₄(n+4)·(|W|(|c|+r) + |b|)``, which covers the float64 rounding of the midpoint, the radius and
  the bounds (Rump, "Fast and parallel interval arithmetic", BIT 39, 1999, Thm. 2.1; Higham,
  *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and eq. (3.4));
* a **forward error bound** ``e`` with ``|ã − a| ≤ e`` for the float activation ``ã`` of *any*
  float evaluation of the network at *any* point of the region. For an affine layer
  ``fl(W ã + b)`` errs from ``W ã + b`` by at most ``γ(n+1)·(|W||ã| + |b|)`` whatever the order of
  summation, with or without fused multiply–add (Higham Thm. 3.5 / eq. (3.13)), with
  ``γ(k) = k·u/(1 − k·u)`` and ``u`` the unit roundoff of the model's dtype; since
  ``|ã| ≤ max(|lo|, |hi|) + e`` on the region,

      e_out = |W|·e_in + γ(n+1)·(|W|·(max(|lo|,|hi|) + e_in) + |b|),

  with ``n`` the terms of each dot product (the fan-in; a convolution's ``C_in/groups·kh·kw``).
  Beside it goes a bound ``E`` of the error's ℓ2 norm, ``E_out = ‖W‖₂·E_in + ‖ρ̄‖₂`` with ``ρ̄`` the
  fresh term above and ``‖W‖₂`` a proven upper bound of the layer's operator norm (the float error
  is ``W δ + ρ``); each unit then takes ``min(|W|·e_in, ‖w_i‖₂·E_in) + ρ̄_i`` and a margin
  ``min(e_y + e_j, ‖w_y − w_j‖₂·E + ρ̄_y + ρ̄_j)`` (Cauchy–Schwarz): through layers of mixed signs
  ``|W|`` products grow by about √n per layer where operator norms do not. ``E`` passes through
  clamps and shape-only layers and restarts from ``‖e‖₂`` after any other layer.
  Max pooling, ReLU, clamps, flattening and negation are exact and 1-Lipschitz elementwise, so
  they pass the bound through (a clamp zeroes it on units saturated for every float input,
  :func:`_clamp`); averaging pools add ``γ(k+1)`` of the pooled magnitudes;
  Normalize, BatchNorm (inference form), the residual sum, MeanShift and ℓ∞-dist layers at
  ``p = ∞`` (a max of rounded differences) add the error of their few correctly rounded
  operations; SortNet layers (a weighted sum of T sorted rounded differences) add ``γ(T+2)`` of
  their magnitude (:func:`_sort_dist`, derived there); smooth activations (tanh, sigmoid,
  softplus, ELU) add 16 ulps of their output plus 16 ulps absolute, which covers the documented
  accuracy of the elementwise kernels (SLEEF's ``u10`` functions ≤ 1 ulp on the CPU, CUDA's
  ``expf``/``tanhf``/``log1pf`` ≤ 2 ulp) and the ≤ 3 basic operations around them.

The error model is that of ordinary float arithmetic: every product and sum rounded to nearest in
the model's dtype. It does not cover TF32, FFT or Winograd convolutions, which
:func:`certbench.precision.strict_float32` switches off wherever certbench evaluates a model for a
certificate, the audit or an attack's final check.

A margin ``z_y − z_j`` is then certified on the region iff its exact lower bound minus
``e_y + e_j`` is positive: the exact network keeps the label, and no float pass can move the margin
by more than ``e_y + e_j``. A module without a rule raises :class:`RoundingUnsupported` (with the
reason); nothing is ever given a rule it was not proven for. Only exact types are accepted.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certbench.bounds.fingerprint import fingerprint
from certbench.nn import Normalize, Residual
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate, lp_distance, use_kernel
from certbench.nn.sortnet import SortDist, sorted_distance, sorted_distance_bounds

U64 = 2.0**-53
#: Elementwise kernels of smooth activations: error ≤ SMOOTH_ULPS·u·(|f(x)| + 1) (see the module docstring).
SMOOTH_ULPS = 16
#: Boxes whose half-widths differ by at most this (absolute) take the one-distance enclosure of
#: ℓ∞-dist layers.
UNIFORM_SPREAD = 2.0**-40

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)  # the identity at evaluation
_PASS_THROUGH = (nn.Flatten, nn.Unflatten, nn.Identity, *_DROPOUTS)
#: Layers after the last Linear that change nothing, so the Linear can be folded into the margins.
_TRAILING_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_CLAMPS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_SMOOTH = {nn.Tanh: 1.0, nn.Sigmoid: 0.25, nn.Softplus: 1.0}


class RoundingUnsupported(TypeError):
    """No proven rounding rule for a module (or for its settings)."""


def gamma(k: int, u: float) -> float:
    """Higham's γ_k = k·u / (1 − k·u), the relative error of k chained rounded operations."""
    if k * u >= 0.5:
        raise RoundingUnsupported(f"{k} terms per dot product: γ_k is not small")
    return k * u / (1 - k * u)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^−p for round-to-nearest in a dtype of p significand bits (float32: 2⁻²⁴)."""
    if dtype not in (torch.float32, torch.float64):
        raise RoundingUnsupported(f"forward passes in {dtype} have no rounding rule here")
    return float(torch.finfo(dtype).eps) / 2


@dataclass
class Ball:
    """An ℓ2 description of the region: every exact activation a(x') of the region lies within ℓ2
    distance ``radius`` (per sample) of a(x), and a(x) within ``slack`` (elementwise) of ``centre``
    (float64). Kept through shape-only layers, Normalize, the clamps (ReLU, ReLU6, Hardtanh: exact,
    elementwise and 1-Lipschitz, so neither distance grows) and affine layers (the radius times a
    proven upper bound of the layer's operator norm, :func:`_operator_norm`); dropped at any other
    layer, where interval arithmetic alone goes on."""

    centre: Tensor
    slack: Tensor
    radius: Tensor

    def map(self, module: nn.Module) -> Ball:
        return Ball(module(self.centre), module(self.slack), self.radius)


@dataclass
class Region:
    """Float64 enclosure ``[lo, hi]`` of the exact activations and the float error bound ``err``;
    ``ball`` where the region is an ℓ2 ball (see :class:`Ball`)."""

    lo: Tensor
    hi: Tensor
    err: Tensor
    ball: Ball | None = None
    #: Per sample, a bound of ‖ã − a‖₂ over the whole activation where a layer rule gives one that
    #: may beat ‖err‖₂ (see :meth:`error_norm`); None elsewhere.
    err_norm: Tensor | None = None

    def magnitude(self) -> Tensor:
        """max(|lo|, |hi|): bounds |a| of the exact activation on the region."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def error_norm(self) -> Tensor:
        """Per sample, a bound of ‖ã − a‖₂ for any float pass at any point of the region: the ℓ2 norm
        of ``err`` (rounded up), or ``err_norm`` where that is smaller."""
        flat = self.err.flatten(1)
        norm = _up(flat.norm(dim=1), flat.shape[1])
        return norm if self.err_norm is None else torch.minimum(norm, self.err_norm)

    def map(self, module: nn.Module) -> Region:
        """Apply a shape-only or elementwise-exact monotone module to all three."""
        return Region(module(self.lo), module(self.hi), module(self.err))


def input_region(x: Tensor, radius: Tensor | float = 0.0, l2: bool = False) -> Region:
    """The box ``[x − r, x + r] ∩ [0, 1]`` in float64 (per-sample ``radius`` of shape (B,) allowed),
    widened by the float64 rounding of ``x ± r``; the input is exact (error 0). With ``l2`` the
    region is the ℓ2 ball of radius r in that box, which every affine layer the :class:`Ball` reaches
    bounds row by row (|w_j·δ| ≤ ‖w_j‖₂·‖δ‖₂, Cauchy–Schwarz) beside interval arithmetic."""
    x = x.detach().double()
    r = torch.as_tensor(radius, dtype=torch.float64, device=x.device)
    per_sample = r.expand(len(x)) if r.dim() == 0 else r
    r = r.view(-1, *([1] * (x.dim() - 1))) if r.dim() == 1 else r
    slack = 2 * U64 * (x.abs() + r)
    lo, hi = (x - r - slack).clamp(0.0, 1.0), (x + r + slack).clamp(0.0, 1.0)
    ball = Ball(x, torch.zeros_like(x), per_sample * (1 + 4 * U64)) if l2 else None
    return Region(torch.minimum(lo, x), torch.maximum(hi, x), torch.zeros_like(x), ball)


def _up(t: Tensor, terms: int) -> Tensor:
    """t ≥ 0 computed in float64 as a sum of ``terms`` non-negative products: scale up past its rounding."""
    return t * (1 + gamma(terms + 2, U64))


def _fresh(mag_float: Tensor, bias: Tensor, terms: int, u: float) -> Tensor:
    """ρ̄ = γ(n+1)·(|A||ã| + |b|), rounded up: how far an affine layer's own rounding can move each
    output (Higham eq. (3.13)), from ``mag_float`` ≥ |A||ã| and ``n`` = ``terms``."""
    return _up(gamma(terms + 1, u) * (mag_float + bias.abs()), 2)


def _affine(
    region: Region,
    apply: object,
    apply_abs: object,
    bias: Tensor | None,
    terms: int,
    u: float,
    row_norms: Tensor,
    operator_norm: float,
) -> Region:
    """An affine layer ``x ↦ A x + b`` with ``apply = A·``, ``apply_abs = |A|·`` (float64, no bias),
    ``row_norms`` the ℓ2 norm of each output's row of A (broadcastable) and ``operator_norm`` ≥ ‖A‖₂.

    The float error: the float output is ``A ã + b + ρ`` with ``|ρ| ≤ ρ̄ = γ(n+1)·(|A||ã| + |b|)``
    (Higham eq. (3.13)), so with δ = ã − a it errs by ``A δ + ρ``: per unit at most
    ``min(|A|·|δ|, ‖A_i‖₂·‖δ‖₂) + ρ̄_i`` (the second by Cauchy–Schwarz), and in ℓ2 norm at most
    ``‖A‖₂·‖δ‖₂ + ‖ρ̄‖₂``, which through layers with mixed signs grows far more slowly than ``|A|``
    products do. An ℓ2-ball region is tightened row by row and the ball goes on:
    ``‖A(a′ − a)‖₂ ≤ ‖A‖₂·‖a′ − a‖₂``."""
    c = (region.lo + region.hi) / 2
    r = (region.hi - region.lo) / 2 + U64 * (region.lo.abs() + region.hi.abs())
    magnitude = region.magnitude() + region.err
    batch = len(c)
    stacked = apply_abs(torch.cat([r, c.abs() + r, region.err, magnitude]))  # type: ignore[operator]
    rad, mag, err_in, mag_float = (_up(t, terms) for t in stacked.split(batch))
    mid = apply(c)  # type: ignore[operator]
    b = torch.zeros(()) if bias is None else bias.detach().double()
    shape = [1, -1] + [1] * (mid.dim() - 2)
    b = b.view(shape) if b.dim() else b.to(mid.device)
    mid = mid + b
    slack = gamma(terms + 4, U64) * (mag + b.abs())
    fresh = _fresh(mag_float, b, terms, u)
    per_sample = [-1] + [1] * (mid.dim() - 1)
    norm_in = region.error_norm()
    inherited = torch.minimum(err_in, _up(row_norms * norm_in.view(per_sample), 2))
    err = _up(inherited + fresh, terms)
    flat = fresh.flatten(1)
    err_norm = _up(operator_norm * norm_in + _up(flat.norm(dim=1), flat.shape[1]), 2)
    lo, hi = mid - rad - slack, mid + rad + slack
    if region.ball is not None:
        ball = region.ball
        centre = apply(ball.centre) + b  # type: ignore[operator]
        spread = _up(apply_abs(torch.cat([ball.slack, ball.centre.abs()])), terms)  # type: ignore[operator]
        centre_slack = spread[:batch] + gamma(terms + 4, U64) * (spread[batch:] + b.abs())
        deviation = _up(row_norms * ball.radius.view(per_sample), 2) + centre_slack
        lo, hi = torch.maximum(lo, centre - deviation), torch.minimum(hi, centre + deviation)
        out_ball = Ball(centre, centre_slack, _up(ball.radius * operator_norm, 2))
        return Region(lo, hi, err, out_ball, err_norm)
    return Region(lo, hi, err, err_norm=err_norm)


#: Operator-norm bounds per layer, while its input size and content stay the same.
_NORMS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, ...], str], float]] = (
    weakref.WeakKeyDictionary()
)
#: A Linear whose smaller side exceeds this takes Hölder's √(‖W‖₁‖W‖∞) instead of its spectral norm.
GRAM_SIDE = 1024


def _operator_norm(m: nn.Linear | nn.Conv2d, input_shape: tuple[int, ...]) -> float:
    """A proven upper bound of ‖A‖₂ for an affine layer: the float64 norms of
    :mod:`certbench.bounds.lipschitz`, each ×(1 + SAFETY) for their rounding (a convolution's on its
    input's spatial size, padding and stride included), or for a wide Linear Hölder's
    ‖W‖₂ ≤ √(‖W‖₁‖W‖∞) rounded up. Cached per layer, keyed on its input shape and content
    (:func:`certbench.bounds.fingerprint.fingerprint`), so a changed weight is never served an old norm."""
    from certbench.bounds.lipschitz import conv_operator_norm, linear_spectral_norm

    key = (input_shape, fingerprint(m))
    cached = _NORMS.get(m)
    if cached is not None and cached[0] == key:
        return cached[1]
    if type(m) is nn.Conv2d:
        norm = conv_operator_norm(m, (input_shape[-2], input_shape[-1]))
    elif min(m.weight.shape) <= GRAM_SIDE:
        norm = linear_spectral_norm(m.weight)
    else:
        w = m.weight.detach().double().abs()
        both = w.sum(dim=0).max() * w.sum(dim=1).max()
        norm = float(_up(both.sqrt(), max(w.shape)))
    _NORMS[m] = (key, norm)
    return norm


def _linear(m: nn.Linear, region: Region, u: float) -> Region:
    w = m.weight.detach().double()
    return _affine(
        region,
        lambda t: F.linear(t, w),
        lambda t: F.linear(t, w.abs()),
        m.bias,
        m.in_features,
        u,
        w.norm(dim=1),
        _operator_norm(m, tuple(region.lo.shape[1:])),
    )


def _conv(m: nn.Conv2d, region: Region, u: float) -> Region:
    w = m.weight.detach().double()

    def conv(t: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(t, weight, None, m.stride, m.padding, m.dilation, m.groups)

    terms = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return _affine(
        region,
        lambda t: conv(t, w),
        lambda t: conv(t, w.abs()),
        m.bias,
        terms,
        u,
        w.flatten(1).norm(dim=1).view(1, -1, 1, 1),
        _operator_norm(m, tuple(region.lo.shape[1:])),
    )


def _scale_shift(
    region: Region, scale: Tensor, shift: Tensor, magnitude_terms: Tensor, ops64: int, ops: int, u: float
) -> Region:
    """Elementwise ``scale·x + shift`` (float64 coefficients); ``magnitude_terms`` bounds the size of
    the intermediate terms besides |scale·x| (e.g. |mean·scale| + |β|)."""
    lo, hi = region.lo * scale + shift, region.hi * scale + shift
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    size = scale.abs() * region.magnitude() + magnitude_terms
    slack = gamma(ops64, U64) * size
    err = _up(scale.abs() * region.err + gamma(ops, u) * (size + scale.abs() * region.err), 4)
    return Region(lo - slack, hi + slack, err)


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.detach().double().view([1, -1] + [1] * (like.dim() - 2))


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, region: Region, u: float) -> Region:
    """Inference BatchNorm computed as x·α + (β − μ·α), α = γ/√(var + ε): ≤ 12 rounded operations."""
    if m.training:
        raise RoundingUnsupported("BatchNorm in training mode depends on the batch")
    var, mean = _channel_view(m.running_var, region.lo), _channel_view(m.running_mean, region.lo)
    alpha = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        alpha = alpha * _channel_view(m.weight, region.lo)
    beta = _channel_view(m.bias, region.lo) if m.bias is not None else torch.zeros_like(alpha)
    return _scale_shift(region, alpha, beta - mean * alpha, beta.abs() + (mean * alpha).abs(), 12, 12, u)


def _normalize(m: Normalize, region: Region, u: float) -> Region:
    """(x − μ)/σ: two correctly rounded operations."""
    std, mean = m.std.detach().double(), m.mean.detach().double()
    out = _scale_shift(region, 1.0 / std, -mean / std, (mean / std).abs(), 4, 2, u)
    if region.ball is not None:  # δ ↦ δ/σ shrinks ℓ2 norms by at least min σ
        ball = region.ball
        centre = (ball.centre - mean) / std
        slack = _up(ball.slack / std + gamma(4, U64) * (ball.centre.abs() + mean.abs()) / std, 2)
        out.ball = Ball(centre, slack, _up(ball.radius / std.min(), 2))
    return out


def _pool(m: nn.Module, region: Region, u: float) -> Region:
    """Pooling: max pools are exact; average pools are non-negative averaging maps of ≤ k terms."""
    if type(m) in (nn.MaxPool2d, nn.AdaptiveMaxPool2d):
        return region.map(m)
    if type(m) is nn.AvgPool2d:
        kh, kw = (m.kernel_size, m.kernel_size) if isinstance(m.kernel_size, int) else m.kernel_size
        terms = kh * kw
    else:  # adaptive average pooling: windows of at most ⌈n/o⌉ + 1 entries per axis
        size = region.lo.shape[-2:]
        out = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        terms = math.prod(-(-n // (o or n)) + 1 for n, o in zip(size, out))
    magnitude = region.magnitude()
    slack = gamma(terms + 2, U64) * m(magnitude)
    err = _up(m(region.err) + gamma(terms + 1, u) * m(magnitude + region.err), terms)
    return Region(m(region.lo) - slack, m(region.hi) + slack, err)


def _clamp_range(m: nn.Module) -> tuple[float, float]:
    """The interval a clamp maps onto: ReLU [0, ∞), ReLU6 and Hardtanh their ``[min_val, max_val]``."""
    return (0.0, math.inf) if type(m) is nn.ReLU else (float(m.min_val), float(m.max_val))


def _clamp(m: nn.Module, region: Region) -> Region:
    """ReLU, ReLU6, Hardtanh: exact and 1-Lipschitz, so the error passes through, except on
    saturated units. The float input of a unit lies in ``[lo − err, hi + err]``; where that is below
    the lower clamp value ``a`` (or above the upper one), every float pass on the region outputs
    ``a`` exactly, as the exact network does, so the unit's output carries no error. The test is
    sound in float64: rounding to nearest is monotone, so ``fl(hi + err) < a`` implies
    ``hi + err < a`` for a representable ``a``."""
    low, high = _clamp_range(m)
    saturated = (region.hi + region.err < low) | (region.lo - region.err > high)
    err = torch.where(saturated, region.err.new_zeros(()), region.err)
    ball = region.ball
    # |m(a) − m(c)| ≤ |a − c| elementwise, and m is exact in float64: slack and radius carry over
    out_ball = Ball(m(ball.centre), ball.slack, ball.radius) if ball is not None else None
    # |m(ã) − m(a)| ≤ |ã − a| elementwise: the error's ℓ2 bound carries over too
    return Region(m(region.lo), m(region.hi), err, out_ball, region.err_norm)


def _activation(m: nn.Module, region: Region, u: float) -> Region:
    kind = type(m)
    if kind in _CLAMPS:
        return _clamp(m, region)
    if kind is nn.LeakyReLU:
        slope = float(m.negative_slope)
        lipschitz, lo, hi = max(1.0, slope), m(region.lo), m(region.hi)
        slack = U64 * torch.maximum(lo.abs(), hi.abs())
        err = _up(lipschitz * region.err + u * slope * (region.magnitude() + region.err), 2)
        return Region(lo - slack, hi + slack, err)
    if kind is nn.ELU:
        lipschitz = max(1.0, float(m.alpha))
    elif kind is nn.Softplus:
        lipschitz = 1.0
    elif kind in _SMOOTH:
        lipschitz = _SMOOTH[kind]
    else:
        raise RoundingUnsupported(f"no rounding rule for {kind.__name__}")
    lo, hi = m(region.lo), m(region.hi)
    slack = SMOOTH_ULPS * 2 * U64 * (torch.maximum(lo.abs(), hi.abs()) + 1)
    lo, hi = lo - slack, hi + slack
    out_magnitude = torch.maximum(lo.abs(), hi.abs()) + lipschitz * region.err
    err = _up(lipschitz * region.err + SMOOTH_ULPS * 2 * u * (out_magnitude + 1), 2)
    return Region(lo, hi, err)


def _linf_distances(points: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``‖points_b − w_j‖∞`` for float64 ``points`` (B, in) and the layer's ``weight`` (out, in), with a
    bound on its error (a scalar tensor).

    Where the layer's own float32 kernel runs (float32 CPU weights, the compiled kernel; 6× faster than
    a float64 ``torch.cdist``), the points are rounded to float32 and the distances taken there: the
    ℓ∞ distance is 1-Lipschitz in the points, so rounding them moves it by at most ``u₃₂·max|points|``;
    each difference ``x_i − w_ji`` is then one correctly rounded float32 operation (the same arithmetic
    the forward pass's rule in :func:`_linf_dist` relies on) and ``|·|`` and ``max`` are exact, so the
    float32 distance d̃ is within ``γ₁·d̃`` of the exact one; ``2^−125`` covers subnormal flushing.
    Elsewhere the distances are float64 ``torch.cdist`` (exact up to the ``u₆₄`` terms of the caller).
    """
    if not use_kernel(weight):
        return torch.cdist(points, weight.detach().double(), p=math.inf), torch.zeros((), dtype=points.dtype)
    u32 = 2.0**-24
    value = lp_distance(points.float(), weight.detach(), math.inf).double()
    error = u32 * points.abs().amax() + gamma(1, u32) * value.amax() + 2.0**-125
    return value, _up(error, 2)


def _linf_distance_box(lo: Tensor, hi: Tensor, weight: Tensor, tight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 bounds of ``d_j(x) = max_i |x_i − w_ji|`` over the box ``lo ≤ x ≤ hi`` and their rounding.

    Coordinate-wise extremes (the box is a product):
    ``max d_j = max(max_i (hi_i − w_ji), max_i (w_ji − lo_i))`` and
    ``min d_j = max(0, max_i (lo_i − w_ji), max_i (w_ji − hi_i))``. Each one-sided maximum is read
    off an ℓ∞ distance whose differences all have one sign: with ``M > max|x| + max|w|``,
    ``max_i (lo_i − w_ji) = ‖(lo + M) − w_j‖∞ − M`` (``torch.cdist`` at p = ∞, no B × out × in
    temporary). A box whose half-widths agree up to ``UNIFORM_SPREAD`` (a point widened by its
    rounding) takes one distance instead: the box lies in the ℓ∞ ball of radius ρ = max half-width
    (plus the float64 rounding of its centre) around its centre, and ``d_j`` is 1-Lipschitz in ℓ∞, so
    ``d_j`` stays within ρ of ``d_j(centre)``; for such a box this equals the coordinate-wise bounds up
    to the spread. Without ``tight`` every box takes the one-distance enclosure (valid for any box,
    looser for uneven ones: enough where only the error bound is used).
    Each difference is at most three correctly rounded operations on terms of size ≤ 3M, so every
    bound is off by at most ``8·u₆₄·M`` plus ``u₆₄`` of its size, plus what :func:`_linf_distances`
    adds when it computes the distances in float32: the third value (to be added to the layer's slack).
    """
    w = weight.detach().double()
    offset = float(torch.maximum(lo.abs().amax(), hi.abs().amax()) + w.abs().amax()) + 1.0
    distance_error = torch.zeros((), dtype=torch.float64, device=lo.device)

    def distances(points: Tensor) -> Tensor:
        nonlocal distance_error
        value, error = _linf_distances(points, weight)
        distance_error = torch.maximum(distance_error, error)
        return value

    half = (hi - lo) / 2
    spread = half.amax(dim=1, keepdim=True) - half.amin(dim=1, keepdim=True)
    if not tight or bool((spread <= UNIFORM_SPREAD).all()):
        centre = distances((lo + hi) / 2)
        radius = half.amax(dim=1, keepdim=True) + 2 * U64 * (lo.abs() + hi.abs()).amax(dim=1, keepdim=True)
        upper, lower = centre + radius, (centre - radius).clamp_min(0.0)
    else:
        batch = len(lo)
        plus = distances(torch.cat([hi, lo]) + offset) - offset
        minus = distances(torch.cat([lo, hi]) - offset) - offset
        upper = torch.maximum(plus[:batch], minus[:batch])
        lower = torch.maximum(plus[batch:], minus[batch:]).clamp_min(0.0)
    return lower, upper, 8 * U64 * offset + U64 * upper.abs() + distance_error


def _linf_dist(m: LinfDist, region: Region, u: float, tight: bool) -> Region:
    """p = ∞: y_j = max_i |x_i − w_ji| (+ b_j); each difference is rounded once, max and |·| are exact,
    so |ỹ − y| ≤ max_i e_i + u·|ỹ| (+ the bias addition)."""
    lo, hi, rounding = _linf_distance_box(region.lo, region.hi, m.weight, tight)
    err_in = region.err.amax(dim=1, keepdim=True)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros((), dtype=torch.float64)
    lo, hi = lo + b, hi + b
    size = torch.maximum(lo.abs(), hi.abs()) + b.abs()
    slack = 4 * U64 * size + rounding
    err = _up(err_in + 2 * gamma(2, u) * (size + err_in + b.abs()), 2).expand_as(lo).clone()
    return Region(lo - slack, hi + slack, err)


def _sorted_distance_box(
    lo: Tensor, hi: Tensor, w: Tensor, c: Tensor, lipschitz: float, tight: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 bounds of ``s_j(x) = Σ_k c_k·|x − w_j|_(k)`` over the box ``lo ≤ x ≤ hi``, an upper
    bound of ``max_i |x_i − w_ji|`` there, and the float64 rounding of the first three.

    Coordinate-wise extremes (``s_j`` is non-decreasing in every ``|x_i − w_ji|``,
    :func:`certbench.nn.sortnet.sorted_distance_bounds`). A box whose half-widths agree up to
    ``UNIFORM_SPREAD``, and every box without ``tight``, takes one evaluation at its centre instead:
    the box lies in the ℓ∞ ball of radius ρ (its largest half-width plus the float64 rounding of its
    centre) around the centre and ``s_j`` is ``‖c‖₁``-Lipschitz in ℓ∞, so ``s_j`` stays within
    ``‖c‖₁·ρ`` of ``s_j(centre)``, and ``max_i |x_i − w_ji|`` within ρ of its value there.
    Rounding: each difference is one correctly rounded subtraction (relative error ≤ u₆₄), the
    absolute value, the clamp and the selection of the T largest are exact, and the weighted sum of
    T non-negative terms errs by ≤ γ₆₄(T)·s (Higham eq. (3.4)); so every computed value is within
    γ₆₄(T+2) of its size of the exact one (the radius ``‖c‖₁·ρ`` adds u₆₄ of itself).
    """
    terms = c.numel()
    half = (hi - lo) / 2
    spread = half.amax(dim=1, keepdim=True) - half.amin(dim=1, keepdim=True)
    if not tight or bool((spread <= UNIFORM_SPREAD).all()):
        centre = (lo + hi) / 2
        radius = half.amax(dim=1, keepdim=True) + 2 * U64 * (lo.abs() + hi.abs()).amax(dim=1, keepdim=True)
        middle = sorted_distance(centre, w, c)
        largest = torch.cdist(centre, w, p=math.inf) + radius
        upper, lower = middle + lipschitz * radius, (middle - lipschitz * radius).clamp_min(0.0)
    else:
        lower, upper, largest = sorted_distance_bounds(lo, hi, w, c)
    rounding = gamma(terms + 2, U64) * upper.abs()
    return lower, upper, largest * (1 + gamma(2, U64)), rounding


def _sort_dist(m: SortDist, region: Region, u: float, tight: bool) -> Region:
    """SortNet layer (exact form, the one evaluation mode computes): y_j = Σ_{k≤T} c_k·ã_(k) (+ b_j).

    Float error at a float input x̃ with |x̃_i − x_i| ≤ e_i, E = max_i e_i, A ≥ max_i |x_i − w_ji|
    on the region, L = ‖c‖₁, u the unit roundoff of the model's dtype:

    1. ``d̃_i = fl(x̃_i − w_ji)`` is one rounding, so ``ã_i = |d̃_i|`` satisfies
       ``|ã_i − a_i| ≤ e_i + u·|x̃_i − w_ji| ≤ E + u·(A + E)``;
    2. sorting (and taking the T largest) is exact and 1-Lipschitz in ℓ∞, so
       ``|ã_(k) − a_(k)| ≤ max_i |ã_i − a_i|``, hence ``|Σ c_k ã_(k) − Σ c_k a_(k)| ≤ L·(E + u(A + E))``;
    3. the weighted sum of T non-negative products, in any order, with or without fused
       multiply–add, errs by ≤ ``γ_T·Σ c_k ã_(k) ≤ γ_T·L·(A + E)(1 + u)`` (Higham Thm. 3.5, eq. (3.4));
    4. adding the bias is one more rounding, ≤ ``u·(|ṽ| + |b_j|)``.

    Summed, ``|ỹ_j − y_j| ≤ L·E + [u + γ_T(1 + u) + u(1 + γ_T)(1 + u)]·L·(A + E) + u·|b_j|``; the
    bracket is ``(T+2)u + (T+1)²u² + O(u³) ≤ γ_{T+2}``, and ``2·γ(T+2)·(L·(A + E) + |b_j|)`` is used
    (the same factor of two of slack as the ℓ∞-dist rule). The exact half is
    :func:`_sorted_distance_box` plus the bias, widened by its float64 rounding.
    """
    w = m.weight.detach().double()
    c = m.coefficients.detach().double().to(w.device)
    lipschitz = m.lipschitz_linf()
    lo, hi, largest, rounding = _sorted_distance_box(region.lo, region.hi, w, c, lipschitz, tight)
    err_in = region.err.amax(dim=1, keepdim=True)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros((), dtype=torch.float64)
    lo, hi = lo + b, hi + b
    size = torch.maximum(lo.abs(), hi.abs()) + b.abs()
    slack = 4 * U64 * size + rounding
    spread = lipschitz * (largest + err_in) + b.abs()
    err = _up(lipschitz * err_in + 2 * gamma(c.numel() + 2, u) * spread, 4)
    return Region(lo - slack, hi + slack, err)


def _mean_shift(m: MeanShift, region: Region, u: float) -> Region:
    if m.training:
        raise RoundingUnsupported("MeanShift in training mode depends on the batch")
    mean = _channel_view(m.running_mean, region.lo)
    return _scale_shift(region, torch.ones_like(mean), -mean, mean.abs(), 2, 1, u)


def _residual(m: Residual, region: Region, u: float, tight: bool) -> Region:
    """a·body(x) + b·shortcut(x): two products and a sum, each rounded once."""
    a, b = m.coefficients
    body, short = walk(m.body, region, u, tight), walk(m.shortcut, region, u, tight)
    parts = [(a * body.lo, a * body.hi), (b * short.lo, b * short.hi)]
    lo = sum(torch.minimum(p, q) for p, q in parts)
    hi = sum(torch.maximum(p, q) for p, q in parts)
    size = abs(a) * body.magnitude() + abs(b) * short.magnitude()
    slack = gamma(4, U64) * size
    err = _up(
        abs(a) * body.err
        + abs(b) * short.err
        + gamma(2, u) * (size + abs(a) * body.err + abs(b) * short.err),
        4,
    )
    return Region(lo - slack, hi + slack, err)  # type: ignore[arg-type]


def layers(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of nested ``nn.Sequential`` containers, in order (exact type only)."""
    if type(model) is nn.Sequential:
        for child in model:
            yield from layers(child)
    else:
        yield model


def walk(model: nn.Module, region: Region, u: float, tight: bool = True) -> Region:
    """Propagate a region through ``model`` (exact module types only, eval-mode semantics); without
    ``tight`` the enclosure may be looser where that is cheaper (the error bound stays valid)."""
    for m in layers(model):
        reason = problem(m)
        if reason is not None:
            raise RoundingUnsupported(reason)
        kind = type(m)
        if kind is nn.Linear:
            region = _linear(m, region, u)
        elif kind is nn.Conv2d:
            region = _conv(m, region, u)
        elif kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            region = _batchnorm(m, region, u)
        elif kind is Normalize:
            region = _normalize(m, region, u)
        elif kind in (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            region = _pool(m, region, u)
        elif kind in _PASS_THROUGH:
            shape = nn.Identity() if kind in _DROPOUTS else m
            ball = region.ball.map(shape) if region.ball is not None else None
            region = Region(shape(region.lo), shape(region.hi), shape(region.err), ball, region.err_norm)
        elif kind is Negate:
            region = Region(-region.hi, -region.lo, region.err)
        elif kind is LinfDist:
            region = _linf_dist(m, region, u, tight)
        elif kind is SortDist:
            region = _sort_dist(m, region, u, tight)
        elif kind is MeanShift:
            region = _mean_shift(m, region, u)
        elif kind is Residual:
            region = _residual(m, region, u, tight)
        else:
            region = _activation(m, region, u)
    return region


def model_roundoff(model: nn.Module) -> float:
    """The unit roundoff of the dtype ``model`` computes in (its parameters' dtype)."""
    reference = next(iter(model.parameters()), None)
    return unit_roundoff(reference.dtype if reference is not None else torch.float32)


def problem(module: nn.Module) -> str | None:
    """Why ``module`` (one layer, exact type) has no rounding rule here, or None."""
    kind = type(module)
    if kind not in _HANDLED:
        known = next((k for k in _HANDLED if isinstance(module, k)), None)
        if known is not None:
            return f"{kind.__name__} is a subclass of {known.__name__} (only exact types have rules)"
        return f"no rounding rule for {kind.__name__}"
    settings = {
        nn.Conv2d: lambda m: m.padding_mode != "zeros" and f"Conv2d with padding_mode={m.padding_mode!r}",
        LinfDist: lambda m: not math.isinf(m.p)
        and f"ℓ∞-dist layer with finite p = {m.p:g} (its p-norm kernel has no proven error bound)",
        SortDist: lambda m: m.coefficient_problem() is not None
        and f"SortNet layer with {m.coefficient_problem()}",
        nn.BatchNorm1d: lambda m: m.running_var is None and "BatchNorm without running statistics",
        nn.BatchNorm2d: lambda m: m.running_var is None and "BatchNorm without running statistics",
        nn.LeakyReLU: lambda m: m.negative_slope < 0 and "LeakyReLU with a negative slope is not monotone",
        nn.ELU: lambda m: m.alpha < 0 and "ELU with a negative alpha is not monotone",
        nn.Hardtanh: lambda m: not m.min_val <= m.max_val and "Hardtanh with min_val > max_val",
        nn.MaxPool2d: lambda m: m.return_indices and "MaxPool2d with return_indices=True",
        Normalize: lambda m: not (
            torch.isfinite(m.std).all() and torch.isfinite(m.mean).all() and bool((m.std > 0).all())
        )
        and "Normalize with non-finite or non-positive buffers",
    }
    rule = settings.get(kind)
    return (rule(module) or None) if rule is not None else None


def check(model: nn.Module) -> None:
    """Raise :class:`RoundingUnsupported` unless every module of ``model`` has a rounding rule here."""
    for m in layers(model):
        reason = problem(m)
        if reason is not None:
            raise RoundingUnsupported(reason)
        if type(m) is Residual:
            check(m.body)
            check(m.shortcut)
    model_roundoff(model)


_HANDLED = {
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    Normalize,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    *_PASS_THROUGH,
    Negate,
    LinfDist,
    SortDist,
    MeanShift,
    Residual,
    *_CLAMPS,
    nn.LeakyReLU,
    nn.ELU,
    *_SMOOTH,
}


@dataclass(frozen=True)
class MarginBounds:
    """Per sample and class j (B, K), float64: ``lower`` ≤ the exact z_y − z_j on the whole region;
    ``error`` ≥ how far any float pass at any point of the region can move that margin (e_y + e_j).
    Column y holds +inf and 0."""

    lower: Tensor
    error: Tensor

    def certified(self) -> Tensor:
        """Per sample: every margin stays positive, exactly and in floating point, on the region."""
        return ((self.lower - self.error) > 0).all(dim=1)


def _last_linear(model: nn.Module) -> tuple[list[nn.Module], nn.Linear | None]:
    chain = list(layers(model))
    tail = len(chain)
    while tail > 0 and type(chain[tail - 1]) in _TRAILING_IDENTITIES:
        tail -= 1
    if tail > 0 and type(chain[tail - 1]) is nn.Linear:
        return chain[: tail - 1], chain[tail - 1]
    return chain, None


@torch.no_grad()
def margin_bounds(model: nn.Module, region: Region, y: Tensor, tight: bool = True) -> MarginBounds:
    """Bounds of every margin over ``region``; a final Linear layer is folded into the margins
    (rows ``w_y − w_j``, as IBP with an elided last layer, Gowal et al. 2018 §3), in float64 with
    the midpoint–radius widening of the module docstring. Where only ``error`` is used, ``tight=False``
    lets the walk take cheaper, looser enclosures (``lower`` is then still a bound, only a weaker one)."""
    u = model_roundoff(model)
    body, last = _last_linear(model)
    hidden = walk(nn.Sequential(*body), region, u, tight)
    if last is None:
        e = hidden.err.flatten(1)
        lower = hidden.lo.flatten(1).gather(1, y[:, None]) - hidden.hi.flatten(1)
        error = e.gather(1, y[:, None]) + e
    else:
        out = _linear(last, hidden, u)
        w = last.weight.detach().double()
        diff = w[y][:, None, :] - w[None]  # (B, K, H): exact enough, covered by the γ below
        c = (hidden.lo + hidden.hi) / 2
        r = (hidden.hi - hidden.lo) / 2 + U64 * (hidden.lo.abs() + hidden.hi.abs())
        bias = (
            torch.zeros(1, dtype=torch.float64, device=c.device)
            if last.bias is None
            else last.bias.detach().double()
        )
        bias_diff = bias[y][:, None] - bias[None]
        # |w_y − w_j| · r and |w_y − w_j| · (|c| + r) in one batched product
        spread, magnitude = (diff.abs() @ torch.stack([r, c.abs() + r], dim=2)).unbind(dim=2)
        size = magnitude + bias[y][:, None].abs() + bias.abs()[None]
        lower = (
            (diff @ c[:, :, None]).squeeze(-1) - spread + bias_diff - gamma(last.in_features + 6, U64) * size
        )
        # the float margin errs by (w_y − w_j)·δ + ρ_y − ρ_j: per unit as ``out.err`` has it, or by at
        # most ‖w_y − w_j‖₂·‖δ‖₂ + ρ̄_y + ρ̄_j (Cauchy–Schwarz), whichever is smaller
        terms = last.in_features
        used = (hidden.magnitude() + hidden.err).flatten(1)
        fresh = _fresh(_up(used @ w.abs().T, terms), bias, terms, u)
        rows = _up(diff.norm(dim=2), terms)
        by_norm = rows * hidden.error_norm()[:, None] + fresh.gather(1, y[:, None]) + fresh
        error = torch.minimum(out.err.gather(1, y[:, None]) + out.err, _up(by_norm, 2))
    lower = lower.scatter(1, y[:, None], math.inf)
    error = _up(error.scatter(1, y[:, None], 0.0), 2)
    return MarginBounds(lower, error)
