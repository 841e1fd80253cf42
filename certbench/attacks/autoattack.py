"""AutoAttack (Croce & Hein 2020, ICML, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"), standard version, through torchattacks 3.5.1.

The standard version runs four attacks in turn, each on the points that the ones before it did not
break: APGD-CE (Auto-PGD on the cross-entropy loss), APGD-T (Auto-PGD on the targeted DLR loss,
against each of the 9 highest-scoring other classes), FAB-T (the targeted fast adaptive boundary
attack, Croce & Hein 2020, ICML, "Minimally distorted adversarial examples with a fast adaptive
boundary attack"; same 9 classes) and the query-based Square Attack (Andriushchenko et al. 2020,
ECCV), one restart each, 100 iterations for APGD and FAB and 5,000 queries for Square. Those are the
defaults here. ``torchattacks.AutoAttack(version="standard")`` runs 10 iterations; the attacks are
therefore assembled here from torchattacks' own APGD, APGDT, FAB and Square with the paper's settings.

The library's RNG seed is drawn from torch's generator, which :meth:`certbench.attacks.base.Attack.run`
seeds, so a run is deterministic given its seed; torchattacks' reseeding of the global generator
is confined to this call. As for every attack, success is decided by our own forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torchattacks
from torch import nn

from certbench.attacks.base import Norm, register_attack, steps

PARAMS = {
    "steps": steps(100),
    "n_queries": steps(5000),
    "n_restarts": steps(1),
    "n_target_classes": steps(9),
}


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm,
    eps: float,
    *,
    steps: int,
    n_queries: int,
    n_restarts: int,
    n_target_classes: int,
    seed: int,
) -> torch.Tensor:
    """Run APGD-CE, APGD-T, FAB-T and Square on ``(x, y)`` at ``eps``; return the raw examples.

    ``steps``: APGD's and FAB's iterations; ``n_queries``: Square's; ``n_restarts``: of each
    attack; ``n_target_classes``: of APGD-T and FAB-T (at most the number of classes − 1).
    APGD-T needs at least four classes and Square-ℓ2 images of at least 5 × 5 pixels; each is left
    out below that (the 2-D toy data set ``rings2d``).
    """
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    lib_norm = {"linf": "Linf", "l2": "L2"}[norm]
    common = {"norm": lib_norm, "eps": eps, "n_restarts": n_restarts, "seed": seed}
    targeted = [torchattacks.FAB(model, steps=steps, multi_targeted=True, n_classes=classes, **common)]
    if classes >= 4:  # the targeted DLR loss divides by z_π1 − (z_π3 + z_π4) / 2 (sorted logits)
        targeted.insert(0, torchattacks.APGDT(model, steps=steps, n_classes=classes, **common))
    for attack in targeted:
        attack.n_target_classes = min(n_target_classes, classes - 1)
    attacks = [torchattacks.APGD(model, steps=steps, loss="ce", **common), *targeted]
    if norm == "linf" or min(x.shape[-2:]) >= 5:  # Square-ℓ2 starts from a 5 × 5 grid of squares
        attacks.append(torchattacks.Square(model, n_queries=n_queries, **common))
    # torchattacks reseeds the CPU generator and that of the current CUDA device: restore them all
    devices = list(range(torch.cuda.device_count())) if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return torchattacks.MultiAttack(attacks)(x, y).detach()


def _run(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float, s: Mapping[str, Any]
) -> torch.Tensor:
    seed = int(torch.randint(2**31 - 1, ()))
    return autoattack(model, x, y, norm, eps, seed=seed, **s)


@register_attack("autoattack-linf", norm="linf", kind="eps", params_schema=PARAMS)
def autoattack_linf(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """AutoAttack-ℓ∞ (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square, standard version."""
    assert eps is not None, "Attack.run checks that a fixed-eps attack gets eps"
    return _run(model, x, y, "linf", eps, s)


@register_attack("autoattack-l2", norm="l2", kind="eps", params_schema=PARAMS)
def autoattack_l2(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, s: Mapping[str, Any]
) -> torch.Tensor:
    """AutoAttack-ℓ2 (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square, standard version."""
    assert eps is not None, "Attack.run checks that a fixed-eps attack gets eps"
    return _run(model, x, y, "l2", eps, s)
