"""Cost of each attack relative to one batched forward+backward pass of the same model.

Model: ``cnn-small`` (Kolter–Wong) on 28×28 inputs, trained for a few seconds on scikit-learn's
digits upsampled to 28×28 (no download needed). For every attack it prints wall time, the number
of batched model calls with and without input gradients (counted by a forward hook), the attack's
CPU time in batched forward+backward equivalents, and its overhead over the calls it made. For
DeepFool the gradient-call count is (iterations run) × (classes − 1).

Usage: ``python benchmarks/attacks.py [--samples 256] [--attacks deepfool-l2,pgd-linf,...]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from certbench.attacks import ATTACKS, Attack
from certbench.attacks.base import attack_mode
from certbench.data.specs import DATASETS
from certbench.models import build


def digits_28(n_train: int = 1500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits in [0, 1], bilinearly upsampled from 8×8 to 28×28; train and test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 4, lr: float = 2e-3) -> None:
    """Plain cross-entropy training with Adam, batches of 64; the model is left in eval mode."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()


def cost(fn: Callable[[], object], repeats: int = 10) -> tuple[float, float]:
    """Least (wall, CPU) seconds of ``fn`` over ``repeats`` calls after one warm-up call.

    CPU time of this process is far less sensitive than wall time to other jobs on the machine,
    so cost ratios are formed from CPU times; wall times are printed for scale.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


class CallCounter:
    """Forward hook counting batched model calls with and without input gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.grad = self.plain = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if inputs[0].requires_grad:
            self.grad += 1
        else:
            self.plain += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--attacks", default=",".join(ATTACKS.names()))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 gives the steadiest figures)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    spec = DATASETS.get("mnist")
    model = build("cnn-small", spec)
    x_train, y_train, x_test, y_test = digits_28()
    start = time.perf_counter()
    train(model, x_train, y_train)
    x, y = x_test[: args.samples], y_test[: args.samples]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    print(
        f"cnn-small on 28×28 digits: trained in {time.perf_counter() - start:.1f} s, "
        f"clean accuracy {correct.float().mean():.3f} on {len(x)} samples; "
        f"torch threads {torch.get_num_threads()}"
    )

    # The unit: one batched forward+backward to the input (parameters frozen, as inside the attacks),
    # on the correctly classified samples, which are what the library receives. Measured again
    # before every attack so that drifting machine load affects both sides of each ratio alike.
    xc = x[correct]

    def forward_backward() -> None:
        model(xc.clone().requires_grad_()).sum().backward()

    def forward() -> None:
        with torch.no_grad():
            model(xc)

    def units() -> tuple[float, float]:
        with attack_mode(model):
            return cost(forward_backward)[1], cost(forward)[1]

    def train_step() -> None:
        model(xc).sum().backward()

    t_fb, t_f = units()
    t_train = cost(train_step)[1]
    model.zero_grad(set_to_none=True)
    print(
        f"CPU time of one batched forward+backward on {len(xc)} samples: {t_fb * 1e3:.1f} ms (input gradient "
        f"only), forward alone {t_f * 1e3:.1f} ms, with parameter gradients too {t_train * 1e3:.1f} ms\n"
    )

    eps_values = {"linf": spec.eps_linf, "l2": spec.eps_l2}
    print(
        "| attack | ε | wall (s) | CPU ms / sample | fwd+bwd equivalents | grad calls | plain calls "
        "| overhead vs counted calls | success | median norm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    deepfool = ""
    for name in args.attacks.split(","):
        attack = Attack(name)
        for eps in eps_values[attack.norm] if attack.kind == "eps" else (None,):
            t_fb, t_f = units()
            counter = CallCounter(model)
            wall, cpu = time.perf_counter(), time.process_time()
            result = attack.run(model, x, y, eps, seed=0)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            counter.handle.remove()
            counted = counter.grad * t_fb + counter.plain * t_f
            norms = result.l2 if attack.norm == "l2" else result.linf
            hit = result.success & correct.numpy()
            median = f"{np.median(norms[hit]):.3f}" if hit.any() else "–"
            print(
                f"| {name} | {'–' if eps is None else f'{eps:g}'} | {wall:.1f} | {cpu / len(x) * 1e3:.1f} "
                f"| {cpu / t_fb:.0f} | {counter.grad} | {counter.plain} | {cpu / counted:.2f} "
                f"| {hit.sum() / correct.sum():.3f} | {median} |"
            )
            if name == "deepfool-l2":
                iterations = (counter.grad - 1) // (spec.num_classes - 1)
                deepfool = (
                    f"DeepFool on {len(x)} samples: {iterations} iterations × {spec.num_classes - 1} other "
                    f"classes = {counter.grad - 1} batched forward+backward passes (+1 final check) → "
                    f"{counter.grad * t_fb:.2f} s CPU predicted, {cpu:.2f} s CPU measured "
                    f"({cpu / (counter.grad * t_fb):.2f}×)."
                )
    print(
        f"\nfwd+bwd equivalents = attack CPU time / CPU time of one batched forward+backward (same samples). "
        f"grad/plain calls: batched model calls with/without input gradient; DeepFool's grad calls = "
        f"iterations × (classes − 1) = iterations × {spec.num_classes - 1} (+1 for the final check). "
        f"overhead = attack CPU time / (grad calls × fwd+bwd + plain calls × forward)."
    )
    if deepfool:
        print(deepfool)


if __name__ == "__main__":
    main()
