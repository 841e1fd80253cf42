"""Cost of the LMT family against plain cross-entropy, and of the ``lipschitz-l2`` certificate.

Prints, per architecture: seconds per epoch of every method (a training step = loss, backward,
optimiser step, ``after_step``) and its ratio to ``standard`` on the same architecture, and the
time to certify a test set once the bound is known against a plain forward pass over it.
Goals: LMT++ ≤ 1.3×, Parseval ≤ 1.5×, certification ≤ 1.1×. Inputs are random images of the
data set's shape (the cost does not depend on their values); each figure is the best of
``--repeats`` interleaved measurements on one thread by default, which filters out most of the
other load on a shared machine.

    .venv/bin/python benchmarks/lipschitz_methods.py --dataset mnist --archs cnn-small cnn-large
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from certbench.certificates import CERTIFICATES
from certbench.certificates.lipschitz import exact_bound
from certbench.data.specs import DATASETS, DatasetSpec
from certbench.method import Method, RunContext, get_method

METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("standard", "standard", {}),
    ("weight-decay", "weight-decay", {}),
    ("spectral", "spectral", {}),
    ("lipschitz-reg", "lipschitz-reg", {}),
    ("LMT (global)", "lmt", {"margin": "global"}),
    ("LMT++", "lmt", {"margin": "last-layer"}),
    ("LMT++ clip", "lmt", {"margin": "last-layer", "clip": True}),
    ("parseval", "parseval", {}),
    ("parseval rows 25%", "parseval", {"row_fraction": 0.25}),
]
GOALS = {"LMT++": 1.3, "parseval": 1.5, "certify": 1.1}


def make(name: str, spec: DatasetSpec, **params: Any) -> Method:
    cls = get_method(name)
    filled = {key: schema["default"] for key, schema in cls.params_schema.items()} | params
    method = cls(filled, RunContext(spec, 10, spec.eps_linf, spec.eps_l2, torch.device("cpu")))
    method.check()
    return method


def time_steps(
    method: Method,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
) -> float:
    """Seconds per training step over ``steps`` steps."""
    started = time.perf_counter()
    for _ in range(steps):
        out = method.loss(model, x, y, 0.5)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        method.after_step(model)
    return (time.perf_counter() - started) / steps


def training_costs(spec: DatasetSpec, arch: str, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of every method, measured in interleaved rounds."""
    x, y = torch.rand(batch, *spec.shape), torch.randint(spec.num_classes, (batch,))
    setups = []
    for label, name, params in METHODS:
        torch.manual_seed(0)
        method = make(name, spec, **params)
        model = method.build_model(arch, {})
        method.prepare(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        time_steps(method, model, optimizer, x, y, 2)  # warm-up
        setups.append((label, method, model, optimizer))
    best = {label: float("inf") for label, *_ in setups}
    for _ in range(repeats):
        for label, method, model, optimizer in setups:
            best[label] = min(best[label], time_steps(method, model, optimizer, x, y, steps))
    return best


def certification_costs(
    spec: DatasetSpec, arch: str, samples: int, batch: int, repeats: int
) -> tuple[float, float, float]:
    """(bound seconds, best certify seconds with the bound cached, best plain forward seconds)."""
    torch.manual_seed(0)
    model = make("standard", spec).build_model(arch, {}).eval()
    x, y = torch.rand(samples, *spec.shape), torch.randint(spec.num_classes, (samples,))
    certificate = CERTIFICATES.get("lipschitz-l2")(batch_size=batch)
    _, bound_seconds = exact_bound(model, spec.shape)
    certify, forward = float("inf"), float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        certificate.certify(model, x, y, list(spec.eps_l2))
        certify = min(certify, time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, samples, batch):
                model(x[start : start + batch]).argmax(1)
        forward = min(forward, time.perf_counter() - started)
    return bound_seconds, certify, forward


def verdict(label: str, ratio: float) -> str:
    goal = GOALS.get(label)
    return "" if goal is None else f"goal ≤ {goal}× {'met' if ratio <= goal else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--archs", nargs="+", default=["cnn-small", "cnn-large"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=None, help="samples per epoch (default: 60,000)")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier figures on a shared machine; 0: torch's choice)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = DATASETS.get(args.dataset)
    train_size = args.train_size or 60_000
    steps_per_epoch = -(-train_size // args.batch)
    print(
        f"data set shape {spec.shape}, batch {args.batch}, {train_size} samples per epoch, "
        f"{torch.get_num_threads()} threads; best of {args.repeats}"
    )
    for arch in args.archs:
        costs = training_costs(spec, arch, args.batch, args.steps, args.repeats)
        print(f"\n{arch}: training")
        print("| method | s/epoch | × standard | goal |\n|---|---|---|---|")
        for label, seconds in costs.items():
            ratio = seconds / costs["standard"]
            print(f"| {label} | {seconds * steps_per_epoch:.1f} | {ratio:.2f} | {verdict(label, ratio)} |")
        bound, certify, forward = certification_costs(spec, arch, args.test_size, args.batch, args.repeats)
        ratio = certify / forward
        print(
            f"{arch}: certifying {args.test_size} points: exact bound {bound:.2f} s (once per model), then "
            f"{certify:.3f} s vs plain forward {forward:.3f} s = {ratio:.2f}× ({verdict('certify', ratio)})"
        )


if __name__ == "__main__":
    main()
