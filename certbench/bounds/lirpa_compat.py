"""auto_LiRPA 0.3 on today's torch and numpy: the version check and the compatibility shims, nothing else.

Importing this module checks the installed auto_LiRPA version (anything but a tested
one is refused), applies the compat shims below and only then imports auto_LiRPA.
Tested together: auto_LiRPA 0.3 (the last release, for torch ≤ 1.12 and numpy < 2),
torch 2.14.1, numpy 2.4, Python 3.11. Shims 1–3 act only when what they restore is
missing; 4–11 always act. Torch internals are reached at their torch 2.14 location
(``torch.onnx._internal.torchscript_exporter``).

=====  ==========================================  ===========================================
shim   restores                                    needed since
=====  ==========================================  ===========================================
1      module ``numpy.lib.arraysetops`` (``isin``) numpy 2.0 (module removed)
2      ``torch.onnx.symbolic_helper.               torch 2.x (deprecated in 1.13, later
       _set_opset_version``                        removed; now the exporter's ``GLOBALS``)
3      ``torch._C.Node.__getitem__``               torch 1.13 (old torch.onnx monkey-patched
                                                   it; now ``symbolic_helper._node_get``)
4      a dynamic batch: ONNX shape inference off   seen on torch 2.14, first version unknown
       while auto_LiRPA parses a model             (inference folds ``x.size(0)`` to a constant)
5      ``BoundedModule._named_members(...,         torch 2.0 at the latest (``named_parameters``
       remove_duplicate=...)``                     passes the keyword)
6      CROWN through a ``(1, C, 1, 1)`` or scalar  auto_LiRPA 0.3 itself, any torch: its conv
       constant (``Normalize``, ``Residual``)      (patches) code asserts batch(constant) = B
7      the opset-10–12 symbolics (``torch.gather`` torch 2.x (registered only when their
       as GatherElements, used by loss fusion)     modules are imported; else opset 9's)
8      a gradient for α at 0 and 1 (α-CROWN:       torch ≥ 2 at the latest (``clamp`` passes
       ``BoundRelu._relu_mask_alpha``)             no gradient at its limits; 0.3 starts α there)
9      ``get_optimized_bounds``: a float64 model's auto_LiRPA 0.3 itself, any torch (it casts
       bounds in float64, ``final_shape`` kept     the best bound to the default dtype, and
                                                   sets ``final_shape`` to C's shape)
10     α-CROWN on a layer with more than 90 % of   auto_LiRPA 0.3 itself, any torch (it keeps
       its neurons unstable                        the sparse α's indices with a full α)
11     CROWN's intermediate bounds of a sample     auto_LiRPA 0.3 itself, any torch (sparse
       independent of the rest of its batch        intermediate bounds merge the batch's
                                                   unstable neurons)
=====  ==========================================  ===========================================

Everything auto_LiRPA-specific that a fixed upstream release would make unnecessary lives here, so
that this module can be deleted in one piece; :mod:`certbench.bounds.lirpa` imports it before
auto_LiRPA.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

TESTED_VERSIONS = ("0.3",)


class LiRPAVersionError(ImportError):
    """The installed auto_LiRPA is not a version these shims were tested with."""


def check_version(version: str) -> None:
    """Refuse any auto_LiRPA version the shims were not tested with."""
    if version not in TESTED_VERSIONS:
        raise LiRPAVersionError(
            f"certbench.bounds.lirpa is tested with auto_LiRPA {', '.join(TESTED_VERSIONS)} only, found "
            f"{version}: install auto-LiRPA=={TESTED_VERSIONS[-1]} (pip install --no-deps), or check "
            "every shim in certbench/bounds/lirpa_compat.py against this version and add it to "
            "TESTED_VERSIONS"
        )


# --- compat shims ----------------------------------------------------------------------


def _shim_numpy_arraysetops() -> None:
    """Shim 1: ``auto_LiRPA.operators.base`` does ``from numpy.lib.arraysetops import isin``."""
    try:
        import numpy.lib.arraysetops  # noqa: F401
    except ModuleNotFoundError:
        alias = types.ModuleType("numpy.lib.arraysetops")
        alias.isin = np.isin  # type: ignore[attr-defined]
        sys.modules["numpy.lib.arraysetops"] = alias


def _shim_set_opset_version() -> None:
    """Shim 2: ``parse_graph`` imports ``_set_opset_version`` from ``torch.onnx.symbolic_helper``."""
    import torch.onnx.symbolic_helper as helper

    if hasattr(helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]


def _shim_node_getitem() -> None:
    """Shim 3: ``parse_graph`` reads ONNX node attributes as ``node[name]``."""
    if hasattr(torch._C.Node, "__getitem__"):
        return
    from torch.onnx._internal.torchscript_exporter.symbolic_helper import _node_get

    torch._C.Node.__getitem__ = _node_get  # type: ignore[attr-defined]


def _shim_register_opset_symbolics() -> None:
    """Shim 7: auto_LiRPA parses at opset 12, but torch 2.x registers the exporter's symbolics
    of opsets 10–12 only when their modules are imported; otherwise opset 9's are used, which
    export ``torch.gather`` through ``OneHot`` (unsupported) instead of ``GatherElements``."""
    for opset in (10, 11, 12):
        importlib.import_module(f"torch.onnx._internal.torchscript_exporter.symbolic_opset{opset}")


@contextmanager
def _onnx_shape_inference_off() -> Iterator[None]:
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    previous = GLOBALS.onnx_shape_inference
    GLOBALS.onnx_shape_inference = False
    try:
        yield
    finally:
        GLOBALS.onnx_shape_inference = previous


def _shim_dynamic_batch(bound_general: types.ModuleType) -> None:
    """Shim 4: parse with ONNX shape inference off so that ``x.size(0)`` stays symbolic."""
    parse_module = bound_general.parse_module

    def parse_module_dynamic_batch(*args: Any, **kwargs: Any) -> Any:
        with _onnx_shape_inference_off():
            return parse_module(*args, **kwargs)

    bound_general.parse_module = parse_module_dynamic_batch


def _shim_named_members(bounded_module: type) -> None:
    """Shim 5: accept ``remove_duplicate``; 0.3 always removes duplicates (torch's default)."""
    named_members = bounded_module._named_members

    def _named_members(
        self: nn.Module,
        get_members_fn: Any,
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
    ) -> Any:
        return named_members(self, get_members_fn, prefix, recurse)

    bounded_module._named_members = _named_members


def _shim_patches_times_channel_constant(bound_mul: type) -> None:
    """Shim 6: multiply conv-mode ``Patches`` by a scalar or ``(1, C, 1, 1)`` constant at any batch size.

    ``Normalize`` parses into Sub/Div by buffers shaped ``(1, C, 1, 1)``. Patches hold the
    input channel at dim −3 in both layouts auto_LiRPA uses, ``(spec, B, C, kh, kw)`` and
    ``(out_c, B, out_h, out_w, C, kh, kw)``, so the constant broadcasts as ``(C, 1, 1)``.
    """
    from auto_LiRPA.patches import Patches

    multiply_by_const = bound_mul._multiply_by_const

    def _multiply_by_const(x: Any, const: Any) -> Any:
        if isinstance(x, Patches) and isinstance(const, torch.Tensor):
            if const.numel() == 1:  # a scalar (Residual's scales): any layout
                return x.create_similar(x.patches * const.reshape(()))
            if const.ndim == 4 and const.size(0) == 1 and const.size(2) == const.size(3) == 1:
                return x.create_similar(x.patches * const.view(-1, 1, 1))
        return multiply_by_const(x, const)

    bound_mul._multiply_by_const = staticmethod(_multiply_by_const)


class _UnitClampStraightThrough(torch.autograd.Function):
    """``clamp(α, 0, 1)`` forward, the identity backward (a straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, alpha: torch.Tensor) -> torch.Tensor:
        return alpha.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _shim_relu_alpha_gradient(bound_relu: type) -> None:
    """Shim 8: let α-CROWN's ReLU slopes α move off 0 and 1.

    0.3 starts every α at CROWN's adaptive slope, exactly 0 or 1, and uses ``clamp(α, 0, 1)`` as
    the slope; torch passes no gradient through ``clamp`` at its limits, so every α had a zero
    gradient and ``CROWN-Optimized`` returned CROWN's bound. The slope is still ``clamp(α, 0, 1)``
    (any slope in [0, 1] gives a lower line of ReLU on [l, u] with l < 0 < u, so the bound stays
    valid; 0.3 also clips α to [0, 1] after each step); only its gradient becomes the identity.
    The rest is 0.3's ``_relu_mask_alpha`` as it is: stable neurons get slope 1 (l ≥ 0) or 0 (u ≤ 0).
    """

    def _relu_mask_alpha(
        lower: torch.Tensor,
        upper: torch.Tensor,
        lb_lower_d: torch.Tensor | None,
        ub_lower_d: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        lower_mask = (lower >= 0).requires_grad_(False).to(lower.dtype)
        upper_mask = (upper <= 0).requires_grad_(False)
        zero_coeffs = upper_mask.all()
        no_mask = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
        if lb_lower_d is not None:
            lb_lower_d = _UnitClampStraightThrough.apply(lb_lower_d) * no_mask + lower_mask
        if ub_lower_d is not None:
            ub_lower_d = _UnitClampStraightThrough.apply(ub_lower_d) * no_mask + lower_mask
        return lb_lower_d, ub_lower_d, zero_coeffs

    bound_relu._relu_mask_alpha = staticmethod(_relu_mask_alpha)


def _shim_optimized_bounds_dtype(bounded_module: type) -> None:
    """Shim 9: α-CROWN on a float64 model returns float64 bounds and leaves ``final_shape`` alone.

    At its last iteration ``get_optimized_bounds`` casts the best bounds so far to
    ``torch.get_default_dtype()`` (float32) and then writes that iteration's float64 bounds into
    them where they improved: a float64 model got its bound rounded to nearest in float32 (upwards
    half the time, outside any float64 error allowance), or, once α really moves (shim 8), an
    ``index_put`` dtype error. The call runs with the default dtype set to the input's
    floating-point dtype; a float32 model is bounded exactly as before. It also overwrites the
    module's ``final_shape`` (the model's output shape, which callers read to build C) with
    C's (batch, specs); it is restored after the call.
    """
    get_optimized_bounds = bounded_module.get_optimized_bounds

    def get_optimized_bounds_in_input_dtype(self: nn.Module, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        inputs = x if isinstance(x, (tuple, list)) else (x,)
        dtype = next(
            (t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()),
            torch.get_default_dtype(),
        )
        previous, final_shape = torch.get_default_dtype(), self.final_shape
        torch.set_default_dtype(dtype)
        try:
            return get_optimized_bounds(self, x, *args, **kwargs)
        finally:
            torch.set_default_dtype(previous)
            self.final_shape = final_shape
            self.bound_opts["final_shape"] = final_shape

    bounded_module.get_optimized_bounds = get_optimized_bounds_in_input_dtype


def _shim_full_alpha_indices(bound_relu: type) -> None:
    """Shim 10: a full α of a ReLU layer comes without the indices of a sparse one.

    ``BoundRelu.init_opt_parameters`` stores α only for the unstable neurons of a layer and their
    indices in ``alpha_indices``, unless more than 90 % are unstable: then α covers the whole
    layer, but the line that clears ``alpha_indices`` sits under ``if verbosity > 0``, so the
    backward pass scattered the full α into the unstable positions and failed ("shape mismatch").
    After the call, the indices are cleared when α has the layer's full shape (a sparse α's
    feature shape is one dimension of fewer entries than the layer has, so the two never agree).
    """
    init_opt_parameters = bound_relu.init_opt_parameters

    def init_opt_parameters_full_alpha(self: nn.Module, start_nodes: Any) -> None:
        init_opt_parameters(self, start_nodes)
        alpha = next(iter(self.alpha.values()), None)
        if self.alpha_indices is not None and alpha is not None and alpha.shape[3:] == tuple(self.shape):
            self.alpha_indices = None

    bound_relu.init_opt_parameters = init_opt_parameters_full_alpha


def _shim_per_sample_sparse_bounds(bounded_module: type) -> None:
    """Shim 11: CROWN's intermediate bounds of a sample do not depend on the rest of its batch.

    With ``sparse_intermediate_bounds`` (0.3's default), CROWN bounds only the neurons of a layer that
    a reference interval (IBP from the bounds already found) leaves unstable, and keeps the reference
    interval for the others; but it takes the union of the unstable neurons over the whole batch,
    so a neuron stable for one sample got that sample's CROWN interval whenever it was unstable for
    another. CROWN's interval is not always inside IBP's, so a neuron IBP proves stable could turn
    unstable, and a sample's bounds depended on its batch (130 vs 131 of 256 samples certified,
    batched vs one at a time). After the scatter, every neuron the reference proves stable for a
    sample gets the reference interval back, which is what that sample alone gets. 0.3 also bounds
    a layer densely (every neuron by CROWN, no reference kept) once the union holds more than
    ``minimum_sparsity`` (90 %) of its neurons, again a choice made on the batch: while it chooses
    the C matrix of an intermediate bound, ``minimum_sparsity`` reads 1 (α's own choice of a sparse
    layout, which reads it too, is left alone). With both, a sample's CROWN bounds are those it gets
    alone (up to float rounding). The reference is a valid interval, so the bounds stay valid.
    """
    restore_sparse_bounds = bounded_module.restore_sparse_bounds
    get_sparse_c = bounded_module.get_sparse_C

    def get_sparse_c_never_dense(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        previous = self.bound_opts.get("minimum_sparsity", 0.9)
        self.bound_opts["minimum_sparsity"] = 1.0
        try:
            return get_sparse_c(self, *args, **kwargs)
        finally:
            self.bound_opts["minimum_sparsity"] = previous

    def restore_sparse_bounds_per_sample(
        self: nn.Module,
        node: Any,
        unstable_idx: Any,
        unstable_size: Any,
        ref_lower: torch.Tensor,
        ref_upper: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        restore_sparse_bounds(self, node, unstable_idx, unstable_size, ref_lower, ref_upper, *args, **kwargs)
        if unstable_size == 0:
            return
        stable = ((ref_lower >= 0) | (ref_upper <= 0)).view(node.lower.shape)
        node.lower = torch.where(stable, ref_lower.detach().view(node.lower.shape), node.lower)
        node.upper = torch.where(stable, ref_upper.detach().view(node.upper.shape), node.upper)

    bounded_module.restore_sparse_bounds = restore_sparse_bounds_per_sample
    bounded_module.get_sparse_C = get_sparse_c_never_dense


check_version(importlib.metadata.version("auto_LiRPA"))
_shim_numpy_arraysetops()
_shim_set_opset_version()
_shim_node_getitem()
_shim_register_opset_symbolics()

import auto_LiRPA  # noqa: E402
import auto_LiRPA.bound_general  # noqa: E402
import auto_LiRPA.operators  # noqa: E402
from auto_LiRPA import BoundedModule  # noqa: E402

_shim_dynamic_batch(auto_LiRPA.bound_general)
_shim_named_members(BoundedModule)
_shim_patches_times_channel_constant(auto_LiRPA.operators.BoundMul)
_shim_relu_alpha_gradient(auto_LiRPA.operators.BoundRelu)
_shim_full_alpha_indices(auto_LiRPA.operators.BoundRelu)
_shim_optimized_bounds_dtype(BoundedModule)
_shim_per_sample_sparse_bounds(BoundedModule)
