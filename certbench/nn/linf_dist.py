"""ℓ∞-dist neurons (Zhang et al., ICML 2021; v2 ICLR 2022): the layers.

A layer computes ``y_j = ‖x − w_j‖_p (+ b_j)`` (paper eq. (1)); at ``p = ∞`` every unit is
1-Lipschitz in ℓ∞, so an ℓ∞-dist net with logits ``−y`` certifies ``‖δ‖∞ < margin / 2``
(paper Prop. 3.1 / Thm. 3.2). Training starts at ``p = 8`` and raises ``p`` to ∞; for finite
``p`` a unit is ``n_in^{1/p}``-Lipschitz in ℓ∞ (Hölder), which
:func:`certbench.bounds.linf_dist.lipschitz_linf` accounts for.

The distance is an autograd function that never builds the ``B × out × in`` difference
tensor: a compiled CPU kernel (``linf_dist_kernel.cpp``, built on first use with the system C++
compiler, float32), Triton kernels on CUDA (``linf_dist_triton.py``, float32, once triton
imports and the kernels pass a self-check) or chunked PyTorch (any device or dtype: the
reference, and the fallback) recompute the differences in the backward pass. Finite ``p`` is
evaluated as ``m·(Σ(|d|/m)^p)^{1/p}`` with ``m = max|d|`` so that float32 neither overflows nor
underflows at large ``p``; ``p = ∞`` back-propagates through the argmax alone (a sparse scatter,
the same for every backend).

Each layer's ``interval`` is exact (the box maximiser and minimiser of ``|x_i − w_ji|`` are
independent per coordinate, :func:`lp_distance_bounds`); the whole-network bounds built on them
are in :mod:`certbench.bounds.linf_dist`.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable
from functools import cache, partial
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "LinfDist",
    "MeanShift",
    "Negate",
    "identity_init_",
    "kernel_available",
    "lp_distance",
    "lp_distance_bounds",
    "set_p",
]

_KERNEL_SOURCE = Path(__file__).with_name("linf_dist_kernel.cpp")
_MIN_CHUNK_ELEMENTS = 1 << 18

# (x, w, p, with_index) → (y, argmax or None) and (x, w, g, y, p) → (∂x, ∂w): each backend's pair
Forward = Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor | None]]
Backward = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# compiled CPU kernel (optional)
# --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("CERTBENCH_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "certbench"


def _cpu_signature() -> str:
    """CPU model and flags: a library built with ``-march=native`` only runs where it was built."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features"))}))
    except OSError:
        return platform.processor()


def _build(compiler: str, source: Path, target: Path, native: bool) -> None:
    """Compile with ``-ffast-math`` (vectorised exp2/log2) but link without it (no crtfastmath.o)."""
    arch = ["-march=native"] if native else []
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        subprocess.run(
            [
                compiler,
                "-std=c++17",
                "-O3",
                "-ffast-math",
                "-fopenmp-simd",
                "-fPIC",
                *arch,
                "-c",
                str(source),
                "-o",
                str(obj),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [compiler, "-shared", str(obj), "-o", str(lib), "-lm", "-pthread"],
            check=True,
            capture_output=True,
        )
        os.replace(lib, target)  # atomic: concurrent jobs may build the same library


@cache
def _kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (set ``CERTBENCH_LINF_KERNEL=0`` to force PyTorch)."""
    if os.environ.get("CERTBENCH_LINF_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    source = _KERNEL_SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"linf_dist_{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                _build(compiler, _KERNEL_SOURCE, target, native=True)
            except subprocess.CalledProcessError:
                _build(compiler, _KERNEL_SOURCE, target, native=False)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", b"") or b""
        warnings.warn(
            f"ℓ∞-dist CPU kernel unavailable, using PyTorch ({err} {detail.decode()[:200]})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    ptr, i64, dbl, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.linf_dist_forward.argtypes = [ptr, ptr, i64, i64, i64, dbl, i32, ptr, ptr, i32]
    lib.linf_dist_forward.restype = None
    lib.linf_dist_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, dbl, ptr, ptr, i32]
    lib.linf_dist_backward.restype = None
    failure = _self_check(lib)
    if failure:
        warnings.warn(
            f"ℓ∞-dist CPU kernel disagrees with PyTorch ({failure}); using PyTorch",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return lib


def _self_check(lib: ctypes.CDLL) -> str:
    """Compare the freshly loaded kernel with the PyTorch path (guards against a miscompiling
    toolchain); return what disagrees, or ''."""
    return _disagreement_with_torch(
        partial(_kernel_forward, lib=lib), partial(_kernel_backward, lib=lib), torch.device("cpu")
    )


def _disagreement_with_torch(forward: Forward, backward: Backward, device: torch.device) -> str:
    """Run a float32 ``forward``/``backward`` pair on ``device`` against the PyTorch path in float64
    on a small problem; return what disagrees, or ''."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*shape, generator=gen) for shape in ((5, 37), (21, 37), (5, 21)))
    x64, w64, g64 = x.double(), w.double(), g.double()
    x, w, g = x.to(device), w.to(device), g.to(device)
    for p in (math.inf, 1.0, 8.0, 8.5, 300.0):
        y, idx = forward(x, w, p, True)
        y_ref, idx_ref = _torch_forward(x64, w64, p, with_index=True)
        if not torch.allclose(y.double().cpu(), y_ref, rtol=1e-5) or (
            idx is not None and not torch.equal(idx.cpu(), idx_ref)
        ):
            return f"forward at p={p:g}"
        if not math.isinf(p):
            grads = backward(x, w, g, y, p)
            for ours, ref in zip(grads, _torch_backward(x64, w64, g64, y_ref, p)):
                ours = ours.double().cpu()
                if not torch.allclose(ours, ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max())):
                    return f"backward at p={p:g}"
    return ""


def kernel_available() -> bool:
    """Whether the compiled CPU kernel is in use for float32 CPU tensors."""
    return _kernel() is not None


def use_kernel(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _kernel() is not None


def _kernel_forward(
    x: Tensor, w: Tensor, p: float, with_index: bool, lib: ctypes.CDLL | None = None
) -> tuple[Tensor, Tensor | None]:
    lib = lib or _kernel()
    x, w = x.contiguous(), w.contiguous()
    (b, n_in), n_out = x.shape, w.shape[0]
    y = x.new_empty(b, n_out)
    idx = torch.empty(b, n_out, dtype=torch.int64) if with_index and math.isinf(p) else None
    lib.linf_dist_forward(
        x.data_ptr(),
        w.data_ptr(),
        b,
        n_out,
        n_in,
        0.0 if math.isinf(p) else p,
        int(math.isinf(p)),
        y.data_ptr(),
        None if idx is None else idx.data_ptr(),
        torch.get_num_threads(),
    )
    return y, idx


def _kernel_backward(
    x: Tensor, w: Tensor, g: Tensor, y: Tensor, p: float, lib: ctypes.CDLL | None = None
) -> tuple[Tensor, Tensor]:
    lib = lib or _kernel()
    x, w, g, y = (t.contiguous() for t in (x, w, g, y))
    (b, n_in), n_out = x.shape, w.shape[0]
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    lib.linf_dist_backward(
        x.data_ptr(),
        w.data_ptr(),
        g.data_ptr(),
        y.data_ptr(),
        b,
        n_out,
        n_in,
        p,
        gx.data_ptr(),
        gw.data_ptr(),
        torch.get_num_threads(),
    )
    return gx, gw


# --------------------------------------------------------------------------------------------
# Triton kernels on CUDA (optional)
# --------------------------------------------------------------------------------------------


@cache
def _triton_kernels() -> ModuleType | None:
    """The Triton kernels (``linf_dist_triton.py``) once they pass the self-check on the current
    CUDA device, or None (then chunked PyTorch, with a warning)."""
    try:
        from certbench.nn import linf_dist_triton

        failure = _disagreement_with_torch(
            linf_dist_triton.forward, linf_dist_triton.backward, torch.device("cuda")
        )
    except Exception as err:  # no triton, no C compiler for its launcher, a GPU it does not support
        failure = f"{type(err).__name__}: {str(err)[:200]}"
    if failure:
        warnings.warn(
            f"ℓ∞-dist Triton kernels unavailable ({failure}); using chunked PyTorch on CUDA",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return linf_dist_triton


def _triton_for(*tensors: Tensor) -> ModuleType | None:
    """The Triton kernels if every tensor is float32 on CUDA and the kernels work, else None
    (CPU tensors never import triton)."""
    on_cuda = all(t.device.type == "cuda" and t.dtype == torch.float32 for t in tensors)
    return _triton_kernels() if on_cuda else None


# --------------------------------------------------------------------------------------------
# chunked PyTorch path
# --------------------------------------------------------------------------------------------


def _chunks(b: int, n_out: int, n_in: int, minimum: int = _MIN_CHUNK_ELEMENTS) -> Iterable[slice]:
    """Output slices whose ``b × rows × n_in`` temporary stays within ``O(b·n_out + n_out·n_in)``
    (at least ``minimum`` elements)."""
    budget = max(b * n_out + n_out * n_in, minimum)
    rows = max(1, min(n_out, budget // max(1, b * n_in)))
    return (slice(s, min(s + rows, n_out)) for s in range(0, n_out, rows))


def _pow_(t: Tensor, e: float) -> Tensor:
    """``t ← t^e`` in place; integer ``e ≤ 64`` by repeated squaring (elementwise ``pow`` with a
    general exponent is several times slower on the CPU; the schedule spends long at p = 8)."""
    if e != math.floor(e) or not 0 <= e <= 64:
        return t.pow_(e)
    n = int(e)
    if n == 0:
        return t.fill_(1.0)
    result = t.clone()
    for bit in bin(n)[3:]:
        result.mul_(result)
        if bit == "1":
            result.mul_(t)
    return t.copy_(result)


def _pnorm_(a: Tensor, p: float) -> Tensor:
    """``‖a‖_p`` over the last dimension of ``a ≥ 0`` as ``m·(Σ(a/m)^p)^{1/p}``; overwrites ``a``."""
    if math.isinf(p):
        return a.amax(-1)
    m = a.amax(-1, keepdim=True)
    s = _pow_(a.div_(m.clamp_min(torch.finfo(a.dtype).tiny)), p).sum(-1)
    return m.squeeze(-1) * s.pow(1.0 / p)


def _torch_forward(x: Tensor, w: Tensor, p: float, with_index: bool) -> tuple[Tensor, Tensor | None]:
    y = x.new_empty(x.shape[0], w.shape[0])
    idx = torch.empty_like(y, dtype=torch.int64) if with_index and math.isinf(p) else None
    for sl in _chunks(x.shape[0], w.shape[0], x.shape[1]):
        a = (x[:, None, :] - w[None, sl]).abs_()
        if idx is None:
            y[:, sl] = _pnorm_(a, p)
        else:
            y[:, sl], idx[:, sl] = a.max(-1)
    return y, idx


def _torch_backward(x: Tensor, w: Tensor, g: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``∂‖d‖_p/∂d_i = sign(d_i)·(|d_i|/‖d‖_p)^{p−1}`` with ``d = x − w_j``, summed chunk by chunk."""
    gx, gw = torch.zeros_like(x), torch.empty_like(w)
    inv = 1.0 / y.clamp_min(torch.finfo(y.dtype).tiny)
    for sl in _chunks(x.shape[0], w.shape[0], x.shape[1]):
        d = x[:, None, :] - w[None, sl]
        t = _pow_(d.abs().mul_(inv[:, sl, None]), p - 1.0).mul_(d.sign_()).mul_(g[:, sl, None])
        gx += t.sum(1)
        gw[sl] = -t.sum(0)
    return gx, gw


def _backend(*tensors: Tensor) -> tuple[Forward, Backward]:
    """The compiled kernel for float32 CPU tensors, Triton for float32 CUDA tensors, else PyTorch."""
    if use_kernel(*tensors):
        return _kernel_forward, _kernel_backward
    kernels = _triton_for(*tensors)
    return (kernels.forward, kernels.backward) if kernels is not None else (_torch_forward, _torch_backward)


class _LpDistance(torch.autograd.Function):
    """``y[b, j] = ‖x_b − w_j‖_p`` without a ``B × out × in`` temporary in either pass."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, p: float, need_grad: bool) -> Tensor:  # type: ignore[override]
        fwd, _ = _backend(x, w)
        y, idx = fwd(x, w, p, need_grad)
        ctx.p = p
        ctx.save_for_backward(x, w, idx if math.isinf(p) else y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, saved = ctx.saved_tensors
        if math.isinf(ctx.p):
            # sparse: only the argmax coordinate of each (b, j) pair receives ±g[b, j]
            idx = saved
            v = g * torch.sign(x.gather(1, idx) - w.gather(1, idx.t()).t())
            gx = torch.zeros_like(x).scatter_add_(1, idx, v)
            gw = torch.zeros_like(w).scatter_add_(1, idx.t(), -v.t())
        else:
            _, bwd = _backend(x, w, g)
            gx, gw = bwd(x, w, g.to(x.dtype), saved, ctx.p)
        return gx, gw, None, None


def _check_p(p: float) -> float:
    p = float(p)
    if not p >= 1.0:  # also rejects NaN
        raise ValueError(f"p must be ≥ 1 (or inf), got {p}")
    return p


def lp_distance(x: Tensor, weight: Tensor, p: float) -> Tensor:
    """``‖x_b − w_j‖_p`` for ``x`` of shape (B, in) and ``weight`` (out, in) → (B, out)."""
    p = _check_p(p)
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"input ({x.dtype}, {x.device}) and weight ({weight.dtype}, {weight.device}) differ")
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LpDistance.apply(x, weight, p, need_grad)


@torch.no_grad()
def lp_distance_bounds(lower: Tensor, upper: Tensor, weight: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Exact bounds of ``‖x − w_j‖_p`` over the box ``lower ≤ x ≤ upper`` (not differentiable).

    The norm increases in every ``|x_i − w_ji|`` and the box is a product, so the extremes are
    attained coordinate-wise: ``max(|l_i − w_ji|, |u_i − w_ji|)`` above and
    ``max(l_i − w_ji, w_ji − u_i, 0)`` below.
    """
    p = _check_p(p)
    lo = lower.new_empty(lower.shape[0], weight.shape[0])
    hi = torch.empty_like(lo)
    for sl in _chunks(lower.shape[0], weight.shape[0], lower.shape[1]):
        below = lower[:, None, :] - weight[None, sl]
        above = upper[:, None, :] - weight[None, sl]
        hi[:, sl] = _pnorm_(torch.maximum(below.abs(), above.abs()), p)
        lo[:, sl] = _pnorm_(torch.maximum(below, above.neg_()).clamp_min_(0.0), p)
    return lo, hi


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


def identity_init_(weight: Tensor, value: float | None = 10.0) -> Tensor:
    """``w ~ N(0, 1)``; if ``n_in ≤ n_out`` also ``w[i, i mod n_in] = −value`` (identity-like init)."""
    with torch.no_grad():
        weight.normal_()
        n_out, n_in = weight.shape
        if value is not None and n_in <= n_out:
            rows = torch.arange(n_out, device=weight.device)
            weight[rows, rows % n_in] = -value
    return weight


class LinfDist(nn.Module):
    """``y_j = ‖x − w_j‖_p + b_j`` on inputs (B, in); ``p`` may be changed at any time (schedules).

    ``p`` is saved with the state dict (as extra state) so a reloaded model is the trained one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        p: float = math.inf,
        identity_value: float | None = 10.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.identity_value = identity_value
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.p = p
        self.reset_parameters()

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_p(value)

    def reset_parameters(self) -> None:
        identity_init_(self.weight, self.identity_value)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = lp_distance(x, self.weight, self.p)
        return y if self.bias is None else y + self.bias

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = lp_distance_bounds(lower, upper, self.weight, self.p)
        return (lo, hi) if self.bias is None else (lo + self.bias, hi + self.bias)

    def lipschitz_linf(self) -> float:
        """ℓ∞→ℓ∞ Lipschitz constant of the layer: ``n_in^{1/p}`` (exactly 1 at ``p = ∞``)."""
        return self.in_features ** (1.0 / self.p)

    def get_extra_state(self) -> dict[str, float]:
        return {"p": self.p}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.p = state["p"]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, p={self.p:g}"
        )


class MeanShift(nn.Module):
    """``x − mean``: the batch mean over every dimension but 1 in training, the running mean
    (momentum 0.1, as BatchNorm) at inference. No scaling and no affine map, so the layer is a
    translation and keeps every Lipschitz constant (paper §4, "normalisation")."""

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.momentum = num_features, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))

    def _shape(self, x: Tensor) -> list[int]:
        return [1, self.num_features] + [1] * (x.dim() - 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = x.mean(dim=[d for d in range(x.dim()) if d != 1])
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(self._shape(x))

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            raise RuntimeError("MeanShift bounds need eval mode: the batch mean depends on the batch")
        shift = self.running_mean.view(self._shape(lower))
        return lower - shift, upper - shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}"


class Negate(nn.Module):
    """``−x``: ℓ∞-dist nets output distances, logits are their negatives."""

    def forward(self, x: Tensor) -> Tensor:
        return -x

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        return -upper, -lower


def set_p(model: nn.Module, p: float) -> None:
    """Set ``p`` on every :class:`LinfDist` layer of ``model``."""
    for m in model.modules():
        if isinstance(m, LinfDist):
            m.p = p
