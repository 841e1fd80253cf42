"""Shared by the ℓ∞-dist training methods ``linf-dist`` and ``linf-dist-head``.

:class:`LinfDistBase` is ``linf-dist`` (see :mod:`methods.linf_dist` for the schedule and the
losses); ``linf-dist-head`` keeps its schedule and replaces the loss. Not a method (no
``register_method``): a family base, so that no method imports a sibling method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.linf_dist import split_trunk
from certbench.config import ConfigError
from certbench.method import LossOutput, Method, RunContext
from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, Negate, set_p

#: e0..e3 as fractions of the run's epochs, from the papers' MNIST commands
#: (v1: 0,50,50,350 of 400; v2: 0,0,25,400 of 450).
DEFAULT_EPOCH_FRACTIONS = {"v1": (0.0, 0.125, 0.125, 0.875), "v2": (0.0, 0.0, 25 / 450, 400 / 450)}

SCHEDULE_PARAMS: dict[str, dict[str, Any]] = {
    "eps_train": {
        "type": ["number", "null"],
        "exclusiveMinimum": 0,
        "default": None,
        "description": "training ε in pixel units; null: a multiple of the largest test ε",
    },
    "p_start": {"type": "number", "minimum": 1, "default": 8.0},
    "p_end": {"type": "number", "minimum": 1, "default": 1000.0},
    "epochs": {
        "type": ["array", "null"],
        "items": {"type": "number", "minimum": 0},
        "minItems": 4,
        "maxItems": 4,
        "default": None,
        "description": "[e0, e1, e2, e3]: ε ramp e0→e1, p ramp e2→e3, p = ∞ from e3; "
        "null: the paper's proportions of the run's epochs",
    },
}


def input_scale(model: nn.Module) -> float:
    """ℓ∞ Lipschitz factor of the input normalisation(s): ``Π 1/min(std)``."""
    return math.prod(1.0 / float(m.std.min()) for m in model.modules() if isinstance(m, Normalize))


class PSchedule:
    """ε ratio, ``p`` and the ramp position ``r`` of p at a (fractional) epoch."""

    def __init__(self, epochs: tuple[float, float, float, float], p_start: float, p_end: float) -> None:
        self.e0, self.e1, self.e2, self.e3 = epochs
        self.p_start, self.p_end = p_start, p_end

    @staticmethod
    def _ramp(epoch: float, start: float, end: float) -> float:
        return 1.0 if end <= start else min(max((epoch - start) / (end - start), 0.0), 1.0)

    def eps_ratio(self, epoch: float) -> float:
        return self._ramp(epoch, self.e0, self.e1)

    def p_ratio(self, epoch: float) -> float:
        return self._ramp(epoch, self.e2, self.e3)

    def p(self, epoch: float) -> float:
        r = self.p_ratio(epoch)
        if r >= 1.0:
            return math.inf
        return self.p_start * (self.p_end / self.p_start) ** r


class LinfDistBase(Method):
    """ℓ∞-dist net with the p schedule; ``loss`` selects the v1 or the v2 objective."""

    default_certificate = "linf-dist"
    example_arch = ("linf-dist-mlp", {"depth": 3, "width": 32})
    #: default ε_train as a multiple of the largest test ε (MNIST: 0.45 for 0.3)
    eps_train_factor: ClassVar[float] = 1.5
    params_schema = {
        "loss": {"enum": ["v1", "v2"], "default": "v2"},
        **SCHEDULE_PARAMS,
        "mix": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.75,
            "description": "v1: weight of the max-hinge against the mean-hinge",
        },
        "lam_start": {
            "type": "number",
            "minimum": 0,
            "default": 0.05,
            "description": "v2: initial CE weight",
        },
        "lam_end": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 2e-4,
            "description": "v2: final CE weight",
        },
    }

    def __init__(self, params: Mapping[str, Any], context: RunContext) -> None:
        super().__init__(params, context)
        self.schedule = PSchedule(self._epochs(), float(self.params["p_start"]), float(self.params["p_end"]))
        self._scale = 1.0

    # ---- configuration ----------------------------------------------------------------
    @property
    def eps_test(self) -> float | None:
        return max(self.context.eps_linf) if self.context.eps_linf else None

    @property
    def eps_train(self) -> float:
        eps = self.params.get("eps_train")
        if eps is None:
            if self.eps_test is None:
                raise ConfigError("params.eps_train: required, the data set defines no ℓ∞ ε")
            eps = self.eps_train_factor * self.eps_test
        return float(eps)

    def _epochs(self) -> tuple[float, float, float, float]:
        given = self.params.get("epochs")
        if given is None:
            fractions = DEFAULT_EPOCH_FRACTIONS[self.params.get("loss", "v1")]
            return tuple(f * self.context.epochs for f in fractions)  # type: ignore[return-value]
        return tuple(float(e) for e in given)  # type: ignore[return-value]

    def check(self) -> None:
        p_start, p_end = float(self.params["p_start"]), float(self.params["p_end"])
        if not 1.0 <= p_start <= p_end:
            raise ConfigError(
                f"params.p_start: need 1 ≤ p_start ≤ p_end, got p_start={p_start}, p_end={p_end}"
            )
        epochs = self._epochs()
        if any(b < a for a, b in zip(epochs, epochs[1:])) or epochs[-1] > self.context.epochs:
            raise ConfigError(
                f"params.epochs: need e0 ≤ e1 ≤ e2 ≤ e3 ≤ training epochs "
                f"({self.context.epochs}), got {list(epochs)}"
            )
        self._check_eps()

    def _check_eps(self) -> None:
        """A hinge margin of 2·ε_train covers the tested ε only if ε_train ≥ ε_test."""
        if self.eps_test is not None and self.eps_train < self.eps_test:
            raise ConfigError(
                f"params.eps_train: {self.eps_train:g} is below the largest test ε "
                f"{self.eps_test:g}; the hinge margin would not cover it"
            )

    # ---- model ------------------------------------------------------------------------
    def build_model(self, arch: str, arch_params: Mapping[str, Any]) -> nn.Module:
        model = super().build_model(arch, arch_params)
        if self.params.get("loss") == "v2":
            # the scalar s of λ·CE(s·z): trained with the model, never used by its forward pass
            model.register_parameter("ce_scale", nn.Parameter(torch.ones(())))
        return model

    def prepare(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Sequential) or not any(isinstance(m, LinfDist) for m in model):
            raise ConfigError(f"method '{self.name}': the architecture must be a linf-dist-* network")
        self._check_head(split_trunk(model)[1])
        self._scale = input_scale(model)

    def _check_head(self, head: nn.Sequential) -> None:
        if not all(isinstance(m, Negate) for m in head):
            raise ConfigError(
                f"method '{self.name}': the model has a head after its ℓ∞-dist layers; "
                f"use linf-dist-mlp, or the method linf-dist-head"
            )

    def set_schedule(self, model: nn.Module, progress: float) -> tuple[float, float]:
        """Set ``p`` on every layer for ``progress``; return (ε in logit units, p-ramp position r)."""
        epoch = progress * self.context.epochs
        set_p(model, self.schedule.p(epoch))
        return self.schedule.eps_ratio(epoch) * self.eps_train * self._scale, self.schedule.p_ratio(epoch)

    # ---- loss -------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        eps, r = self.set_schedule(model, progress)
        z = model(x)
        diff = z - z.gather(1, y[:, None])  # z_j − z_y, 0 at j = y
        others = torch.ones_like(z, dtype=torch.bool).scatter_(1, y[:, None], False)
        if self.params["loss"] == "v1":
            hinge = (diff + 2 * eps).clamp_min(0) * others
            mix = self.params["mix"]
            loss = mix * hinge.amax(1).mean() + (1 - mix) * hinge.sum(1).mean() / (z.shape[1] - 1)
            stats = {"hinge": loss.item()}
        else:
            full = 2 * self.eps_train * self._scale
            hinge = ((diff + 2 * eps) / full).clamp(0, 1) * others
            lam_start, lam_end = self.params["lam_start"], self.params["lam_end"]
            lam = lam_start * (lam_end / lam_start) ** r if lam_start > 0 else 0.0
            ce = F.cross_entropy(model.ce_scale * z, y)
            loss = hinge.amax(1).mean() + lam * ce
            stats = {
                "hinge": hinge.amax(1).mean().item(),
                "ce": ce.item(),
                "lam": lam,
                "ce_scale": model.ce_scale.item(),
            }
        p = next(m.p for m in model.modules() if isinstance(m, LinfDist))
        return LossOutput(loss, {**stats, "inv_p": 1.0 / p, "eps": eps / self._scale}, logits=z.detach())
