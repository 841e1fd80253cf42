"""Checks every certificate makes before its own: no hooks, no patched forward, valid Normalize buffers.

A certificate's bound is proven for the layers' own ``forward``. A forward hook or pre-hook can
change what a module computes (rescale, clip, replace its output), a backward hook what training
and gradient attacks see, and an instance attribute ``forward`` replaces the method outright:
none of this is visible to a rule that reads the layer's type and weights, so a model with any of
them is refused. The global hooks of :mod:`torch.nn.modules.module` apply to every module.
:class:`~certbench.nn.Normalize` buffers are read by the bounds as they are at certification time
and must then be finite with ``std > 0``.
"""

from __future__ import annotations

import torch.nn.modules.module as module_globals
from torch import nn

from certbench.nn import Normalize

#: Per-module hook dictionaries that change or observe the computation.
MODULE_HOOKS: tuple[tuple[str, str], ...] = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)
#: Hooks torch applies to every module.
GLOBAL_HOOKS: tuple[tuple[str, str], ...] = (
    ("_global_forward_pre_hooks", "global forward pre-hook"),
    ("_global_forward_hooks", "global forward hook"),
    ("_global_backward_pre_hooks", "global backward pre-hook"),
    ("_global_backward_hooks", "global backward hook"),
)


def _describe(name: str, module: nn.Module) -> str:
    return f"module '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


def hook_refusal(model: nn.Module) -> str | None:
    """Why hooks or a patched ``forward`` make ``model`` uncertifiable, or None."""
    for attribute, kind in GLOBAL_HOOKS:
        if getattr(module_globals, attribute, None):
            return f"a {kind} is registered (torch.nn.modules.module.{attribute}); it applies to every module"
    for name, module in model.named_modules():
        for attribute, kind in MODULE_HOOKS:
            if getattr(module, attribute, None):
                return f"{_describe(name, module)} has a {kind}"
        if "forward" in vars(module):
            return f"{_describe(name, module)} has its forward replaced by an instance attribute"
    return None


def buffer_refusal(model: nn.Module) -> str | None:
    """Why a Normalize layer's current buffers make ``model`` uncertifiable, or None."""
    for name, module in model.named_modules():
        if isinstance(module, Normalize):
            problem = module.buffer_problem()
            if problem is not None:
                return f"{_describe(name, module)}: {problem}"
    return None


def common_refusal(model: nn.Module) -> str | None:
    """The checks of every certificate: :func:`hook_refusal`, then :func:`buffer_refusal`."""
    return hook_refusal(model) or buffer_refusal(model)
