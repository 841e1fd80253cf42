"""``sortnet``: SortNet (Zhang, Jiang, He, Wang, NeurIPS 2022, arXiv:2210.01787), trained as the
authors' public code does (github.com/zbh2047/SortNet, read for the settings, none of it copied).

The training recipe is that of ℓ∞-dist nets v2 (:mod:`methods.linf_dist`, :class:`LinfDistBase`):
the ℓp relaxation with ``p = p_start`` until epoch e2, raised geometrically to ``p_end`` by e3 and
``p = ∞`` after, the clipped hinge ``max_j clip((z_j − z_y + 2ε)/(2ε_train), 0, 1)`` plus
``λ·CE(s·z)`` with λ decaying with the p ramp (the authors' "mixture" loss), ε in pixel units
scaled by ``1/min(std)``. What SortNet adds is the layer (:class:`certbench.nn.sortnet.SortDist`,
architecture ``sortnet-mlp``) and, with ``sampling`` on (the paper's efficient variant, its
default), its stochastic training form: each SortNet layer keeps every input coordinate with
probability ``1 − ρ`` (one mask per ``sample_group`` samples) and takes the ℓp distance over the
kept ones, an unbiased estimate of the geometric SortNet unit at ``p = ∞``; ``p`` follows the same
schedule in every distance layer. With ``sampling`` off the exact sorted sum is trained (``p``
then only relaxes the ℓ∞-dist layer on the input).

The sampled form's activations are not the exact form's (the noise of one layer's mask shifts
the next layer's mean, and ``p`` < ∞ changes the scale), so the running means of the MeanShift
layers at the end of sampled training do not fit the network that is certified. The authors
re-estimate them with a pass over the training set before every evaluation; a method here sees the
data only through its training steps, so the last ``exact_epochs`` epochs train the exact form and
the MeanShift layers average their batch means over those epochs (momentum ``1/n`` at the n-th
step: the running mean is the plain mean of the phase's batch means). Under a cosine schedule their
learning rate is close to 0, so this is, up to those small steps, the authors' re-estimation.

Defaults are the authors' MNIST ε = 0.1 command: ``[e0, e1, e2, e3]`` = ``[0, 0, 100, 1450]`` of
1500 epochs as proportions of the run's epochs, ε_train = 3·ε_test (their 0.3 for 0.1),
λ from 0.1 to 0.001.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from certbench.bounds.linf_dist import DISTANCE_LAYERS, split_trunk
from certbench.config import ConfigError
from certbench.method import LossOutput, RunContext, register_method
from certbench.nn.linf_dist import MeanShift, set_p
from certbench.nn.sortnet import SortDist, set_sort_p
from methods._linf_dist import LinfDistBase, input_scale

#: e0..e3 as fractions of the run's epochs: the authors' MNIST commands (0,0,100,1450 of 1500).
SORTNET_EPOCH_FRACTIONS = (0.0, 0.0, 100 / 1500, 1450 / 1500)


def _with_defaults(schema: Mapping[str, dict[str, Any]], **defaults: Any) -> dict[str, dict[str, Any]]:
    return {
        key: {**spec, "default": defaults[key]} if key in defaults else spec for key, spec in schema.items()
    }


@register_method("sortnet")
class SortNetMethod(LinfDistBase):
    """SortNet with the ℓ∞-dist nets' p schedule and v2 loss; sampled training form by default."""

    example_arch = ("sortnet-mlp", {"depth": 3, "width": 32})
    #: ε_train = 3·ε_test (the authors' MNIST ε = 0.1 command: 0.3)
    eps_train_factor = 3.0
    params_schema = {
        **_with_defaults(LinfDistBase.params_schema, lam_start=0.1, lam_end=0.001),
        "sampling": {
            "type": "boolean",
            "default": True,
            "description": "train the stochastic form (keep each coordinate with probability 1 − rho)",
        },
        "sample_group": {
            "type": "integer",
            "minimum": 1,
            "default": 32,
            "description": "consecutive samples of a batch that share one sampling mask",
        },
        "exact_epochs": {
            "type": "number",
            "minimum": 0,
            "default": 1,
            "description": "the last epochs train the exact form (MeanShift statistics of the certified net)",
        },
    }

    def __init__(self, params: Mapping[str, Any], context: RunContext) -> None:
        super().__init__(params, context)
        self._exact_steps = 0  # steps of the exact phase so far (the MeanShift averaging)

    def _epochs(self) -> tuple[float, float, float, float]:
        if self.params.get("epochs") is None:
            return tuple(f * self.context.epochs for f in SORTNET_EPOCH_FRACTIONS)  # type: ignore[return-value]
        return super()._epochs()

    def check(self) -> None:
        super().check()
        if self.params["exact_epochs"] > self.context.epochs:
            raise ConfigError(
                f"params.exact_epochs: {self.params['exact_epochs']:g} is more than the training epochs "
                f"({self.context.epochs})"
            )

    def prepare(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Sequential) or not any(isinstance(m, SortDist) for m in model):
            raise ConfigError(f"method '{self.name}': the architecture must be a sortnet-* network")
        self._check_head(split_trunk(model)[1])
        self._scale = input_scale(model)
        for m in model.modules():
            if isinstance(m, SortDist):
                m.sample_group = int(self.params["sample_group"])

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The distance layers' weights and biases without weight decay, everything else (the CE
        scale ``s``) with ``training.weight_decay``, as the authors' AdamW groups are."""
        distance = [p for m in model.modules() if isinstance(m, DISTANCE_LAYERS) for p in m.parameters()]
        ids = {id(p) for p in distance}
        others = [p for p in model.parameters() if id(p) not in ids]
        return [{"params": distance, "weight_decay": 0.0}, *([{"params": others}] if others else [])]

    def set_schedule(self, model: nn.Module, progress: float) -> tuple[float, float]:
        eps, r = super().set_schedule(model, progress)
        epoch = progress * self.context.epochs
        set_sort_p(model, self.schedule.p(epoch))
        exact_phase = epoch >= self.context.epochs - self.params["exact_epochs"]
        for m in model.modules():
            if isinstance(m, SortDist):
                m.sampling = bool(self.params["sampling"]) and not exact_phase
        if exact_phase and model.training:
            self._exact_steps += 1
            for m in model.modules():
                if isinstance(m, MeanShift):
                    m.momentum = 1.0 / self._exact_steps
        return eps, r

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        out = super().loss(model, x, y, progress)
        sampled = any(isinstance(m, SortDist) and m.sampling for m in model.modules())
        return LossOutput(out.loss, {**out.stats, "sampled": float(sampled)}, logits=out.logits)

    def finish(self, model: nn.Module) -> None:
        """The schedule's end (p = ∞ once e3 ≤ the epochs, which :meth:`check` ensures), as the
        authors' code sets it after the last epoch; sampling off, MeanShift momentum back to 0.1."""
        set_p(model, self.schedule.p(self.context.epochs))
        set_sort_p(model, self.schedule.p(self.context.epochs))
        for m in model.modules():
            if isinstance(m, SortDist):
                m.sampling = False
            elif isinstance(m, MeanShift):
                m.momentum = 0.1

    def state_dict(self) -> dict[str, Any]:
        return {"exact_steps": self._exact_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._exact_steps = int(state.get("exact_steps", 0))
