"""SABR (Müller et al. 2023) and MTL-IBP (De Palma et al. 2024) against IBP at equal epochs, on the CPU.

Trains ``cnn-small`` on Fashion-MNIST (the Debian package; digits when it is missing) with the real
training loop: ``standard`` (the cost baseline), ``ibp`` with certbench's defaults (κ_final 0.5, no
warm-up recipe), ``ibp`` with the recipe SABR and MTL-IBP default to (Shi et al.'s IBP
initialisation and warm-up regularisers, κ_final 0: SABR's λ = 1 and MTL-IBP's α = 1 limit, so the
loss is the only difference), ``sabr`` (λ = ``--ratio``) and ``mtl-ibp`` (α = ``--alpha``), with the
same data, ε schedule, optimiser and seed. Each model is certified at ε = 0.1 on the first test
points by the ``ibp`` and ``crown-ibp`` certificates (``--crown`` adds ``crown``, which costs about
as much again as all the training), and the table gives clean and certified accuracy and seconds
per epoch against ``standard``.

Goal (issue 20): SABR and MTL-IBP give a better clean/certified trade-off than IBP. Both papers
certify with complete verifiers (MN-BaB, OVAL branch and bound), which certbench does not have: the
certificates here are incomplete, and the looser the certificate, the more it favours IBP-trained
models, whose bounds are what IBP training makes tight.

Cost: SABR adds its PGD attack (8 steps: 8 forward and backward passes and 9 forward passes of the
batch) to one IBP pass of a small box, MTL-IBP one attack step and one more forward pass to IBP's.
The wall seconds per epoch of the runs above depend on the machine's other jobs, so a second table
gives the CPU seconds of one optimiser step (batch 256, median of a few) before and during the ramp,
scaled to a 60,000-image epoch, against ``standard``. Neither paper reports a per-epoch cost against
standard training in the text this was written from, so no published overhead stands beside ours.

Default budget: 25,600 training images, batch 256, 4 epochs (400 optimiser steps), ε held at 0 for
half an epoch and ramped (smoothed) to ε_train = 0.1 over 2 epochs, Adam 5e-4, gradient norm clipped
at 10; 500 test points. About 6 minutes of one core.

Usage: ``python benchmarks/sabr_mtl.py [--epochs 4] [--train-size 25600] [--test-size 500] [--seed 0]
[--ratio 0.4] [--alpha 0.5] [--crown]``
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from shi_recipe import Run, budget_parser, dataset, print_step_costs, run_config

from certbench.certificates import CERTIFIED
from certbench.evaluate import certify
from certbench.train import train

RECIPE = {"init": "ibp", "warmup_reg": 0.5, "warmup_tau": 0.5, "kappa_final": 0.0}


def certified_fraction(result: dict[str, Any], certificate: str) -> float:
    status = next(iter(result["certificates"][certificate]["status"].values()))
    return sum(s == CERTIFIED for s in status) / len(status)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(clean, certified) ``a`` is at least as good as ``b`` in both and better in one."""
    return a[0] >= b[0] and a[1] >= b[1] and a != b


def main() -> None:
    parser = budget_parser(__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4, help="SABR's λ (subselection_ratio)")
    parser.add_argument("--alpha", type=float, default=0.5, help="MTL-IBP's α")
    parser.add_argument("--crown", action="store_true", help="also certify with CROWN")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = dataset()
    ramp = {"eps_train": args.eps, "schedule_start": args.epochs / 8, "schedule_length": args.epochs / 2}
    runs = {
        "standard": Run("standard", {}),
        "ibp (defaults)": Run("ibp", ramp),
        "ibp (same recipe)": Run("ibp", {**ramp, **RECIPE}),
        f"sabr λ={args.ratio:g}": Run("sabr", {**ramp, "subselection_ratio": args.ratio}),
        f"mtl-ibp α={args.alpha:g}": Run("mtl-ibp", {**ramp, "alpha": args.alpha}),
    }
    certificates = ("ibp", "crown-ibp", "crown") if args.crown else ("ibp", "crown-ibp")
    print(
        f"data: {data} ({args.train_size if data == 'fashion-mnist' else 'all'} training images), "
        f"cnn-small, {args.epochs} epochs, batch 256, ramp {json.dumps(ramp)}; recipe of sabr, mtl-ibp "
        f"and 'ibp (same recipe)': {json.dumps(RECIPE)}; certified at ε = {args.eps} on "
        f"{args.test_size} test points; torch threads {torch.get_num_threads()}\n"
    )
    header = " | ".join(f"certified, {c} (%)" for c in certificates)
    print(f"| run | clean (%) | {header} | s/epoch | × standard |")
    print("|---|---|" + "---|" * len(certificates) + "---|---|")
    base = None
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    with TemporaryDirectory() as tmp:
        for index, (label, run) in enumerate(runs.items()):
            config = run_config(args, data, run, certificates)
            out = Path(tmp) / str(index)
            started = time.perf_counter()
            record = train(config, out)
            if record["status"] != "ok":
                print(f"| {label} | {record['status']}: {record['message']} |", flush=True)
                continue
            seconds = record["cost"]["seconds_per_epoch"]
            base = base or seconds
            result = certify(config, out, out / "certify.json")
            labels = torch.tensor(result["samples"]["label"])
            clean = float((torch.tensor(result["samples"]["prediction"]) == labels).float().mean())
            scores[label] = {c: (clean, certified_fraction(result, c)) for c in certificates}
            cells = " | ".join(f"{100 * scores[label][c][1]:.1f}" for c in certificates)
            print(
                f"| {label} | {100 * clean:.1f} | {cells} | {seconds:.1f} | {seconds / base:.2f} |"
                f"  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print_step_costs(args, data, runs)
    print("\ngoal: a better clean/certified trade-off than IBP (same recipe and defaults), per certificate:")
    ibps = [label for label in runs if label.startswith("ibp") and label in scores]
    for label in [label for label in runs if label.startswith(("sabr", "mtl-ibp")) and label in scores]:
        for certificate in certificates:
            ours = scores[label][certificate]
            verdicts = []
            for ibp in ibps:
                theirs = scores[ibp][certificate]
                if dominates(ours, theirs):
                    verdict = "better"
                elif dominates(theirs, ours) or ours == theirs:
                    verdict = "not better"
                else:
                    verdict = "a different trade-off"
                verdicts.append(f"vs {ibp}: {verdict}")
            print(
                f"  {label}, {certificate}: clean {100 * ours[0]:.1f} / certified {100 * ours[1]:.1f}; "
                + "; ".join(verdicts)
            )


if __name__ == "__main__":
    main()
