"""One interface for every attack: validated settings, a batched run, and results we verify ourselves.

A library's own success flags and distances are never trusted. After the library returns,
:meth:`Attack.run` clips the example to the input box [0, 1], projects fixed-ε examples back into
the ε-ball, runs its own forward pass to decide success (prediction ≠ label), and measures the
perturbation norms on the example it returns. That forward pass, and the clean one, run in the
arithmetic certificates are proven for (:func:`certbench.precision.strict_float32`: no TF32, no
cuDNN/oneDNN convolutions); the search itself runs with the user's settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from certbench.config import check_params
from certbench.precision import strict_float32
from certbench.registry import Registry

logger = logging.getLogger(__name__)

Norm = Literal["l2", "linf"]
Kind = Literal["minimal", "eps"]
# Library call: (model, x, y, eps or None, settings) -> raw adversarial examples, same shape as x.
Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, "float | None", Mapping[str, Any]], torch.Tensor]


def steps(default: int) -> dict[str, Any]:
    """The declaration of an iteration count: an integer ≥ 1."""
    return {"type": "integer", "minimum": 1, "default": default}


def non_negative(default: float) -> dict[str, Any]:
    """The declaration of a number ≥ 0."""
    return {"type": "number", "minimum": 0, "default": default}


def positive(default: float) -> dict[str, Any]:
    """The declaration of a number > 0."""
    return {"type": "number", "exclusiveMinimum": 0, "default": default}


def switch(default: bool) -> dict[str, Any]:
    """The declaration of an on/off setting."""
    return {"type": "boolean", "default": default}


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its norm, its kind, the declaration of its settings (JSON-schema
    ``properties`` with defaults, :func:`certbench.config.check_params`) and the library call that runs it."""

    name: str
    norm: Norm
    kind: Kind
    params_schema: Mapping[str, Mapping[str, Any]]
    runner: Runner
    description: str


ATTACKS: Registry[AttackSpec] = Registry("attack", "certbench.attacks")


def register_attack(
    name: str, *, norm: Norm, kind: Kind, params_schema: Mapping[str, Mapping[str, Any]]
) -> Callable[[Runner], Runner]:
    """Register ``runner`` as attack ``name``; its docstring's first line describes the attack."""

    def decorate(runner: Runner) -> Runner:
        description = (runner.__doc__ or name).strip().splitlines()[0]
        ATTACKS.register(name)(AttackSpec(name, norm, kind, dict(params_schema), runner, description))
        return runner

    return decorate


@dataclass(frozen=True)
class AttackResult:
    """Per-sample outcome of one attack on one batch (at one ε for fixed-ε attacks).

    ``success``: our forward pass predicts ≠ label on ``x_adv`` (already misclassified samples
    count, with ``x_adv = x`` and norms 0). ``l2``/``linf``: ‖x_adv − x‖ measured in float64 on
    the returned example; ``inf`` where no adversarial example was found and ``nan`` where the
    attack raised (``error``), so that an error never reads as "robust". ``clean_pred`` is the
    clean prediction (−1 where even the clean forward pass raised).
    """

    attack: str
    norm: Norm
    eps: float | None
    x_adv: torch.Tensor
    clean_pred: np.ndarray
    success: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    error: np.ndarray
    messages: list[str]

    def error_message(self) -> str:
        """All error messages of this batch in one line ("" when none)."""
        return "; ".join(self.messages)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while attacking; restores both afterwards.

    foolbox (through eagerpy) calls ``loss.backward()``, which would otherwise accumulate
    gradients in the model's parameters and spend time computing them.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)


def model_placement(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (of ``x`` for a parameter-free model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return x.device, x.dtype if x.is_floating_point() else torch.float32


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Arg-max class of the model's logits."""
    return model(x).argmax(dim=1)


def _size(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm) -> torch.Tensor:
    delta = (x_adv.double() - x.double()).flatten(1)
    return delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)


def measure(x_adv: torch.Tensor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """ℓ2 and ℓ∞ norms of ``x_adv − x`` per sample, in float64."""
    return _size(x_adv, x, "l2").cpu().numpy(), _size(x_adv, x, "linf").cpu().numpy()


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: Norm, eps: float | None) -> torch.Tensor:
    """Clip to the box [0, 1] after projecting ``x_adv − x`` onto the ε-ball of ``norm`` (ε = None: box only).

    Clipping after the projection keeps the example inside the ball: for ℓ∞ the box and the
    ball are both coordinate-wise intervals, and for ℓ2 clipping moves every coordinate of the
    perturbation towards 0, which does not increase its norm. Rounding to the input dtype can
    leave ‖x_adv − x‖, as :func:`measure` computes it in float64, a hair above ε; such rows are
    rescaled towards ``x`` with a margin that doubles each round (2⁻²³, 2⁻²², …; at most 24
    rounds, the last one returns ``x``), so the result is always inside the ball exactly.
    """
    if eps is None:
        return x_adv.clamp(0.0, 1.0)
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        length = delta.flatten(1).norm(dim=1).clamp_min(torch.finfo(delta.dtype).tiny)
        x_adv = x + delta * (eps / length).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    x_adv = x_adv.clamp(0.0, 1.0)
    shape = (-1, *([1] * (x.dim() - 1)))
    for margin in range(-23, 1):
        size = _size(x_adv, x, norm)
        over = size > eps
        if not bool(over.any()):
            break
        shrink = (eps / size * (1 - 2.0**margin)).clamp(max=1.0).to(x.dtype).view(shape)
        x_adv = torch.where(over.view(shape), x + (x_adv - x) * shrink, x_adv)
    return x_adv


class Attack:
    """A configured attack. Call :meth:`run` once per batch (and once per ε for ``kind == "eps"``)."""

    def __init__(self, name: str, **settings: Any) -> None:
        self.spec = ATTACKS.get(name)
        self.settings: dict[str, Any] = check_params(
            self.spec.params_schema, settings, f"evaluation.attack_params.{name}."
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def norm(self) -> Norm:
        return self.spec.norm

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    def __repr__(self) -> str:
        return f"Attack({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"

    def check_eps(self, eps: float | None, x: torch.Tensor) -> float | None:
        """ε must be given exactly for fixed-ε attacks: ℓ∞ in [0, 1], ℓ2 in [0, √d] (the box's diameter)."""
        if self.kind == "minimal":
            if eps is not None:
                raise ValueError(f"{self.name} is a minimum-norm attack and takes no eps, got {eps!r}")
            return None
        if eps is None:
            raise ValueError(f"{self.name} is a fixed-eps attack and needs eps")
        top = 1.0 if self.norm == "linf" else math.sqrt(x[0].numel())
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= float(eps) <= top:
            raise ValueError(
                f"{self.name}: eps must lie in [0, {top:g}] for {self.norm} on inputs "
                f"of shape {tuple(x.shape[1:])}, got {eps!r}"
            )
        return float(eps)

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float | None = None,
        *,
        seed: int | None = None,
    ) -> AttackResult:
        """Attack a whole batch ``x`` (values in [0, 1]) with labels ``y`` on the model's device.

        ``x_adv`` of the result lives on the model's device, in the model's dtype.

        Only correctly classified samples are handed to the library. An exception raised by the
        library (or by the model inside it) marks those samples ``error`` and is logged; it is
        not re-raised. ``seed`` makes random starts reproducible without touching the global RNG.
        """
        if x.dim() < 2 or y.shape != x.shape[:1]:
            raise ValueError(
                f"{self.name}: expected x of shape (B, ...) and y of shape (B,), "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        eps = self.check_eps(eps, x)
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(
                f"{self.name}: inputs must lie in [0, 1], got range [{float(x.min()):g}, {float(x.max()):g}]"
            )
        device, dtype = model_placement(model, x)
        x = x.detach().to(device=device, dtype=dtype)
        y = y.detach().to(device=device, dtype=torch.long)
        n = len(x)
        x_adv = x.clone()
        clean_pred = torch.full((n,), -1, dtype=torch.long, device=device)
        success = torch.zeros(n, dtype=torch.bool, device=device)
        error = torch.zeros(n, dtype=torch.bool, device=device)
        messages: list[str] = []

        def fail(rows: torch.Tensor, why: str) -> None:
            error[rows] = True
            messages.append(why)
            logger.warning(
                "%s%s: %d sample(s) marked error: %s",
                self.name,
                "" if eps is None else f"@{eps:g}",
                int(rows.sum()),
                why,
            )

        with attack_mode(model):
            everything = torch.ones(n, dtype=torch.bool, device=device)
            try:
                with strict_float32(device):
                    clean_pred = predict(model, x)
            except Exception as exc:  # noqa: BLE001 - any model failure becomes an error status
                fail(everything, f"clean forward pass raised {_one_line(exc)}")
            else:
                success = clean_pred != y
                todo = ~success
                if bool(todo.any()):
                    try:
                        with _seeded(seed, device):
                            raw = self.spec.runner(model, x[todo], y[todo], eps, self.settings)
                        finite = torch.isfinite(raw.flatten(1)).all(dim=1)
                        candidate = torch.where(
                            finite.view(-1, *([1] * (x.dim() - 1))),
                            project(raw.to(dtype), x[todo], self.norm, eps),
                            x[todo],
                        )
                        x_adv[todo] = candidate
                        with strict_float32(device):
                            success[todo] = (predict(model, candidate) != y[todo]) & finite
                        if not bool(finite.all()):
                            bad = torch.zeros_like(todo)
                            bad[todo.nonzero().squeeze(1)[~finite]] = True
                            fail(bad, "library returned non-finite examples")
                    except Exception as exc:  # noqa: BLE001 - recorded per sample, the caller goes on
                        x_adv[todo] = x[todo]
                        fail(todo, _one_line(exc))

        l2, linf = measure(x_adv, x)
        hit = success.cpu().numpy()
        err = error.cpu().numpy()
        for norms in (l2, linf):
            norms[~hit] = np.inf
            norms[err] = np.nan
        return AttackResult(
            self.name, self.norm, eps, x_adv, clean_pred.cpu().numpy(), hit, l2, linf, err, messages
        )


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
