"""auto_LiRPA 0.3 on today's torch and numpy: the version check and the compatibility shims, nothing else.

Importing this module checks the installed auto_LiRPA version (anything but a tested
one is refused), applies the compat shims below and only then imports auto_LiRPA.
Tested together: auto_LiRPA 0.3 (the last release, for torch ≤ 1.12 and numpy < 2),
torch 2.14.1, numpy 2.4, Python 3.11. Shims 1–3 act only when what they restore is
missing; 4–7 always act. Torch internals are reached at their torch 2.14 location
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
