"""Shared by the bound-propagation training methods ``ibp`` and ``crown-ibp`` (auto_LiRPA).

:class:`BoundPropagationMethod` is ``ibp`` (see :mod:`methods.ibp` for the loss and the ε schedule);
``crown-ibp`` changes the bounds and their weights. Not a method (no ``register_method``): a
family base, so that no method imports a sibling method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lirpa import Bounder, robust_cross_entropy, unsupported_reason
from certbench.config import ConfigError
from certbench.method import LossOutput, Method, unit_interval

#: Defaults for a null ramp start/length, as fractions of the run's epochs (CROWN-IBP's
#: MNIST runs ramp over epochs 1–61 of 100).
DEFAULT_RAMP = (0.1, 0.5)
#: Smoothed ramp: power ``SMOOTH_POWER`` up to ``SMOOTH_MID`` of the ramp, linear after.
SMOOTH_POWER, SMOOTH_MID = 4.0, 0.25


def ramp(u: float, kind: str) -> float:
    """Fraction of ε_train at ramp position u ∈ [0, 1] (0 before, 1 after).

    ``smoothed``: a·u^β for u < m, then linear to 1 with the same slope at m, so
    a = 1 / (m^(β−1) (β(1 − m) + m)).
    """
    u = min(max(u, 0.0), 1.0)
    if kind == "linear":
        return u
    beta, m = SMOOTH_POWER, SMOOTH_MID
    a = 1.0 / (m ** (beta - 1) * (beta * (1 - m) + m))
    if u < m:
        return a * u**beta
    at_mid = a * m**beta
    return at_mid + (1 - at_mid) * (u - m) / (1 - m)


class BoundPropagationMethod(Method):
    """Natural and robust cross-entropy mixed by κ, the robust one from auto_LiRPA's margin bounds
    (IBP here; :meth:`lower_bounds` and :meth:`weights` are what CROWN-IBP changes)."""

    default_certificate = "ibp"
    params_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "eps_train": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": 1,
            "default": None,
            "description": "training ε (pixel units); null: the data set's largest ε_linf",
        },
        "schedule": {"enum": ["linear", "smoothed"], "default": "smoothed"},
        "schedule_start": {
            "type": ["number", "null"],
            "minimum": 0,
            "default": None,
            "description": "epoch at which ε starts to grow; null: 10% of the epochs",
        },
        "schedule_length": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "epochs for ε to reach eps_train; null: 50% of the epochs",
        },
        "kappa_final": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "weight of the natural loss once ε = eps_train",
        },
    }

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self.bounder = Bounder()

    # ---- configuration ----------------------------------------------------------------
    @property
    def eps_train(self) -> float:
        eps = self.params.get("eps_train")
        if eps is None:
            if not self.context.eps_linf:
                raise ConfigError("params.eps_train: required, the data set defines no ℓ∞ ε")
            eps = max(self.context.eps_linf)
        return float(eps)

    def ramp_epochs(self) -> tuple[float, float]:
        """(start, length) of the ε ramp in epochs."""
        start, length = self.params.get("schedule_start"), self.params.get("schedule_length")
        epochs = self.context.epochs
        return (
            DEFAULT_RAMP[0] * epochs if start is None else float(start),
            DEFAULT_RAMP[1] * epochs if length is None else float(length),
        )

    def check(self) -> None:
        unit_interval("eps_train", self.eps_train)
        unit_interval("kappa_final", float(self.params["kappa_final"]))
        start, length = self.ramp_epochs()
        if start + length > self.context.epochs:
            raise ConfigError(
                f"params.schedule_length: the ε ramp ends at epoch {start + length:g}, after "
                f"the last epoch ({self.context.epochs})"
            )

    def prepare(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ConfigError(
                f"method '{self.name}': auto_LiRPA cannot bound this architecture (ReLU networks "
                f"of Linear/Conv2d/Flatten/BatchNorm/AvgPool/residual sums only): {reason}"
            )

    # ---- schedule and loss ------------------------------------------------------------
    def epsilon(self, progress: float) -> float:
        """ε at ``progress`` (0 → 1 over training) = eps_train · ramp((epoch − start)/length)."""
        start, length = self.ramp_epochs()
        epoch = progress * self.context.epochs
        return self.eps_train * ramp((epoch - start) / length, self.params["schedule"])

    def mix(self, eps: float, final: float) -> float:
        """1 − (ε/ε_train)(1 − final): κ and CROWN-IBP's β both follow ε this way."""
        return 1.0 if self.eps_train == 0 else 1.0 - eps / self.eps_train * (1.0 - final)

    def weights(self, eps: float) -> dict[str, float]:
        """The mixing weights at ε (logged with the losses)."""
        return {"kappa": self.mix(eps, float(self.params["kappa_final"]))}

    def lower_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """Margin lower bounds (B, K−1) the robust loss is computed from."""
        return self.bounder.margin_lower_bounds(model, x, y, eps, ["IBP"])["IBP"]

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, float]:
        """(robust cross-entropy, fraction of the batch its bounds do not certify)."""
        lower = self.lower_bounds(model, x, y, eps)
        return robust_cross_entropy(lower), float((lower <= 0).any(1).float().mean())

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        eps = self.epsilon(progress)
        weights = self.weights(eps)
        # bounds before the forward pass: building a BoundedModule rewrites the parameters in place
        bounded = self.robust_loss(model, x, y, eps) if eps > 0 else None
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        # at ε = 0 every bound is exact, so the robust CE equals the natural CE
        robust, robust_error = bounded or (natural, float((logits.argmax(1) != y).float().mean()))
        kappa = weights["kappa"]
        stats = {
            "eps": eps,
            **weights,
            "natural_loss": natural.item(),
            "robust_loss": robust.item(),
            "robust_error": robust_error,
        }
        return LossOutput(kappa * natural + (1 - kappa) * robust, stats, logits=logits.detach())
