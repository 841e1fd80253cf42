"""Architecture registry: named, input-size-agnostic model builders.

A builder takes the data set spec and keyword parameters and returns a model whose
first layer is :class:`certbench.nn.Normalize`, which maps inputs in [0, 1] of shape
(B, C, H, W) to logits (B, K). Architecture modules in this package register
themselves on import.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from certbench.data.specs import DatasetSpec
from certbench.registry import Registry

Builder = Callable[..., nn.Module]
ARCHITECTURES: Registry[Builder] = Registry("architecture")
register_arch = ARCHITECTURES.register


def build(name: str, spec: DatasetSpec, **params: Any) -> nn.Module:
    """Build architecture ``name`` for data set ``spec``."""
    return ARCHITECTURES.get(name)(spec, **params)


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
