"""LipSDP-Neuron on 784-input MLPs: solve time and bound against width and depth.

For every (depth, width) an MLP 784-width(-width)-10 is trained briefly on Fashion-MNIST (or left
at its random initialisation with ``--random``); then the verified LipSDP bound (SCS by default),
the solver's raw √ρ, the product of spectral norms and the largest sampled input-gradient norm
(a lower bound on L) are printed as one table. All bounds in pixel units (Normalize folded in).

``--study`` then times one verified solve of the last (depth, width) against the goal of 10 s
(784-100-100 on 2 cores) in the settings that matter: SCS tolerance, BLAS threads (one, or
OpenBLAS's default), and a warm start from the previous solve (a cached, compiled
:class:`certbench.bounds.lipsdp.LipSDPProblem`) on weights perturbed by 1 %, as between two ADMM
iterations. Every bound printed is the float64-verified one; "repair %" is its excess over √ρ.

    .venv/bin/python benchmarks/lipsdp.py [--random] [--widths 32 64 100] [--depths 1 2] [--study]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipsdp import BLAS_THREADS, LipSDPProblem, lipsdp, mlp_weights, product_bound
from certbench.data.loaders import load_split
from certbench.data.specs import DATASETS
from certbench.models import build


def sampled_lower_bound(model: nn.Module, x: torch.Tensor) -> float:
    """max_x ‖∂f/∂x‖₂ over the given inputs (spectral norm of each 10×784 Jacobian)."""
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x).flatten(2)
    return float(torch.linalg.matrix_norm(jac.detach(), 2).max())


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> float:
    """Adam 1e-3, batch 100; returns the training accuracy of the last epoch."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    correct = 0
    for _ in range(epochs):
        correct = 0
        for batch in torch.randperm(len(x)).split(100):
            logits = model(x[batch])
            loss = F.cross_entropy(logits, y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            correct += int((logits.argmax(1) == y[batch]).sum())
    return correct / len(x)


def timed_solve(
    weights: Sequence[np.ndarray],
    eps: float,
    cache: dict[tuple[int, ...], LipSDPProblem],
    threads: int | None,
) -> tuple[float, int, float, float, str]:
    """(seconds, SCS iterations, √ρ as returned, verified bound, status) of one :func:`lipsdp`."""
    started = time.perf_counter()
    result = lipsdp(weights, eps=eps, cache=cache, warm_start=True, blas_threads=threads)
    seconds = time.perf_counter() - started
    iterations = next(iter(cache.values())).problem.solver_stats.num_iters
    bound = result.bound if result.bound is not None else math.nan
    raw = result.raw_bound if result.raw_bound is not None else math.nan
    return seconds, iterations, raw, bound, result.status


def solve_study(weights: Sequence[np.ndarray], arch: str) -> None:
    """Time one verified LipSDP solve per setting (module docstring) and print them against 10 s."""
    rng = np.random.default_rng(1)
    perturbed = [w * (1 + 0.01 * rng.standard_normal(w.shape)) for w in weights]
    print(f"\n{arch}: one verified LipSDP solve, goal ≤ 10 s on 2 cores")
    header = (
        f"{'setting':<42}{'time s':>8}{'iters':>7}{'raw √ρ':>10}{'verified':>10}{'repair %':>10}"
        f"{'status':>10}"
    )
    print(header)
    print("-" * len(header))
    for threads in (BLAS_THREADS, None):
        for eps in (1e-5, 1e-4, 1e-3) if threads is not None else (1e-5,):
            cache: dict[tuple[int, ...], LipSDPProblem] = {}
            runs = [("cold", weights), ("warm, W perturbed 1 %", perturbed)]
            for label, ws in runs if threads is not None else runs[:1]:
                seconds, iters, raw, bound, status = timed_solve(ws, eps, cache, threads)
                name = f"SCS eps {eps:g}, BLAS {threads or 'default'}, {label}"
                print(
                    f"{name:<42}{seconds:>8.1f}{iters:>7}{raw:>10.5f}{bound:>10.5f}"
                    f"{100 * (bound / raw - 1):>10.3f}{status:>10}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 100])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--random", action="store_true", help="random initialisation instead of brief training"
    )
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--solver", default="SCS", choices=["SCS", "CLARABEL"])
    parser.add_argument("--eps", type=float, default=1e-5, help="solver tolerance")
    parser.add_argument("--time-limit", type=float, default=900.0)
    parser.add_argument("--study", action="store_true", help="time one solve per setting (docstring)")
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = DATASETS.get("fashion-mnist")
    (train_set, test_set) = load_split("fashion-mnist", "data", False)[1]
    x_train, y_train = train_set.tensors[0][: args.train_size], train_set.tensors[1][: args.train_size]
    x_probe = test_set.tensors[0][:500]
    print(
        f"torch threads: {torch.get_num_threads()}; solver {args.solver}, eps {args.eps:g}; "
        + (
            "random"
            if args.random
            else f"trained {args.epochs} epochs on {len(x_train)} Fashion-MNIST images"
        )
    )
    header = (
        f"{'arch':<16}{'acc':>6}{'SDP dim':>9}{'time s':>9}{'status':>10}{'raw √ρ':>10}{'LipSDP':>10}"
        f"{'repair %':>10}{'∏‖W‖₂':>10}{'∏/LipSDP':>10}{'sampled':>10}{'LipSDP/smp':>11}"
    )
    print(header)
    print("-" * len(header))
    for depth in args.depths:
        for width in args.widths:
            torch.manual_seed(width * 10 + depth)
            model = build("mlp", spec, widths=[width] * depth)
            accuracy = math.nan if args.random else train_briefly(model, x_train, y_train, args.epochs)
            model.eval()
            weights = mlp_weights(model)
            started = time.perf_counter()
            result = lipsdp(weights, solver=args.solver, eps=args.eps, time_limit=args.time_limit)
            seconds = time.perf_counter() - started
            naive = product_bound(weights)
            lower = sampled_lower_bound(model.double(), x_probe.double())
            bound = result.bound if result.bound is not None else math.nan
            raw = result.raw_bound if result.raw_bound is not None else math.nan
            arch = "784-" + "-".join([str(width)] * depth) + "-10"
            print(
                f"{arch:<16}{accuracy:>6.3f}{width + width * depth:>9}{seconds:>9.1f}{result.status:>10}"
                f"{raw:>10.4f}{bound:>10.4f}{100 * (bound / raw - 1):>10.4f}{naive:>10.3f}"
                f"{naive / bound:>10.3f}{lower:>10.4f}{bound / lower:>11.4f}",
                flush=True,
            )
    if args.study:
        solve_study(weights, arch)


if __name__ == "__main__":
    main()
