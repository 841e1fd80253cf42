"""A training method instance on a data set's spec, for the tests of the bound-propagation methods."""

from __future__ import annotations

import torch

from certbench import config as cfg
from certbench.data.specs import DatasetSpec
from certbench.method import RunContext, get_method
from methods._bound_propagation import BoundPropagationMethod


def bound_method(name: str, spec: DatasetSpec, epochs: int = 4, **params: object) -> BoundPropagationMethod:
    """Method ``name`` with ε_train = 0.1 and ``params`` (defaults filled and checked), on the CPU."""
    cls = get_method(name)
    filled = cfg.check_params(cls.params_schema, {"eps_train": 0.1, **params}, f"{name}.")
    instance = cls(filled, RunContext(spec, epochs, spec.eps_linf, spec.eps_l2, torch.device("cpu")))
    instance.check()
    return instance
