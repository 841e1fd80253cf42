"""Architecture registry: named, input-size-agnostic model builders.

An architecture is a function in a module of this package, decorated with
``@register_arch("<name>", params_schema={...})``. It takes the data set spec and its parameters
(declared, with defaults, in ``params_schema`` like every plug-in's, checked by
:func:`certbench.config.check_params`) and returns a model whose first layer is
:class:`certbench.nn.Normalize`, which maps inputs in [0, 1] of shape (B, C, H, W) to logits (B, K).
The modules of this package are imported on the first registry lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from certbench.config import check_params
from certbench.data.specs import DatasetSpec
from certbench.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder and the declaration of the builder's parameters."""

    name: str
    builder: Builder
    params_schema: Mapping[str, Mapping[str, Any]]


ARCHITECTURES: Registry[Architecture] = Registry("architecture", "certbench.models")


def register_arch(
    name: str, params_schema: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[[Builder], Builder]:
    """Register ``builder(spec, **params)`` as architecture ``name``."""

    def decorate(builder: Builder) -> Builder:
        ARCHITECTURES.register(name)(Architecture(name, builder, dict(params_schema or {})))
        return builder

    return decorate


def build(name: str, spec: DatasetSpec, **params: Any) -> nn.Module:
    """Build architecture ``name`` for data set ``spec``; ``params`` are checked and given their defaults."""
    architecture = ARCHITECTURES.get(name)
    return architecture.builder(spec, **check_params(architecture.params_schema, params, "arch_params."))
