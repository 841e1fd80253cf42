"""Layers every architecture uses: input normalisation inside the model, residual sums."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def normalize_buffer_problem(mean: torch.Tensor, std: torch.Tensor) -> str | None:
    """Why ``(mean, std)`` cannot be a :class:`Normalize`'s buffers (non-finite, std ≤ 0), or None."""
    if not bool(torch.isfinite(mean).all()):
        return f"mean must be finite, got {mean.flatten().tolist()}"
    if not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
        return f"std must be finite and positive, got {std.flatten().tolist()}"
    return None


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Keeping normalisation inside the model means every ε and every certified radius
    is measured in pixel units of the raw input in [0, 1]. ``mean`` must be finite and
    ``std`` finite and positive: checked on construction and when a state dict is loaded
    (ValueError); certificates check the buffers again when they certify
    (:meth:`buffer_problem`), since a buffer can be changed in place at any time.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        problem = normalize_buffer_problem(mean_t, std_t)
        if problem is not None:
            raise ValueError(problem)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def buffer_problem(self) -> str | None:
        """Why the current buffers are invalid (non-finite, std ≤ 0), or None."""
        return normalize_buffer_problem(self.mean, self.std)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Refuse (ValueError) a state dict whose mean or std is invalid, before anything is copied."""
        mean, std = state_dict.get(prefix + "mean", self.mean), state_dict.get(prefix + "std", self.std)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            problem = normalize_buffer_problem(mean, std)
            if problem is not None:
                raise ValueError(f"Normalize '{prefix.rstrip('.')}': {problem}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """``y = a · body(x) + b · shortcut(x)``.

    ``(a, b) = (1, 1)`` is the plain residual sum; Parseval networks use a convex
    combination such as ``(0.5, 0.5)`` (Cissé et al. 2017). The coefficients are
    buffers, so Lipschitz bounds can read them: ``L ≤ a·L(body) + b·L(shortcut)``.
    """

    def __init__(
        self,
        body: nn.Module,
        shortcut: nn.Module | None = None,
        coefficients: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        # two scalar buffers, not one indexed vector: auto_LiRPA treats a buffer as a constant
        # factor only when it feeds the product directly
        self.register_buffer("body_scale", torch.tensor(float(coefficients[0])))
        self.register_buffer("shortcut_scale", torch.tensor(float(coefficients[1])))

    @property
    def coefficients(self) -> tuple[float, float]:
        """(a, b)."""
        return float(self.body_scale), float(self.shortcut_scale)

    @coefficients.setter
    def coefficients(self, values: tuple[float, float]) -> None:
        self.body_scale.fill_(values[0])
        self.shortcut_scale.fill_(values[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body_scale * self.body(x) + self.shortcut_scale * self.shortcut(x)
