"""Upper bounds on the ℓ2 Lipschitz constant of a network's logit map (Tsuzuku et al. 2018, LMT).

The bound is composed layer by layer (LMT Sec. 4.1): multiplied along a chain
(``nn.Sequential``), ``|a|·L(body) + |b|·L(shortcut)`` over a :class:`~certbench.nn.Residual`.
Per layer:

* ``nn.Linear``: the spectral norm ‖W‖₂.
* ``nn.Conv2d``: the norm of the convolution *operator* on the layer's input shape (stride,
  zero padding, dilation and groups included; the shapes are traced with one forward pass).
  In exact mode: the explicit matrix's norm for small layers, else the smaller of a DFT bound
  (:func:`conv_circulant_bound`) and the paper's earlier closed form
  ‖W reshaped to (out, in·kh·kw)‖₂ · √(∏_axes ⌈min(k, H+2p−k+1)/s⌉)
  (:func:`conv_closed_form_bound`).
* BatchNorm (inference form): max_i |γ_i / √(running_var_i + eps)|.
* ReLU, ReLU6, Tanh, Hardtanh, Softplus: 1; LeakyReLU(α), ELU(α): max(1, |α|); Sigmoid: 1/4.
* Max pooling: √(overlap), overlap = the largest number of windows that contain one pixel;
  average pooling: √(‖A‖₁‖A‖∞) of the (non-negative) averaging matrix A, which is
  √(overlap)/√(kh·kw) for the usual layer.
* :class:`~certbench.nn.Normalize`: 1/min σ; Flatten, Unflatten, Identity, Dropout: 1 (dropout
  is the identity at evaluation).

Two modes (:meth:`LipschitzBound.compute`):

* training (``exact=False``): one power-iteration step per call for every Linear and Conv2d
  with a persistent vector (Miyato et al. 2018), σ ≈ uᵀ A v, differentiable in the weights and
  cheap. σ from a power step is a *lower* estimate of the norm: this mode is a regulariser,
  never a certificate.
* evaluation (``exact=True``): a rigorous bound in float64, see :func:`linear_spectral_norm` and
  :func:`conv_operator_norm`, each norm multiplied by ``1 + SAFETY`` to cover float64 rounding.
  It is not cheap for wide convolutions on large inputs (one small eigenproblem per frequency):
  compute it once per trained model.

A layer type without a rule raises :class:`UnsupportedLayerError` naming the type; nothing is
ever silently given the factor 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.rounding import layers as flat_layers
from certbench.nn import Normalize, Residual

#: Relative margin on every float64 norm of the exact mode. The computed σ_max errs by a relative
#: ≲ m·n·2⁻⁵³ < 1e-8 for the sizes here (see :func:`spectral_norms`); 1e-6 is a generous cover
#: that changes no radius measurably.
SAFETY = 1e-6
#: A convolution whose explicit matrix has at most this many entries gets its exact norm.
EXPLICIT_CONV_ENTRIES = 2_000_000

_EPS = 1e-12


class UnsupportedLayerError(TypeError):
    """The model contains a layer for which no ℓ2 Lipschitz rule exists here."""

    def __init__(self, module: nn.Module, why: str = "") -> None:
        detail = f" ({why})" if why else ""
        super().__init__(f"no ℓ2 Lipschitz bound for layer type {type(module).__name__}{detail}")
        self.layer_type = type(module).__name__


def _activation_constant(module: nn.Module) -> float:
    """Lipschitz constants of element-wise activations (sup of |derivative|)."""
    kind = type(module)
    if kind in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus):
        return 1.0
    if kind is nn.Sigmoid:
        return 0.25
    if kind is nn.LeakyReLU:
        return max(1.0, abs(module.negative_slope))
    if kind is nn.ELU:
        return max(1.0, abs(module.alpha))
    raise UnsupportedLayerError(module)


_PASS_THROUGH = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.LeakyReLU, nn.ELU)


# --------------------------------------------------------------------------------------------
# Spectral norms of single layers
# --------------------------------------------------------------------------------------------


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / (v.norm() + _EPS)


def spectral_norms(matrices: torch.Tensor) -> torch.Tensor:
    """σ_max of each matrix of a (..., m, n) batch, as √λ_max of the smaller Gram matrix.

    ``eigvalsh`` of the Gram matrix is several times faster than an SVD. In float64 the Gram
    product errs by at most about m·n·2⁻⁵³·σ_max² in norm (every column norm is ≤ σ_max) and
    ``eigvalsh`` adds a backward error of the same kind, so by Weyl's inequality σ_max is off by
    a relative ≲ m·n·2⁻⁵³ < 1e-8 for the layer sizes here, well inside :data:`SAFETY`.
    """
    gram = matrices.mH @ matrices if matrices.shape[-1] <= matrices.shape[-2] else matrices @ matrices.mH
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


def linear_spectral_norm(weight: torch.Tensor) -> float:
    """‖W‖₂ of a weight (dims after the first are flattened into columns), in float64."""
    matrix = weight.detach().reshape(weight.shape[0], -1).double()
    return float(spectral_norms(matrix)) * (1 + SAFETY)


Operator = Callable[[torch.Tensor], torch.Tensor]


def power_step(apply: Operator, adjoint: Operator, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power-iteration step on a linear operator A (Miyato et al. 2018, Alg. 1).

    ``u`` is the persistent left (output-space) vector: v = Aᵀu/‖Aᵀu‖ without gradient, then
    σ = ‖A v‖ = u'ᵀ A v with u' = A v/‖A v‖, whose gradient in A's parameters is u'vᵀ exactly as
    for Miyato's σ = ũᵀ W ṽ with detached ũ, ṽ. Two applications of A per step. Returns (σ, u').
    """
    with torch.no_grad():
        v = _normalise(adjoint(u))
    image = apply(v)
    sigma = image.norm()
    return sigma, image.detach() / (sigma.detach() + _EPS)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Symmetric zero padding of ``conv``; other padding modes are not bounded here."""
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(conv, f"padding_mode={conv.padding_mode!r}")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise UnsupportedLayerError(conv, "asymmetric 'same' padding")
        return (totals[0] // 2, totals[1] // 2)
    return _pair(conv.padding)


def _conv_output_hw(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    pad = _conv_padding(conv)
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
        for n, p, d, k, s in zip(hw, pad, conv.dilation, conv.kernel_size, conv.stride)
    )


def conv_apply(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The linear part of ``conv`` (no bias), with ``weight`` in place of its own if given."""
    weight = conv.weight if weight is None else weight
    return F.conv2d(x, weight, None, conv.stride, _conv_padding(conv), conv.dilation, conv.groups)


def conv_adjoint(
    conv: nn.Conv2d, y: torch.Tensor, input_hw: tuple[int, int], weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Aᵀy for A = :func:`conv_apply` on inputs of spatial size ``input_hw``.

    ``conv_transpose2d`` needs ``output_padding`` to recover the rows and columns that the
    forward convolution's floor division dropped.
    """
    pad = _conv_padding(conv)
    out_hw = y.shape[-2:]
    output_padding = tuple(
        n - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for n, o, s, p, d, k in zip(input_hw, out_hw, conv.stride, pad, conv.dilation, conv.kernel_size)
    )
    weight = conv.weight if weight is None else weight
    return F.conv_transpose2d(y, weight, None, conv.stride, pad, output_padding, conv.groups, conv.dilation)


def _dense_kernel(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel in float64 as an ungrouped, undilated (out, in, kh', kw') tensor (zeros filled in)."""
    weight = conv.weight.detach().double()
    out, in_per_group, kh, kw = weight.shape
    dh, dw = conv.dilation
    groups = conv.groups
    dense = weight.new_zeros(out, in_per_group * groups, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out_per_group = out // groups
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        cols = slice(g * in_per_group, (g + 1) * in_per_group)
        dense[rows, cols, ::dh, ::dw] = weight[rows]
    return dense


#: Complex entries of the kernel spectrum held at once by :func:`conv_circulant_bound`.
SPECTRUM_CHUNK = 2**23


def _dft(size: int, taps: int, count: int) -> torch.Tensor:
    """(count, taps) matrix of e^{−2πi·f·t/size}: the DFT of a length-``taps`` filter at frequencies
    f < count."""
    angles = (
        -2
        * math.pi
        * torch.outer(torch.arange(count, dtype=torch.float64), torch.arange(taps, dtype=torch.float64))
        / size
    )
    return torch.polar(torch.ones_like(angles), angles)


def conv_circulant_bound(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """A rigorous upper bound on the conv operator norm via the DFT (Sedghi, Gupta, Long 2019).

    A stride-s convolution of x is a stride-1 convolution of x's s×s polyphase components
    (s² times the channels, kernel ⌈k/s⌉). Zero padding and the output crop make that operator
    S·C·E, with E an isometric embedding of the (padded) input into an N×N torus,
    N = ⌈(H+2p)/s⌉ + ⌈k/s⌉ − 1 (large enough that no output wraps around), C the circular
    convolution on the torus and S a coordinate selection. So ‖A‖ ≤ ‖C‖, and C is
    block-diagonalised by the 2-D DFT: ‖C‖ = max over the N² frequencies ω of σ_max(K̂(ω)).
    A real kernel has K̂(−ω) = conj(K̂(ω)), so half of the frequencies suffice; they are
    processed in chunks of about :data:`SPECTRUM_CHUNK` entries to bound the memory.
    """
    kernel = _dense_kernel(conv)
    out, channels, kh, kw = kernel.shape
    sh, sw = conv.stride
    ph, pw = _conv_padding(conv)
    kh2, kw2 = -(-kh // sh), -(-kw // sw)
    kernel = F.pad(kernel, (0, kw2 * sw - kw, 0, kh2 * sh - kh))
    kernel = kernel.view(out, channels, kh2, sh, kw2, sw).permute(0, 1, 3, 5, 2, 4)
    kernel = kernel.reshape(out, channels * sh * sw, kh2, kw2).to(torch.complex128)
    n_h = -(-(input_hw[0] + 2 * ph) // sh) + kh2 - 1
    n_w = -(-(input_hw[1] + 2 * pw) // sw) + kw2 - 1
    dft_h, dft_w = _dft(n_h, kh2, n_h).to(kernel.device), _dft(n_w, kw2, n_w // 2 + 1).to(kernel.device)
    per_row = dft_w.shape[0] * kernel.shape[0] * kernel.shape[1]
    rows = max(1, SPECTRUM_CHUNK // per_row)
    best = 0.0
    for start in range(0, n_h, rows):
        spectrum = torch.einsum("oiab,ha,wb->hwoi", kernel, dft_h[start : start + rows], dft_w)
        best = max(best, float(spectral_norms(spectrum).max()))
    return best * (1 + SAFETY)


def _window_overlap(size: int, out: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The largest number of pooling/conv windows along one axis that contain one input index."""
    counts = [0] * size
    for i in range(out):
        for j in range(kernel):
            pos = i * stride - padding + j * dilation
            if 0 <= pos < size:
                counts[pos] += 1
    return max(counts, default=0)


def conv_closed_form_bound(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """LMT's closed form: ‖W reshaped to (out, in·kh·kw)‖₂ · √(overlap_h · overlap_w).

    Each output position is W_mat applied to one input patch, so ‖Ax‖² ≤ ‖W_mat‖²·Σ‖patch‖²
    ≤ ‖W_mat‖²·overlap·‖x‖², overlap = the most patches one pixel is in. Along an axis that is
    ⌈min(k, H+2p−k+1)/s⌉ for an undilated convolution (the paper's formula); it is counted
    exactly here, which also covers dilation. Groups make W_mat block-diagonal: the max over
    groups is taken by the dense kernel's norm.
    """
    out_hw = _conv_output_hw(conv, input_hw)
    pad = _conv_padding(conv)
    overlap = math.prod(
        _window_overlap(n, o, k, s, p, d)
        for n, o, k, s, p, d in zip(input_hw, out_hw, conv.kernel_size, conv.stride, pad, conv.dilation)
    )
    groups = conv.groups
    weight = conv.weight.detach().double()
    per_group = weight.view(groups, weight.shape[0] // groups, -1)
    norm = float(spectral_norms(per_group).max())
    return norm * math.sqrt(overlap) * (1 + SAFETY)


def conv_explicit_norm(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """The exact operator norm of the convolution, from its explicit matrix (float64, :func:`spectral_norms`).

    The matrix is built from the smaller side: A applied to the identity basis of the inputs, or
    Aᵀ applied to that of the outputs, so the basis never holds more entries than the matrix.
    """
    weight = conv.weight.detach().double()
    out_hw = _conv_output_hw(conv, input_hw)
    n, m = conv.in_channels * math.prod(input_hw), conv.out_channels * math.prod(out_hw)
    if n <= m:
        basis = torch.eye(n, dtype=torch.float64, device=weight.device).view(n, conv.in_channels, *input_hw)
        matrix = conv_apply(conv, basis, weight).reshape(n, m)
    else:
        basis = torch.eye(m, dtype=torch.float64, device=weight.device).view(m, conv.out_channels, *out_hw)
        matrix = conv_adjoint(conv, basis, input_hw, weight).reshape(m, n)
    return float(spectral_norms(matrix)) * (1 + SAFETY)


def conv_operator_norm(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """A rigorous bound on ‖conv‖ on inputs of spatial size ``input_hw`` (float64).

    Exact (:func:`conv_explicit_norm`) when the matrix has at most :data:`EXPLICIT_CONV_ENTRIES`
    entries; otherwise the smaller of :func:`conv_circulant_bound` and
    :func:`conv_closed_form_bound`, both rigorous.
    """
    out_hw = _conv_output_hw(conv, input_hw)
    entries = conv.in_channels * math.prod(input_hw) * conv.out_channels * math.prod(out_hw)
    if entries <= EXPLICIT_CONV_ENTRIES:
        return conv_explicit_norm(conv, input_hw)
    return min(conv_circulant_bound(conv, input_hw), conv_closed_form_bound(conv, input_hw))


def batchnorm_bound(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """max_i |γ_i / √(running_var_i + eps)|, the inference-form BatchNorm's Lipschitz constant."""
    if bn.running_var is None:
        raise UnsupportedLayerError(bn, "track_running_stats=False depends on the batch")
    scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    return scale.abs().max()


def _maxpool_bound(pool: nn.Module, input_hw: tuple[int, int], output_hw: tuple[int, int]) -> float:
    """√(overlap): |max(a) − max(b)| ≤ ‖a − b‖₂ per window and each pixel is in ≤ overlap windows."""
    if isinstance(pool, nn.MaxPool2d):
        args = zip(
            input_hw,
            output_hw,
            _pair(pool.kernel_size),
            _pair(pool.stride or pool.kernel_size),
            _pair(pool.padding),
            _pair(pool.dilation),
        )
        overlap = math.prod(_window_overlap(*a) for a in args)
    else:  # AdaptiveMaxPool2d: window i of n → o covers [⌊i·n/o⌋, ⌈(i+1)·n/o⌉)
        overlap = 1
        for n, o in zip(input_hw, output_hw):
            counts = [0] * n
            for i in range(o):
                for pos in range((i * n) // o, -(-(i + 1) * n // o)):
                    counts[pos] += 1
            overlap *= max(counts)
    return math.sqrt(overlap)


def _avgpool_bound(pool: nn.Module, input_hw: tuple[int, int]) -> float:
    """√(‖A‖₁·‖A‖∞) for the averaging matrix A (Schur test), read off A·1 and Aᵀ·1.

    Every entry of A has the sign of the divisor (a negative ``divisor_override`` makes all of them
    negative), so |A|·1 = |A·1| and |A|ᵀ·1 = |Aᵀ·1|.
    """
    ones = torch.ones(1, 1, *input_hw, dtype=torch.float64, requires_grad=True)
    pooled = pool(ones)
    (column_sums,) = torch.autograd.grad(pooled.sum(), ones)
    return math.sqrt(float(pooled.detach().abs().max()) * float(column_sums.abs().max()))


# --------------------------------------------------------------------------------------------
# The bound of a whole model
# --------------------------------------------------------------------------------------------

Scalar = torch.Tensor | float


class _Node:
    def bound(self, exact: bool) -> Scalar:
        raise NotImplementedError


@dataclass
class _Const(_Node):
    value: float

    def bound(self, exact: bool) -> Scalar:
        return self.value


@dataclass
class _Chain(_Node):
    children: list[_Node]

    def bound(self, exact: bool) -> Scalar:
        """The product; constant factors are multiplied in Python, tensors in one ``prod``."""
        constant, factors = 1.0, []
        for child in self.children:
            value = child.bound(exact)
            if isinstance(value, torch.Tensor):
                factors.append(value)
            else:
                constant *= value
        if not factors:
            return constant
        product = factors[0] if len(factors) == 1 else torch.stack(factors).prod()
        return product if constant == 1.0 else constant * product


@dataclass
class _Sum(_Node):
    residual: Residual
    body: _Node
    shortcut: _Node

    def bound(self, exact: bool) -> Scalar:
        a, b = (abs(c) for c in self.residual.coefficients)
        return a * self.body.bound(exact) + b * self.shortcut.bound(exact)


@dataclass
class _NormalizeScale(_Node):
    """1/min σ of a Normalize layer, read from its buffer whenever the bound is computed."""

    module: Normalize

    def bound(self, exact: bool) -> Scalar:
        problem = self.module.buffer_problem()
        if problem is not None:
            raise UnsupportedLayerError(self.module, problem)
        return float(1.0 / self.module.std.detach().double().min())


@dataclass
class _BatchNorm(_Node):
    module: nn.modules.batchnorm._BatchNorm

    def bound(self, exact: bool) -> Scalar:
        if exact:
            with torch.no_grad():
                return float(batchnorm_bound(self.module).double()) * (1 + SAFETY)
        return batchnorm_bound(self.module)


class _Operator(_Node):
    """A Linear or Conv2d layer with a persistent power-iteration vector (in its output space)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.vector: torch.Tensor | None = None
        self.input_hw: tuple[int, int] = (0, 0)
        self.output_hw: tuple[int, int] = (0, 0)

    def vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def exact(self) -> float:
        raise NotImplementedError

    def bound(self, exact: bool) -> Scalar:
        if exact:
            return self.exact()
        weight = self.module.weight
        if self.vector is None or self.vector.shape != self.vector_shape():
            self.vector = _normalise(
                torch.randn(self.vector_shape(), device=weight.device, dtype=weight.dtype)
            )
        elif self.vector.device != weight.device or self.vector.dtype != weight.dtype:
            self.vector = self.vector.to(weight.device, weight.dtype)
        sigma, self.vector = power_step(self.apply, self.adjoint, self.vector)
        return sigma


class _LinearOp(_Operator):
    def vector_shape(self) -> tuple[int, ...]:
        return (self.module.out_features,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.weight @ x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.module.weight.t() @ y

    def exact(self) -> float:
        return linear_spectral_norm(self.module.weight)


class _ConvOp(_Operator):
    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.module.out_channels, *self.output_hw)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return conv_apply(self.module, x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return conv_adjoint(self.module, y, self.input_hw)

    def exact(self) -> float:
        return conv_operator_norm(self.module, self.input_hw)


class _Pool(_Node):
    """A pooling layer; its constant depends on the input shape, known after shape tracing."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.value = math.nan

    def set_shapes(self, input_hw: tuple[int, int], output_hw: tuple[int, int]) -> None:
        if isinstance(self.module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            self.value = _maxpool_bound(self.module, input_hw, output_hw)
        else:
            self.value = _avgpool_bound(self.module, input_hw)

    def bound(self, exact: bool) -> Scalar:
        return self.value


def _leaf(module: nn.Module) -> _Node:
    """The node of one layer; raises :class:`UnsupportedLayerError` for anything without a rule."""
    kind = type(module)
    if kind is nn.Sequential:
        return _Chain([_leaf(m) for m in flat_layers(module)])
    if kind is Residual:
        return _Sum(module, _leaf(module.body), _leaf(module.shortcut))
    if kind is nn.Linear:
        return _LinearOp(module)
    if kind is nn.Conv2d:
        _conv_padding(module)
        return _ConvOp(module)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if module.running_var is None:
            raise UnsupportedLayerError(module, "track_running_stats=False depends on the batch")
        return _BatchNorm(module)
    if kind is Normalize:
        if module.buffer_problem() is not None:
            raise UnsupportedLayerError(module, module.buffer_problem())
        return _NormalizeScale(module)
    if kind in _PASS_THROUGH:
        return _Const(1.0)
    if kind in _ACTIVATIONS:
        return _Const(_activation_constant(module))
    if kind in (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        if kind is nn.MaxPool2d and module.return_indices:
            raise UnsupportedLayerError(module, "return_indices=True")
        return _Pool(module)
    raise UnsupportedLayerError(module)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` (naming the layer type) if any layer has no rule."""
    _leaf(model)


def _nodes(node: _Node) -> Iterator[_Node]:
    yield node
    if isinstance(node, _Chain):
        for child in node.children:
            yield from _nodes(child)
    elif isinstance(node, _Sum):
        yield from _nodes(node.body)
        yield from _nodes(node.shortcut)


@dataclass(frozen=True)
class LipschitzEstimate:
    """L bounds the whole logit map; L_sub the map below the last Linear, whose weight is ``last_weight``.

    In training mode ``total`` and ``sub`` are differentiable tensors; in exact mode float64
    tensors without gradient. ``last_weight`` is that layer's own weight parameter. ``sub`` and
    ``last_weight`` are None when the model does not end in a Linear layer (then only the √2
    form of the certificate applies).
    """

    total: torch.Tensor
    sub: torch.Tensor | None
    last_weight: torch.Tensor | None


class LipschitzBound:
    """The layer-wise ℓ2 Lipschitz bound of ``model`` on inputs of shape ``input_shape`` = (C, H, W).

    Building it checks every layer (:class:`UnsupportedLayerError` otherwise) and traces the
    input shape of every convolution and pooling layer with one forward pass of zeros in eval
    mode (the model's train/eval flags are restored). The persistent power-iteration vectors are
    exported by :meth:`state_dict`, keyed by the layer's qualified name, so that a resumed run
    continues the iteration.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model = model
        layers = list(flat_layers(model))
        children = [_leaf(m) for m in layers]
        self._last: _LinearOp | None = None
        self._below: list[_Node] = children
        tail = len(layers)
        while tail > 0 and type(layers[tail - 1]) in _PASS_THROUGH:
            tail -= 1  # dropout, identity, flatten after the last Linear change nothing
        if tail > 0 and isinstance(children[tail - 1], _LinearOp):
            self._last, self._below = children[tail - 1], children[: tail - 1]
        self._root = _Chain(children)
        names = {id(m): name for name, m in model.named_modules()}
        self._operators = {names[id(n.module)]: n for n in _nodes(self._root) if isinstance(n, _Operator)}
        self._trace_shapes(input_shape)

    @property
    def last_linear(self) -> nn.Linear | None:
        """The Linear layer that produces the logits (only pass-through layers after it), if any."""
        return self._last.module if self._last is not None else None

    def _trace_shapes(self, input_shape: tuple[int, ...]) -> None:
        shaped = {id(n.module): n for n in _nodes(self._root) if isinstance(n, (_ConvOp, _Pool))}
        seen: dict[int, tuple[torch.Size, torch.Size]] = {}

        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            shapes = (inputs[0].shape, output.shape)
            if seen.setdefault(id(module), shapes) != shapes:
                raise UnsupportedLayerError(module, "used twice on inputs of different shapes")

        hooks = [node.module.register_forward_hook(record) for node in shaped.values()]
        flags = [(m, m.training) for m in self.model.modules()]
        reference = next(iter(self.model.parameters()), None)
        try:
            self.model.eval()
            with torch.no_grad():
                x = torch.zeros(1, *input_shape)
                if reference is not None:
                    x = x.to(reference.device, reference.dtype)
                self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
            for module, flag in flags:
                module.training = flag
        for key, node in shaped.items():
            in_shape, out_shape = seen[key]
            if isinstance(node, _ConvOp):
                node.input_hw = (int(in_shape[-2]), int(in_shape[-1]))
                node.output_hw = (int(out_shape[-2]), int(out_shape[-1]))
            else:
                node.set_shapes(
                    (int(in_shape[-2]), int(in_shape[-1])), (int(out_shape[-2]), int(out_shape[-1]))
                )

    def compute(self, exact: bool = False) -> LipschitzEstimate:
        """L, L_sub and the last weight; ``exact=False`` does one power step per Linear/Conv2d."""
        if exact:
            with torch.no_grad():
                return self._estimate(exact=True)
        return self._estimate(exact=False)

    def _estimate(self, exact: bool) -> LipschitzEstimate:
        reference = next(iter(self.model.parameters()), None)
        device = reference.device if reference is not None else torch.device("cpu")
        dtype = torch.float64 if exact or reference is None else reference.dtype
        sub = torch.as_tensor(_Chain(self._below).bound(exact), device=device, dtype=dtype)
        if self._last is None:
            return LipschitzEstimate(sub, None, None)
        total = sub * torch.as_tensor(self._last.bound(exact), device=device, dtype=dtype)
        return LipschitzEstimate(total, sub, self._last.module.weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The persistent power-iteration vectors, by qualified layer name."""
        return {
            name: node.vector.detach().clone()
            for name, node in self._operators.items()
            if node.vector is not None
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = set(state) - set(self._operators)
        if unknown:
            raise KeyError(f"power-iteration vectors for unknown layers: {sorted(unknown)}")
        for name, vector in state.items():
            node = self._operators[name]
            node.vector = vector.detach().clone().to(node.module.weight.device, node.module.weight.dtype)


def margin_slopes(y: torch.Tensor, estimate: LipschitzEstimate, classes: int) -> torch.Tensor:
    """(B, K) Lipschitz constants of z_y − z_i: the smaller of √2·L and L_sub·‖w_y − w_i‖ (LMT Props. 1, 2).

    The pairwise distances are computed in float64 without the Gram-matrix shortcut (whose
    cancellation could lose digits) and enlarged by 1e-9 (their rounding is ≲ 1e-15).
    """
    plain = math.sqrt(2.0) * float(estimate.total)
    if estimate.sub is None:
        return torch.full((len(y), classes), plain, dtype=torch.float64)
    weight = estimate.last_weight.detach().double().cpu()
    pairwise = (
        torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist")[y.cpu()]
        * float(estimate.sub)
        * (1 + 1e-9)
    )
    return pairwise.clamp_max(plain)
