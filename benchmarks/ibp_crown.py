"""Cost of IBP and CROWN-IBP training against plain cross-entropy, and certification throughput.

Training: seconds per epoch of the ``standard``, ``ibp`` and ``crown-ibp`` methods on the same
architecture, measured over a few optimiser steps on Fashion-MNIST (the Debian package, or
sklearn digits upsampled to 28×28 when it is missing) and scaled to a 60,000-image epoch. IBP
and CROWN-IBP run at ε = ε_train, CROWN-IBP with β = 0.5 so that both bounds are computed
(the costly phase of its schedule), with and without loss fusion. Goals: IBP ≤ 2×, CROWN-IBP
≤ 4× standard. Published (GPU, CIFAR-10, Zhang et al. 2020): IBP 17.4 s, CROWN-IBP 112.4 s,
CROWN-IBP with loss fusion 43.3 s. On a CPU the multiply-adds set a floor: standard costs one
product per layer forward and two backward; IBP adds the interval's two (centre and radius)
forward and four backward, so its floor is 3× however the bounds are coded.

Certification: samples per second of the ``ibp``, ``crown-ibp`` and ``crown`` certificates on
``cnn-small`` after a short IBP training (the number of unstable ReLUs, which drives CROWN's
cost, depends on training). Ratios come from CPU time, which other jobs disturb less than wall time.

Usage: ``python benchmarks/ibp_crown.py [--archs cnn-small,mlp] [--steps 8] [--samples 512] [--threads 1]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from certbench.certificates import CERTIFICATES, CERTIFIED
from certbench.config import validate_against
from certbench.data.fashion_mnist import load as load_fashion_mnist_split
from certbench.data.loaders import DatasetNotFoundError
from certbench.data.specs import DATASETS
from certbench.method import Method, RunContext, get_method

EPOCH_IMAGES, BATCH = 60_000, 256
T = TypeVar("T")


def data() -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        train, test = load_fashion_mnist_split(Path("data"), False)
        return "Fashion-MNIST", *train.tensors, *test.tensors
    except DatasetNotFoundError:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
        x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        y = torch.tensor(digits.target)
        return "digits upsampled to 28×28", x[:1500], y[:1500], x[1500:], y[1500:]


def make(name: str, epochs: int = 10, **params: object) -> Method:
    spec = DATASETS.get("fashion-mnist")
    cls = get_method(name)
    filled = validate_against({"type": "object", "properties": cls.params_schema}, params)
    method = cls(filled, RunContext(spec, epochs, spec.eps_linf, spec.eps_l2, torch.device("cpu")))
    method.check()
    return method


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its wall and its CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def seconds_per_step(
    method: Method, arch: str, x: torch.Tensor, y: torch.Tensor, steps: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of one optimiser step at progress 1, after one warm-up step."""
    torch.manual_seed(0)
    model = method.build_model(arch, {})
    method.prepare(model)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-4)
    batches = torch.randperm(len(x))[: BATCH * (steps + 1)].split(BATCH)

    def step(index: torch.Tensor) -> None:
        out = method.loss(model, x[index], y[index], 1.0)
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()

    step(batches[0])
    _, wall, cpu = zip(*(timed(lambda b=b: step(b)) for b in batches[1:]))
    return float(np.median(wall)), float(np.median(cpu))


def quick_ibp_model(x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    """cnn-small after ``steps`` IBP steps with ε ramping to 0.1 (a few minutes of a real run)."""
    method = make("ibp", epochs=1, eps_train=0.1, schedule="linear", schedule_start=0, schedule_length=1)
    torch.manual_seed(0)
    model = method.build_model("cnn-small", {})
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i, index in enumerate(torch.randperm(len(x))[: 128 * steps].split(128)):
        out = method.loss(model, x[index], y[index], min(1.0, 1.5 * i / steps))
        optimiser.zero_grad(set_to_none=True)
        out.loss.backward()
        optimiser.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="cnn-small,mlp")
    parser.add_argument("--steps", type=int, default=8, help="timed optimiser steps per method")
    parser.add_argument("--certificates", default="ibp,crown-ibp,crown")
    parser.add_argument("--samples", type=int, default=512, help="test samples each certificate runs on")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source, x_train, y_train, x_test, y_test = data()
    print(
        f"data: {source}; batch {BATCH}; epoch = {EPOCH_IMAGES} images; "
        f"torch threads {torch.get_num_threads()}"
    )

    print("\n| arch | method | s/epoch (CPU) | s/epoch (wall) | × standard (CPU) | goal |")
    print("|---|---|---|---|---|---|")
    steps_per_epoch = EPOCH_IMAGES / BATCH
    for arch in args.archs.split(","):
        methods = {
            "standard": (make("standard"), None),
            "ibp": (make("ibp", eps_train=args.eps), 2.0),
            "crown-ibp": (make("crown-ibp", eps_train=args.eps, beta_final=0.5), 4.0),
            "crown-ibp, loss fusion": (
                make("crown-ibp", eps_train=args.eps, beta_final=0.5, loss_fusion=True),
                4.0,
            ),
        }
        base = None
        for name, (method, goal) in methods.items():
            wall, cpu = seconds_per_step(method, arch, x_train, y_train, args.steps)
            base = base or cpu
            verdict = "" if goal is None else f"≤ {goal:g}× {'met' if cpu / base <= goal else 'MISSED'}"
            print(
                f"| {arch} | {name} | {cpu * steps_per_epoch:.1f} | {wall * steps_per_epoch:.1f} | "
                f"{cpu / base:.2f} | {verdict} |",
                flush=True,
            )

    started = time.perf_counter()
    model = quick_ibp_model(x_train, y_train)
    with torch.no_grad():
        accuracy = (model(x_test[:1024]).argmax(1) == y_test[:1024]).float().mean()
    print(
        f"\ncnn-small after 150 IBP steps ({time.perf_counter() - started:.0f} s): "
        f"clean accuracy {accuracy:.3f}; certificates at ε = {args.eps}"
    )
    print("\n| certificate | samples | samples/s (CPU) | samples/s (wall) | certified |")
    print("|---|---|---|---|---|")
    x, y = x_test[: args.samples], y_test[: args.samples]
    for name in args.certificates.split(","):
        certificate = CERTIFICATES.get(name)()
        result, wall, cpu = timed(
            lambda certificate=certificate: certificate.certify(model, x, y, [args.eps])
        )
        certified = (result.status[args.eps] == CERTIFIED).mean()
        errors = f" ({len(result.errors)} errors)" if result.errors else ""
        print(
            f"| {name} | {len(x)} | {len(x) / cpu:.1f} | {len(x) / wall:.1f} | {certified:.3f}{errors} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
