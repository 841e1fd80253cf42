"""LipSDP-Neuron on 784-input MLPs: solve time and bound against width and depth.

For every (depth, width) an MLP 784-width(-width)-10 is trained briefly on Fashion-MNIST (or left
at its random initialisation with ``--random``); then the verified LipSDP bound (SCS by default),
the solver's raw √ρ, the product of spectral norms and the largest sampled input-gradient norm
(a lower bound on L) are printed as one table. All bounds in pixel units (Normalize folded in).

    .venv/bin/python benchmarks/lipsdp.py [--random] [--widths 32 64 100] [--depths 1 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipsdp import lipsdp, mlp_weights, product_bound
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


if __name__ == "__main__":
    main()
