"""Triton kernels for the ℓp-distance layer on CUDA, float32 (Zhang et al., ICML 2021, eq. (1)).

``y[b, j] = ‖x_b − w_j‖_p`` has the shape of a matrix product, ``x·wᵀ``, with ``|x_bi − w_ji|``
in place of the product and a max (``p = ∞``) or a sum of powers (finite ``p``) in place of the
sum. The kernels are tiled like a GEMM, as the authors' CUDA kernel is: a program owns a
``BLOCK_B × BLOCK_OUT`` tile of outputs and walks the inputs ``BLOCK_IN`` coordinates at a time,
each loaded ``x`` and ``w`` value serving a whole row or column of the tile; no
``B × out × in`` difference tensor is ever stored. Partial maxima and sums are kept per tile
position and reduced across the ``BLOCK_IN`` lanes once, after the walk.

Arithmetic, the same as the chunked PyTorch reference in :mod:`certbench.nn.linf_dist`:

* ``p = ∞``: ``y = max_i |x_i − w_ji|``: each difference is one float32 subtraction, rounded
  once; ``|·|`` and the max are exact (no fused or reassociated operation touches them), and the
  bias is added afterwards by the layer, rounded once. :mod:`certbench.bounds.rounding` relies on
  exactly this. With ``with_index`` the forward pass also stores the argmax (as the authors'
  kernel does, rather than recomputing it), the **first** (smallest) coordinate among tied
  maxima, as ``torch.max`` and the CPU kernel do; the backward pass sends each ``g[b, j]`` to
  that one coordinate with the sign of its difference (0 where the difference is 0). That pass
  is O(B·out), not O(B·out·in), and stays the reference's gather/scatter, shared by every
  backend: ``scatter_add_`` is deterministic under ``torch.use_deterministic_algorithms``
  (which training turns on), where a Triton scatter would need float atomics.
* finite ``p``: ``y = m·(Σ_i (|d_i|/m)^p)^{1/p}`` with ``m = max_i |d_i|`` (a first walk for
  ``m``, a second for the sum), so float32 neither overflows nor underflows at large ``p``;
  the gradient is ``∂y/∂d_i = sign(d_i)·(|d_i|/y)^{p−1}``, recomputed from ``x`` and ``w`` by two
  kernels, one reducing over outputs (``∂/∂x``), one over the batch (``∂/∂w``): no atomics, so
  the result does not depend on scheduling. Integer exponents up to 64 are evaluated by repeated
  squaring (as the reference's ``_pow_``), others as ``exp2(e·log2 t)`` with PTX's approximate
  ``lg2``/``ex2`` on NVIDIA GPUs (absolute errors of order 2^-22 in the exponent, like the
  float32 rounding of ``|d|/y`` that the power amplifies ``p`` times in the reference too); ties
  in ``m`` change nothing (``m`` only scales).

The kernels run on the GPU of their tensors; with ``TRITON_INTERPRET=1`` set before this module
is imported they run on CPU tensors through Triton's interpreter (the tests do that).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["backward", "forward"]

# Tile sizes: outputs per program (batch × out) and input coordinates per step of the walk.
BLOCK_B, BLOCK_OUT, BLOCK_IN = 32, 32, 8
_LARGEST_SQUARED_EXPONENT = 64
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


def _integer_exponent(e: float) -> int:
    """``e`` itself where powers ``t^e`` are evaluated by repeated squaring (an integer in
    ``[0, 64]``: one kernel is compiled per such ``e``), else −1 (``exp2(e·log2 t)``)."""
    return int(e) if e == math.floor(e) and 0 <= e <= _LARGEST_SQUARED_EXPONENT else -1


@triton.jit
def _log2(t, PTX_LOG2: tl.constexpr):
    """``log2 t`` for normal ``t > 0``: PTX ``lg2.approx`` (one instruction, absolute error
    of order 2^-22) on NVIDIA GPUs, where ``tl.log2`` is libdevice's ~20-instruction ``log2f``."""
    if PTX_LOG2:
        result = tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        result = tl.log2(t)
    return result


@triton.jit
def _power(t, e, E_INT: tl.constexpr, PTX_LOG2: tl.constexpr):
    """``t^e`` for ``t ≥ 0``: by repeated squaring when ``E_INT ≥ 0`` (then ``E_INT == e``), else
    ``exp2(e·log2 t)`` (0 at ``t = 0``)."""
    if E_INT >= 0:
        result = tl.full(t.shape, 1.0, tl.float32)
        square = t
        for bit in tl.static_range(7):  # 2^7 > _LARGEST_SQUARED_EXPONENT
            if (E_INT >> bit) & 1:
                result = result * square
            if (E_INT >> bit) > 1:
                square = square * square
    else:
        result = tl.where(t > 0, tl.exp2(e * _log2(tl.maximum(t, _TINY), PTX_LOG2)), 0.0)
    return result


@triton.jit
def _load_rows(ptr, rows, n_rows, cols, n_cols, outside=0.0):
    """``ptr[rows, cols]`` of a row-major ``n_rows × n_cols`` matrix, ``outside`` outside it."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=outside)


@triton.jit
def _differences(x_ptr, w_ptr, rows_b, rows_o, cols, n_batch, n_out, n_in):
    """``x[b, i] − w[j, i]`` on a ``(BLOCK_B, BLOCK_OUT, BLOCK_IN)`` tile (0 outside the matrices)."""
    x = _load_rows(x_ptr, rows_b, n_batch, cols, n_in)
    w = _load_rows(w_ptr, rows_o, n_out, cols, n_in)
    return x[:, None, :] - w[None, :, :]


@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    index_ptr,
    n_batch,
    n_out,
    n_in,
    p,
    P_INT: tl.constexpr,
    PTX_LOG2: tl.constexpr,
    P_IS_INF: tl.constexpr,
    WITH_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``y`` (and, ``WITH_INDEX``, the first argmax) on a ``BLOCK_B × BLOCK_OUT`` tile: a walk for
    the max, and for finite ``p`` a second one for the scaled sum of powers."""
    rows_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_o = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    lanes = tl.arange(0, BLOCK_IN)
    largest = tl.zeros([BLOCK_B, BLOCK_OUT, BLOCK_IN], tl.float32)
    if WITH_INDEX:  # each lane keeps the step of its first maximum (strict ">")
        best_start = tl.zeros([BLOCK_B, BLOCK_OUT, BLOCK_IN], tl.int32)
    for start in range(0, n_in, BLOCK_IN):
        a = tl.abs(_differences(x_ptr, w_ptr, rows_b, rows_o, start + lanes, n_batch, n_out, n_in))
        if WITH_INDEX:
            best_start = tl.where(a > largest, start, best_start)
        largest = tl.maximum(largest, a)
    m = tl.max(largest, axis=2)
    if WITH_INDEX:  # the first lane that holds the maximum
        index = tl.min(tl.where(largest == m[:, :, None], best_start + lanes[None, None, :], n_in), axis=2)
    if not P_IS_INF:
        inverse = (1.0 / tl.maximum(m, _TINY))[:, :, None]
        total = tl.zeros([BLOCK_B, BLOCK_OUT, BLOCK_IN], tl.float32)
        for start in range(0, n_in, BLOCK_IN):
            a = tl.abs(_differences(x_ptr, w_ptr, rows_b, rows_o, start + lanes, n_batch, n_out, n_in))
            total += _power(a * inverse, p, P_INT, PTX_LOG2)
        m = m * _power(tl.sum(total, axis=2), 1.0 / p, -1, PTX_LOG2)
    mask = (rows_b < n_batch)[:, None] & (rows_o < n_out)[None, :]
    offsets = rows_b.to(tl.int64)[:, None] * n_out + rows_o[None, :]
    tl.store(y_ptr + offsets, m, mask=mask)
    if WITH_INDEX:
        tl.store(index_ptr + offsets, index.to(tl.int64), mask=mask)


@triton.jit
def _gradient_terms(
    x_ptr,
    w_ptr,
    g_ptr,
    y_ptr,
    rows_b,
    rows_o,
    cols,
    n_batch,
    n_out,
    n_in,
    e,
    E_INT: tl.constexpr,
    PTX_LOG2: tl.constexpr,
):
    """``g[b, j]·sign(d)·(|d|/y[b, j])^e`` with ``d = x[b, i] − w[j, i]`` on a tile (``e = p − 1``)."""
    d = _differences(x_ptr, w_ptr, rows_b, rows_o, cols, n_batch, n_out, n_in)
    g = _load_rows(g_ptr, rows_b, n_batch, rows_o, n_out)
    # 1/y = 0 outside the output: there d is not a difference of real rows and must not overflow
    inverse = 1.0 / tl.maximum(_load_rows(y_ptr, rows_b, n_batch, rows_o, n_out, float("inf")), _TINY)
    sign = (d > 0).to(tl.float32) - (d < 0).to(tl.float32)
    return sign * _power(tl.abs(d) * inverse[:, :, None], e, E_INT, PTX_LOG2) * g[:, :, None]


@triton.jit
def _input_gradient_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    y_ptr,
    gx_ptr,
    n_batch,
    n_out,
    n_in,
    e,
    E_INT: tl.constexpr,
    PTX_LOG2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``gx[b, i] = Σ_j`` (gradient terms): a ``BLOCK_B × BLOCK_IN`` tile per program, all outputs."""
    rows_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    total = tl.zeros([BLOCK_B, BLOCK_OUT, BLOCK_IN], tl.float32)
    for start in range(0, n_out, BLOCK_OUT):
        rows_o = start + tl.arange(0, BLOCK_OUT)
        total += _gradient_terms(
            x_ptr, w_ptr, g_ptr, y_ptr, rows_b, rows_o, cols, n_batch, n_out, n_in, e, E_INT, PTX_LOG2
        )
    mask = (rows_b < n_batch)[:, None] & (cols < n_in)[None, :]
    tl.store(gx_ptr + rows_b.to(tl.int64)[:, None] * n_in + cols[None, :], tl.sum(total, axis=1), mask=mask)


@triton.jit
def _weight_gradient_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    y_ptr,
    gw_ptr,
    n_batch,
    n_out,
    n_in,
    e,
    E_INT: tl.constexpr,
    PTX_LOG2: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    """``gw[j, i] = −Σ_b`` (gradient terms): a ``BLOCK_OUT × BLOCK_IN`` tile per program, all inputs."""
    rows_o = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    total = tl.zeros([BLOCK_B, BLOCK_OUT, BLOCK_IN], tl.float32)
    for start in range(0, n_batch, BLOCK_B):
        rows_b = start + tl.arange(0, BLOCK_B)
        total += _gradient_terms(
            x_ptr, w_ptr, g_ptr, y_ptr, rows_b, rows_o, cols, n_batch, n_out, n_in, e, E_INT, PTX_LOG2
        )
    mask = (rows_o < n_out)[:, None] & (cols < n_in)[None, :]
    tl.store(gw_ptr + rows_o.to(tl.int64)[:, None] * n_in + cols[None, :], -tl.sum(total, axis=0), mask=mask)


def _ptx(t: Tensor) -> bool:
    """Whether kernels for ``t`` are compiled to PTX (CUDA, not ROCm, nor the interpreter's CPU tensors)."""
    return t.is_cuda and torch.version.hip is None


def _on_device_of(t: Tensor) -> torch.cuda.device:
    """Launch on ``t``'s GPU, whichever is current (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device.index if t.is_cuda else -1)


def forward(x: Tensor, w: Tensor, p: float, with_index: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, argmax)``: ``y[b, j] = ‖x_b − w_j‖_p``; the first argmax of ``|x_b − w_j|`` when ``p = ∞``
    and ``with_index``, else None. Same contract as the reference's ``_torch_forward``."""
    x, w = x.contiguous(), w.contiguous()
    (n_batch, n_in), n_out = x.shape, w.shape[0]
    infinite = math.isinf(p)
    y = x.new_empty(n_batch, n_out)
    index = torch.empty_like(y, dtype=torch.int64) if with_index and infinite else None
    grid = (triton.cdiv(n_batch, BLOCK_B), triton.cdiv(n_out, BLOCK_OUT))
    with _on_device_of(x):
        _forward_kernel[grid](
            x,
            w,
            y,
            index,
            n_batch,
            n_out,
            n_in,
            1.0 if infinite else p,
            P_INT=-1 if infinite else _integer_exponent(p),
            PTX_LOG2=_ptx(x),
            P_IS_INF=infinite,
            WITH_INDEX=index is not None,
            BLOCK_B=BLOCK_B,
            BLOCK_OUT=BLOCK_OUT,
            BLOCK_IN=BLOCK_IN,
        )
    return y, index


def backward(x: Tensor, w: Tensor, g: Tensor, y: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``(∂L/∂x, ∂L/∂w)`` for finite ``p`` from the upstream gradient ``g`` and the forward output
    ``y``. Same contract as the reference's ``_torch_backward``."""
    x, w, g, y = (t.contiguous() for t in (x, w, g, y))
    (n_batch, n_in), n_out = x.shape, w.shape[0]
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    e = p - 1.0
    options = {
        "E_INT": _integer_exponent(e),
        "PTX_LOG2": _ptx(x),
        "BLOCK_B": BLOCK_B,
        "BLOCK_OUT": BLOCK_OUT,
        "BLOCK_IN": BLOCK_IN,
    }
    with _on_device_of(x):
        _input_gradient_kernel[(triton.cdiv(n_batch, BLOCK_B), triton.cdiv(n_in, BLOCK_IN))](
            x, w, g, y, gx, n_batch, n_out, n_in, e, **options
        )
        _weight_gradient_kernel[(triton.cdiv(n_out, BLOCK_OUT), triton.cdiv(n_in, BLOCK_IN))](
            x, w, g, y, gw, n_batch, n_out, n_in, e, **options
        )
    return gx, gw
