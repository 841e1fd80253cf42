"""AutoAttack from two libraries side by side: time, verified success rate and agreement.

AutoAttack (Croce & Hein 2020, ICML, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"), standard version: APGD-CE, APGD-T (9 target
classes), FAB-T (9 target classes), Square (5,000 queries), one restart each, 100 iterations for
APGD and FAB. Compared on ``cnn-small`` trained for a few seconds on the default data set
(scikit-learn's digits, the first 200 of its test points, as the default DAG), at the default config's ε:

- ``torchattacks-standard``: ``torchattacks.AutoAttack(version="standard")`` as shipped (its APGD,
  APGD-T and FAB run 10 iterations, not the paper's 100);
- ``torchattacks-paper``: the same four torchattacks attacks with the paper's 100 iterations
  (what ``certbench/attacks/autoattack.py`` runs by default);
- ``art-default``: ``art.attacks.evasion.AutoAttack`` as shipped: APGD-CE and APGD-DLR with 5
  restarts each, DeepFool and Square with 5 restarts (ART has no FAB; its targeted mode runs
  every attack once per target class), untargeted, initial APGD step 2ε as in the paper;
- ``pgd-20``: certbench's ``pgd-linf`` / ``pgd-l2`` with 20 steps, the default DAG's setting, for scale.

Every example is clipped and projected into the ε-ball and judged by our own forward pass
(:func:`certbench.attacks.base.project`); "agree" is the fraction of test points on which both
libraries succeed or both fail. Times are wall and CPU seconds on one torch thread.

Usage: ``python benchmarks/autoattack_compare.py [--samples 200] [--epochs 10]
[--linf 0.05 0.1] [--l2 0.25 0.5]``
"""

from __future__ import annotations

import argparse
import sys
import time
import types
import warnings
from collections.abc import Callable

import numpy as np
import torch
from attacks import train as fit
from torch import nn

from certbench.attacks import Attack
from certbench.attacks.base import Norm, attack_mode, predict, project
from certbench.data.loaders import load_split
from certbench.models import build

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, Norm, float], torch.Tensor]


def trained_cnn_small(epochs: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``cnn-small`` trained with Adam on the digits training split; the test split."""
    spec, (train, test) = load_split("digits")
    torch.manual_seed(0)
    model = build("cnn-small", spec)
    fit(model, *train.tensors, epochs=epochs, lr=1e-3)
    return model, *test.tensors


def torchattacks_standard(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float
) -> torch.Tensor:
    import torchattacks

    lib_norm = "Linf" if norm == "linf" else "L2"
    return torchattacks.AutoAttack(model, norm=lib_norm, eps=eps, version="standard", n_classes=10, seed=0)(
        x, y
    )


def torchattacks_paper(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float
) -> torch.Tensor:
    from certbench.attacks.autoattack import autoattack

    return autoattack(
        model, x, y, norm, eps, steps=100, n_queries=5000, n_restarts=1, n_target_classes=9, seed=0
    )


def art_default(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    # ART 1.20.1's AutoAttack.generate imports `multiprocess`, which is not among ART's dependencies
    # and is used only with parallel_pool_size > 0; a placeholder lets the serial path run.
    sys.modules.setdefault("multiprocess", types.ModuleType("multiprocess"))
    classifier = PyTorchClassifier(
        model, nn.CrossEntropyLoss(), tuple(x.shape[1:]), 10, clip_values=(0.0, 1.0), device_type="cpu"
    )
    np.random.seed(0)  # ART draws its random starts and Square's tiles from numpy's global generator
    attack = AutoAttack(
        classifier, norm=np.inf if norm == "linf" else 2, eps=eps, eps_step=2 * eps, batch_size=256
    )
    for part in attack.attacks:  # no progress bars; the attacks themselves are unchanged
        if hasattr(part, "verbose"):
            part.verbose = False
    return torch.from_numpy(attack.generate(x.numpy(), y.numpy()))


def pgd_20(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    return Attack(f"pgd-{norm}", steps=20).run(model, x, y, eps, seed=0).x_adv


CANDIDATES: dict[str, Runner] = {
    "torchattacks-standard": torchattacks_standard,
    "torchattacks-paper": torchattacks_paper,
    "art-default": art_default,
    "pgd-20": pgd_20,
}


def verified(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, norm: Norm, eps: float
) -> np.ndarray:
    """Success per point, decided by our forward pass on the example clipped and projected into the ε-ball."""
    return (predict(model, project(raw.float(), x, norm, eps)) != y).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--linf", type=float, nargs="*", default=[0.05, 0.1], help="ℓ∞ ε (none: skip ℓ∞)")
    parser.add_argument("--l2", type=float, nargs="*", default=[0.25, 0.5], help="ℓ2 ε (none: skip ℓ2)")
    args = parser.parse_args()
    eps: dict[Norm, list[float]] = {"linf": args.linf, "l2": args.l2}
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    started = time.perf_counter()
    model, x, y = trained_cnn_small(args.epochs)
    x, y = x[: args.samples], y[: args.samples]
    with torch.no_grad():
        clean = (predict(model, x) == y).float().mean().item()
    print(
        f"cnn-small on digits: {args.epochs} epochs in {time.perf_counter() - started:.1f} s; "
        f"{len(x)} test points, clean accuracy {clean:.3f}"
    )
    print(f"{'norm':<5} {'eps':>5} {'attack':<22} {'wall s':>7} {'CPU s':>7} {'success':>8}  agreement")
    for norm, values in eps.items():
        for eps in values:
            success: dict[str, np.ndarray] = {}
            for name, runner in CANDIDATES.items():
                wall, cpu = time.perf_counter(), time.process_time()
                with attack_mode(model):
                    raw = runner(model, x, y, norm, eps)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                success[name] = verified(model, x, y, raw, norm, eps)
                agreement = " ".join(
                    f"{other} {np.mean(success[name] == hits):.3f}"
                    for other, hits in success.items()
                    if other != name
                )
                rate = success[name].mean()
                print(f"{norm:<5} {eps:>5g} {name:<22} {wall:>7.1f} {cpu:>7.1f} {rate:>8.3f}  {agreement}")


if __name__ == "__main__":
    main()
