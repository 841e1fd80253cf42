"""The registered attacks, all run through foolbox 3 (batched, torch-native, gradients on the model's device).

Defaults follow METHODS.md "Attacks used for evaluation". foolbox's own success flags and
distances are discarded: :class:`certbench.attacks.base.Attack` verifies every example itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from certbench.attacks.base import non_negative, positive, register_attack, steps, switch

with warnings.catch_warnings():  # foolbox 3.3.4 imports the deprecated scipy.ndimage.filters
    warnings.simplefilter("ignore", DeprecationWarning)
    import foolbox as fb

#: DDN's and FMN's step-size decay γ, in (0, 1).
GAMMA = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.05}


def _run(attack: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Run a foolbox attack on box (0, 1) on the inputs' device; return its raw (unclipped) examples."""
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=x.device)
    raw, _, _ = attack(fmodel, x, fb.criteria.Misclassification(y), epsilons=eps)
    return raw


@register_attack(
    "deepfool-l2",
    norm="l2",
    kind="minimal",
    params_schema={"steps": steps(50), "overshoot": non_negative(0.02)},
)
def deepfool_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """DeepFool-ℓ2 (Moosavi-Dezfooli et al. 2016, Alg. 2) on logits, every class a candidate."""
    attack = fb.attacks.L2DeepFoolAttack(
        steps=s["steps"], overshoot=s["overshoot"], candidates=None, loss="logits"
    )
    return _run(attack, model, x, y, eps)


@register_attack(
    "cw-l2",
    norm="l2",
    kind="minimal",
    params_schema={
        "steps": steps(100),
        "stepsize": positive(0.01),
        "confidence": non_negative(0.0),
        "initial_const": positive(1e-3),
        "binary_search_steps": steps(9),
        "abort_early": switch(True),
    },
)
def cw_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """Carlini–Wagner L2 (2017, Eq. 7 in tanh space; Adam, binary search over c)."""
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=s["binary_search_steps"],
        steps=s["steps"],
        stepsize=s["stepsize"],
        confidence=s["confidence"],
        initial_const=s["initial_const"],
        abort_early=s["abort_early"],
    )
    return _run(attack, model, x, y, eps)


@register_attack(
    "ddn-l2",
    norm="l2",
    kind="minimal",
    params_schema={"steps": steps(100), "init_epsilon": positive(1.0), "gamma": GAMMA},
)
def ddn_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """Decoupled Direction and Norm (Rony et al. 2019, Alg. 1): ℓ2 minimum-norm."""
    attack = fb.attacks.DDNAttack(init_epsilon=s["init_epsilon"], steps=s["steps"], gamma=s["gamma"])
    return _run(attack, model, x, y, eps)


@register_attack(
    "fmn-linf",
    norm="linf",
    kind="minimal",
    params_schema={
        "steps": steps(100),
        "max_stepsize": positive(1.0),
        "gamma": GAMMA,
        "binary_search_steps": steps(10),
    },
)
def fmn_linf(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """Fast Minimum-Norm ℓ∞ (Pintor et al. 2021, Alg. 1), started from the clean input."""
    attack = fb.attacks.LInfFMNAttack(
        steps=s["steps"],
        max_stepsize=s["max_stepsize"],
        gamma=s["gamma"],
        binary_search_steps=s["binary_search_steps"],
    )
    return _run(attack, model, x, y, eps)


PGD_PARAMS = {"steps": steps(50), "rel_stepsize": positive(0.25), "random_start": switch(True)}


@register_attack("pgd-linf", norm="linf", kind="eps", params_schema=PGD_PARAMS)
def pgd_linf(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """PGD-ℓ∞ (Madry et al. 2018, Eq. 2): sign steps of rel_stepsize·ε from a uniform random start."""
    attack = fb.attacks.LinfPGD(
        rel_stepsize=s["rel_stepsize"], steps=s["steps"], random_start=s["random_start"]
    )
    return _run(attack, model, x, y, eps)


@register_attack("pgd-l2", norm="l2", kind="eps", params_schema=PGD_PARAMS)
def pgd_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """PGD-ℓ2 (Madry et al. 2018): normalised-gradient steps of rel_stepsize·ε, projected onto the ε-ball."""
    attack = fb.attacks.L2PGD(
        rel_stepsize=s["rel_stepsize"], steps=s["steps"], random_start=s["random_start"]
    )
    return _run(attack, model, x, y, eps)
