"""The method plug-in protocol.

A method is one module ``methods/<name>.py`` holding one :class:`Method` subclass
decorated with ``@register_method("<name>")``; the registry imports every module of ``methods``
whose name does not start with ``_`` on the first lookup. The framework owns the training loop
(optimiser, schedule, epochs, checkpoints); a method contributes the model, the loss,
an optional hook after each optimiser step, and its default certificate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from certbench import models
from certbench.config import ConfigError
from certbench.data.specs import DATASETS, DatasetSpec
from certbench.registry import PluginImportError, Registry, UnknownNameError


@dataclass(frozen=True)
class RunContext:
    """What a method may know about the run it trains in."""

    spec: DatasetSpec
    epochs: int
    eps_linf: tuple[float, ...]
    eps_l2: tuple[float, ...]
    device: torch.device


def run_context(resolved: Mapping[str, Any], device: torch.device) -> RunContext:
    """The :class:`RunContext` of a resolved run config (see :func:`certbench.config.resolve_run`)."""
    dataset = resolved["dataset"]
    return RunContext(
        spec=DATASETS.get(dataset["name"]),
        epochs=resolved["training"]["epochs"],
        eps_linf=tuple(dataset["eps_linf"]),
        eps_l2=tuple(dataset["eps_l2"]),
        device=device,
    )


@dataclass
class LossOutput:
    """The training loss of one batch, statistics to log (averaged over the epoch) and,
    when the method computed them, the clean logits (for the training accuracy)."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    logits: torch.Tensor | None = None


def non_negative(name: str, value: float) -> None:
    """ConfigError unless the parameter ``name`` is ≥ 0 (NaN is refused)."""
    if not value >= 0:  # also rejects NaN
        raise ConfigError(f"params.{name}: must be ≥ 0, got {value}")


def unit_interval(name: str, value: float) -> None:
    """ConfigError unless the parameter ``name`` lies in [0, 1] (NaN is refused)."""
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ConfigError(f"params.{name}: must lie in [0, 1], got {value}")


class Method:
    """Base class of every training method; subclasses override what they need.

    Parameter checks shared by several methods (:func:`non_negative`, :func:`unit_interval`) live
    in this module; a base class shared by a family of methods lives in a ``methods/_<family>.py``
    module, never in a sibling method's module."""

    name: ClassVar[str]
    #: JSON-schema ``properties`` of the method's parameters, each with a ``default``
    #: (:func:`certbench.config.check_params`, as for every kind of plug-in).
    params_schema: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The certificate that the paper of this method reports.
    default_certificate: ClassVar[str] = "lipschitz-l2"
    #: A small architecture (name, parameters) this method trains: used by the tests that
    #: every registered method must pass, and as the example in the README.
    example_arch: ClassVar[tuple[str, dict[str, Any]]] = ("mlp", {"widths": [32]})

    def __init__(self, params: Mapping[str, Any], context: RunContext) -> None:
        # defaults first: a run.json written before a parameter existed still loads as it was trained
        defaults = {key: spec["default"] for key, spec in self.params_schema.items() if "default" in spec}
        self.params = {**defaults, **params}
        self.context = context

    def check(self) -> None:
        """Cross-field checks of the parameters; raise :class:`ConfigError` with one line."""

    def build_model(self, arch: str, arch_params: Mapping[str, Any]) -> nn.Module:
        return models.build(arch, self.context.spec, **arch_params)

    def prepare(self, model: nn.Module) -> None:
        """Called once after the model is on its device, before the first step."""

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimiser's parameter groups; a group may override ``training`` settings such as
        ``weight_decay`` for its parameters. Default: one group, every parameter."""
        return [{"params": list(model.parameters())}]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        """The loss of one batch; ``progress`` runs from 0 to 1 over training (for schedules)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. a retraction)."""

    def finish(self, model: nn.Module) -> None:
        """Called once after the last epoch, before the model is saved (e.g. a final projection)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that a checkpoint must keep (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


METHODS: Registry[type[Method]] = Registry("method", "methods")
register_method = METHODS.register


def get_method(name: str) -> type[Method]:
    """The registered class of ``name``; an unknown name or a method module that fails to import
    is a one-line :class:`ConfigError`."""
    try:
        return METHODS.get(name)
    except (UnknownNameError, PluginImportError) as error:
        raise ConfigError(f"method: {error}") from None
