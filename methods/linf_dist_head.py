"""``linf-dist-head``: "ℓ∞-dist Net+MLP" (Zhang et al. 2021, §5): an ℓ∞-dist trunk with a
Linear → tanh → Linear head, trained on clean and worst-case logits.

The trunk is 1-Lipschitz in ℓ∞ at ``p = ∞`` (in normalised units), so its features lie in
``feature ± ε·s`` with ``s = 1/min(std)``; interval propagation of that box through the head, with
the last layer folded into the margins ``z_y − z_j`` (:func:`margin_lower_bound`), gives
worst-case logits. Loss: ``κ·CE(worst) + (1−κ)·CE(clean)``; ε_train = 1.1·ε_test by default;
p and ε follow the schedule of :mod:`methods.linf_dist` (default: the v1 proportions; both build on
:class:`methods._linf_dist.LinfDistBase`).

``head_weight_decay`` decays the head's parameters only (decoupled with ``optimizer: adamw``; the
authors' commands use 5e-3). Worst-case training drives the tanh into saturation, where interval
widths vanish: on Fashion-MNIST at width 512, 95–99 % of pre-activations end beyond ±3 with 0, 5e-3
or 5e-2 of head decay over 6–30 epochs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.linf_dist import interval_bounds, margin_lower_bound, split_trunk
from certbench.config import ConfigError
from certbench.method import LossOutput, register_method
from certbench.nn.linf_dist import LinfDist
from methods._linf_dist import SCHEDULE_PARAMS, LinfDistBase


@register_method("linf-dist-head")
class LinfDistHead(LinfDistBase):
    """ℓ∞-dist trunk + MLP head, IBP-style worst-case cross-entropy through the head."""

    eps_train_factor = 1.1
    example_arch = ("linf-dist-mlp+head", {"depth": 2, "width": 32, "hidden": 16})
    params_schema = {
        **SCHEDULE_PARAMS,
        "kappa": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "weight of the worst-case cross-entropy",
        },
        "head_weight_decay": {
            "type": ["number", "null"],
            "minimum": 0,
            "default": None,
            "description": "weight decay of the head's parameters; null: training.weight_decay",
        },
    }

    def _check_eps(self) -> None:
        """Cross-entropy on worst-case logits has no margin that ε_train must cover."""

    def _check_head(self, head: nn.Sequential) -> None:
        if not len(head) or not isinstance(head[-1], nn.Linear):
            raise ConfigError(
                f"method '{self.name}': the model needs a head ending in nn.Linear (linf-dist-mlp+head)"
            )

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decay = self.params["head_weight_decay"]
        if decay is None:
            return super().parameter_groups(model)
        trunk, head = split_trunk(model)
        return [
            {"params": list(trunk.parameters())},
            {"params": list(head.parameters()), "weight_decay": decay},
        ]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        eps, _ = self.set_schedule(model, progress)
        trunk, head = split_trunk(model)
        feature = trunk(x)
        z = head(feature)
        lower, upper = interval_bounds(head[:-1], feature - eps, feature + eps)
        worst = -margin_lower_bound(head[-1], lower, upper, y)
        kappa = self.params["kappa"]
        robust, clean = F.cross_entropy(worst, y), F.cross_entropy(z, y)
        loss = kappa * robust + (1 - kappa) * clean
        p = next(m.p for m in model.modules() if isinstance(m, LinfDist))
        return LossOutput(
            loss,
            {"ce_worst": robust.item(), "ce_clean": clean.item(), "inv_p": 1.0 / p, "eps": eps / self._scale},
            logits=z.detach(),
        )
