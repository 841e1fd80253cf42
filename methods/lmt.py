"""``lmt``: Lipschitz-margin training (Tsuzuku, Sato, Sugiyama, NeurIPS 2018).

Before the cross-entropy, every wrong logit is raised by the margin that a perturbation of size c
could at most create (LMT Sec. 4.3), with the Lipschitz bound of :mod:`certbench.bounds.lipschitz` in its
training mode (one power-iteration step per batch, differentiable):

* ``margin: global`` (LMT): z_i + √2·c·L for i ≠ y;
* ``margin: last-layer`` (LMT++): z_i + c·L_sub·‖w_i − w_y‖₂, L_sub the bound below the last
  Linear layer with rows w_i (Prop. 2).

c is constant, or ramps linearly from ``c_start`` to ``c`` over the first ``ramp_epochs`` epochs
(the paper's SVHN setting: 1e-5 → 1e-2 over 5 epochs). With ``clip``, the addition is scaled per
sample by f = clip(r/c, 0, 1), r the radius that the same bound certifies at the current weights
(= m/(√2·c·L) for the global form), so misclassified points are left to plain cross-entropy, as
in the authors' code.

Its base, :class:`methods._lipschitz.LipschitzMethod`, is shared with every method that trains against
the bound (``lipschitz-reg``) or is certified with it (``spectral``, ``parseval``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipschitz import LipschitzEstimate
from certbench.config import ConfigError
from certbench.method import LossOutput, non_negative, register_method
from methods._lipschitz import LipschitzMethod


@register_method("lmt")
class LMT(LipschitzMethod):
    """Cross-entropy on logits raised by the certifiable margin of size c."""

    default_certificate = "lipschitz-l2"
    example_arch = ("cnn-small", {})
    params_schema = {
        "c": {
            "type": "number",
            "minimum": 0,
            "default": 1.0,
            "description": "target radius c (after the ramp)",
        },
        "margin": {
            "enum": ["global", "last-layer"],
            "default": "last-layer",
            "description": "global: √2·c·L (LMT); last-layer: c·L_sub·‖w_i − w_y‖ (LMT++)",
        },
        "c_start": {
            "type": "number",
            "minimum": 0,
            "default": 0.0,
            "description": "c at the start of the ramp",
        },
        "ramp_epochs": {
            "type": "number",
            "minimum": 0,
            "default": 0,
            "description": "epochs of the linear ramp from c_start to c; 0: c throughout",
        },
        "clip": {
            "type": "boolean",
            "default": False,
            "description": "scale the addition per sample by clip(r/c, 0, 1)",
        },
    }

    def check(self) -> None:
        for name in ("c", "c_start", "ramp_epochs"):
            non_negative(name, float(self.params[name]))
        if self.params["margin"] not in ("global", "last-layer"):
            raise ConfigError(
                f"params.margin: must be 'global' or 'last-layer', got {self.params['margin']!r}"
            )
        if self.params["ramp_epochs"] > self.context.epochs:
            raise ConfigError(
                f"params.ramp_epochs: {self.params['ramp_epochs']} exceeds the "
                f"{self.context.epochs} training epochs"
            )

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        if self.params["margin"] == "last-layer" and self.bind(model).last_linear is None:
            raise ConfigError(
                f"params.margin: 'last-layer' needs a model ending in a Linear layer, "
                f"this one ends in {type(list(model.modules())[-1]).__name__}"
            )

    def c_at(self, progress: float) -> float:
        """c after ``progress`` ∈ [0, 1] of training: linear from c_start to c over ramp_epochs."""
        c, ramp = float(self.params["c"]), float(self.params["ramp_epochs"])
        if ramp == 0:
            return c
        start = float(self.params["c_start"])
        return start + (c - start) * min(1.0, progress * self.context.epochs / ramp)

    def additions(self, estimate: LipschitzEstimate, y: torch.Tensor, classes: int, c: float) -> torch.Tensor:
        """(B, K) amounts added to the logits for target radius c (0 at the label)."""
        if self.params["margin"] == "global":
            return (math.sqrt(2.0) * c * estimate.total) * (
                1.0 - F.one_hot(y, classes).to(estimate.total.dtype)
            )
        # without the matrix-product shortcut the diagonal is exactly 0 (and its gradient 0, not NaN)
        distances = torch.cdist(
            estimate.last_weight, estimate.last_weight, compute_mode="donot_use_mm_for_euclid_dist"
        )
        return (c * estimate.sub) * distances[y]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        estimate = self.estimate(model)
        logits = model(x)
        c = self.c_at(progress)
        added = self.additions(estimate, y, logits.shape[1], c) if c > 0 else torch.zeros_like(logits)
        if self.params["clip"] and c > 0:
            with torch.no_grad():
                # r = min_i (z_y − z_i)/(added_i/c) is the radius of the current bound, so
                # f = clip(r/c, 0, 1) = clip(min_i (z_y − z_i)/added_i, 0, 1)
                gap = logits.gather(1, y[:, None]) - logits
                ratio = torch.where(added > 0, gap / added, torch.full_like(gap, math.inf))
                factor = ratio.min(dim=1).values.clamp(0.0, 1.0)
            added = added * factor[:, None]
        stats = {"c": c, "lipschitz": estimate.total.item()}
        if estimate.sub is not None:
            stats["lipschitz_sub"] = estimate.sub.item()
        return LossOutput(F.cross_entropy(logits + added, y), stats, logits=logits.detach())
