"""Shared by the methods whose model must be boundable by :class:`certbench.bounds.lipschitz.LipschitzBound`:
``lmt``, ``lipschitz-reg`` (train against the bound), ``spectral`` and ``parseval`` (certified with it).

Not a method (no ``register_method``): a family base, so that no method imports a sibling method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from certbench.bounds.lipschitz import (
    LipschitzBound,
    LipschitzEstimate,
    UnsupportedLayerError,
    check_supported,
)
from certbench.config import ConfigError
from certbench.method import Method


def require_supported(method: str, model: nn.Module) -> None:
    """ConfigError naming the layer type if :mod:`certbench.bounds.lipschitz` cannot bound ``model``."""
    try:
        check_supported(model)
    except UnsupportedLayerError as error:
        raise ConfigError(f"method '{method}': {error}") from None


class LipschitzMethod(Method):
    """A method whose model must be boundable by :class:`LipschitzBound`.

    ``prepare`` rejects unsupported layers with a ConfigError naming the layer type. The
    persistent power-iteration vectors are this method's checkpoint state.
    """

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self._bound: LipschitzBound | None = None
        self._pending: Mapping[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module) -> None:
        require_supported(self.name, model)
        self.bind(model)

    def bind(self, model: nn.Module) -> LipschitzBound:
        """The bound of ``model``, rebuilt (keeping the power-iteration vectors) if the model object changed,
        as after the deep copy of the epoch calibration."""
        if self._bound is None or self._bound.model is not model:
            previous = self._bound.state_dict() if self._bound is not None else self._pending
            self._bound = LipschitzBound(model, self.context.spec.shape)
            self._bound.load_state_dict(previous)
            self._pending = {}
        return self._bound

    def estimate(self, model: nn.Module) -> LipschitzEstimate:
        """The training-mode bound of ``model``: one power-iteration step per call."""
        return self.bind(model).compute()

    def state_dict(self) -> dict[str, Any]:
        return {"power_vectors": self._bound.state_dict() if self._bound is not None else dict(self._pending)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        vectors = state.get("power_vectors", {})
        if self._bound is not None:
            self._bound.load_state_dict(vectors)
        else:
            self._pending = dict(vectors)
