"""Shared by the bound-propagation methods ``ibp``, ``crown-ibp``, ``sabr``, ``mtl-ibp`` (auto_LiRPA).

:class:`BoundPropagationMethod` is ``ibp`` (see :mod:`methods.ibp` for the loss and the ε schedule);
``crown-ibp`` changes the bounds and their weights. Not a method (no ``register_method``): a
family base, so that no method imports a sibling method.

Both methods also take the short-warm-up recipe of Shi et al. (NeurIPS 2021, "Fast certified robust
training with short warmup") as options, off by default (the default runs are unchanged bit for bit):

* ``init: ibp`` — IBP initialisation (their Sec. 3.1, :func:`ibp_init`);
* ``warmup_reg: λ > 0`` with ``warmup_tau: τ`` — the warm-up regularisers L_tightness and L_relu
  (their Sec. 3.3, :func:`warmup_regularisers`), weighted by λ·(1 − ε_t/ε_train), so they fade out
  over the ε ramp and are off once ε = ε_train. Before the ramp (ε = 0) they are computed from an
  IBP pass at ε = 10⁻⁶, as the authors' code does.

Their third ingredient, BatchNorm after every layer (their second improvement), is an architecture option
(``batch_norm: true`` of ``cnn-small`` and ``cnn-large``; the latter is then their CNN-7). In training,
the bounds normalise every BatchNorm with the mean and variance of the *clean* batch, constants of the
propagation (:class:`~certbench.bounds.lirpa.Bounder` runs auto_LiRPA's forward on the clean batch
first), and at evaluation with the running statistics. The running statistics are updated once per
optimiser step, by the natural forward pass on the clean batch, as in plain training: the bound
pass updates only auto_LiRPA's copies of them, and the PGD search and MTL-IBP's adversarial forward
pass of :class:`AdversarialBoundMethod` normalise with the clean batch's statistics too
(:func:`as_bounded`), updating nothing.

:class:`AdversarialBoundMethod` is the family base of the losses that pair IBP bounds with a point
found by PGD (``sabr``, ``mtl-ibp``): the attack (:func:`pgd_linf`), an L1 penalty on the weights,
and the defaults both papers' code shares (the Shi et al. recipe on, no natural loss once ε = ε_train).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lirpa import Bounder, input_box, robust_cross_entropy, unsupported_reason
from certbench.config import ConfigError
from certbench.method import LossOutput, Method, non_negative, unit_interval

#: Defaults for a null ramp start/length, as fractions of the run's epochs (CROWN-IBP's
#: MNIST runs ramp over epochs 1–61 of 100).
DEFAULT_RAMP = (0.1, 0.5)
#: Smoothed ramp: power ``SMOOTH_POWER`` up to ``SMOOTH_MID`` of the ramp, linear after.
SMOOTH_POWER, SMOOTH_MID = 4.0, 0.25
#: ε of the IBP pass that feeds the warm-up regularisers while ε_t = 0 (the authors' ``min_eps_reg``):
#: their ratios do not depend on the scale of ε, only a positive width is needed.
REG_EPS = 1e-6


def ramp(u: float, kind: str) -> float:
    """Fraction of ε_train at ramp position u ∈ [0, 1] (0 before, 1 after).

    ``smoothed``: a·u^β for u < m, then linear to 1 with the same slope at m, so
    a = 1 / (m^(β−1) (β(1 − m) + m)).
    """
    u = min(max(u, 0.0), 1.0)
    if kind == "linear":
        return u
    beta, m = SMOOTH_POWER, SMOOTH_MID
    a = 1.0 / (m ** (beta - 1) * (beta * (1 - m) + m))
    if u < m:
        return a * u**beta
    at_mid = a * m**beta
    return at_mid + (1 - at_mid) * (u - m) / (1 - m)


def ibp_init(model: nn.Module) -> None:
    """IBP initialisation (Shi et al. 2021, Sec. 3.1), in place.

    With w_ij ~ N(0, σ²), E|w_ij| = σ·√(2/π), so an affine layer with fan-in n maps an interval of
    width Δ to one of expected width n·σ·√(2/π)·Δ, and a ReLU passes about half of it (half the
    neurons off at initialisation). σ = √(2π)/n makes the expected width the same after each
    affine + ReLU block, where the usual fan-in initialisations (σ ∝ 1/√n) let it grow with √n per
    layer (their Fig. 1). Every Linear and Conv2d weight but the last layer's is redrawn (the
    classifier keeps its initialisation, as in the authors' code); n is ``weight[0].numel()``,
    in_features or in_channels/groups·k_h·k_w. Biases are left as initialised, as in the authors'
    code: they do not change interval widths.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)


#: BatchNorm statistics of a batch: per BatchNorm module, the mean and the (biased) variance of its input.
Statistics = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def normalised_by(
    model: nn.Module, statistics: Statistics | None, record: Statistics | None = None
) -> Iterator[None]:
    """Every BatchNorm of ``model`` normalises with ``statistics`` (constants: the input's own
    statistics do not enter) and updates no running statistic, whatever the training flag; with
    ``statistics`` None, each normalises by its input batch and stores that batch's mean and biased
    variance in ``record``. Shi et al. (2021): in training, the network whose worst case is
    bounded normalises with the clean batch's statistics; the PGD search of SABR / MTL-IBP and
    MTL-IBP's adversarial forward pass use the same network (see :class:`AdversarialBoundMethod`)."""
    norms = batch_norms(model)

    def forward(norm: nn.modules.batchnorm._BatchNorm, inputs: torch.Tensor) -> torch.Tensor:
        if statistics is None:
            dims = [0, *range(2, inputs.dim())]
            mean, var = inputs.mean(dims), inputs.var(dims, unbiased=False)
            if record is not None:
                record[norm] = (mean, var)
        else:
            mean, var = statistics[norm]
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        out = (inputs - mean.view(shape)) * scale.view(shape)
        return out if norm.bias is None else out + norm.bias.view(shape)

    for norm in norms:
        norm.forward = lambda inputs, norm=norm: forward(norm, inputs)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def batch_statistics(model: nn.Module, x: torch.Tensor) -> Statistics:
    """The mean and biased variance of every BatchNorm's input on the batch ``x``, from one forward pass
    normalised by them (as training-mode BatchNorm) that updates no running statistic (Shi et al. 2021,
    the clean batch's statistics). Differentiable in the parameters, as BatchNorm training."""
    record: Statistics = {}
    with normalised_by(model, None, record):
        model(x)
    return record


@contextmanager
def as_bounded(model: nn.Module, x: torch.Tensor, differentiable: bool) -> Iterator[None]:
    """Inside, ``model`` is the network the training bounds are computed for: a BatchNorm model in
    training mode normalises with the clean batch ``x``'s statistics as constants and updates no
    running statistic (Shi et al. 2021); any other model is left as it is. ``differentiable``: the
    statistics keep their graph to the parameters (a loss term), or not (an attack's search)."""
    if not (model.training and batch_norms(model)):
        yield
        return
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        statistics = batch_statistics(model, x)
    with normalised_by(model, statistics):
        yield


def _balance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min(a/b, b/a) for a, b ≥ 0: 1 when equal, 0 when one is 0, NaN when both are."""
    return torch.minimum(a, b) / torch.maximum(a, b)


def warmup_regularisers(
    reference: tuple[torch.Tensor, torch.Tensor],
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    tau: float,
) -> dict[str, torch.Tensor]:
    """Shi et al. (2021), Sec. 3.3: the warm-up regularisers from IBP pre-activation bounds.

    ``reference`` is the interval entering the first affine layer (width Δ_0), ``layers`` the
    interval [l_i, u_i] of each of the m ReLUs' inputs, c_i = (u_i + l_i)/2, Δ_i = (u_i − l_i)/2,
    means over the batch and the layer's neurons.

    * L_tightness = (1/m) Σ_i ReLU(τ − E(Δ_0)/E(Δ_i)) / τ: penalises a layer whose bounds are
      more than 1/τ times as wide as the input's (the growth IBP initialisation starts without).
    * L_relu = (1/m) Σ_i [ReLU(τ − r_mean,i) + ReLU(τ − r_var,i)] / τ, where r_mean,i balances
      the mean of c over active neurons (l > 0) against that over inactive ones (u < 0),
      min(ρ, 1/ρ) with ρ = E(c·1[l>0]) / −E(c·1[u<0]), and r_var,i the same for the sums of
      (c − E c)² over each set: it keeps the active and inactive states balanced (IBP training
      otherwise kills ReLUs). A layer with neither active nor inactive neurons (0/0) adds nothing.

    The normalisation of both by τ and of L_relu by m follows the authors' code.
    """
    if not layers:
        raise ValueError("warm-up regularisers: the model has no ReLU layer")
    width0 = ((reference[1] - reference[0]) / 2).mean()
    tightness, relu = [], []
    for lower, upper in layers:
        center, width = (upper + lower) / 2, (upper - lower) / 2
        tightness.append(F.relu(tau - width0 / width.mean().clamp(min=1e-12)) / tau)
        active, inactive = (lower > 0).to(center.dtype), (upper < 0).to(center.dtype)
        spread = (center - center.mean()) ** 2
        ratios = (
            _balance((center * active).mean(), -(center * inactive).mean()),
            _balance((spread * active).sum(), (spread * inactive).sum()),
        )
        term = sum(F.relu(tau - r) / tau for r in ratios)
        if bool(torch.isfinite(term)):
            relu.append(term)
    zero = width0.new_zeros(())
    return {
        "tightness": torch.stack(tightness).mean(),
        "relu": (torch.stack(relu).sum() if relu else zero) / len(layers),
    }


class BoundPropagationMethod(Method):
    """Natural and robust cross-entropy mixed by κ, the robust one from auto_LiRPA's margin bounds
    (IBP here; :meth:`lower_bounds` and :meth:`weights` are what CROWN-IBP changes)."""

    default_certificate = "ibp"
    params_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "eps_train": {
            "type": ["number", "null"],
            "minimum": 0,
            "maximum": 1,
            "default": None,
            "description": "training ε (pixel units); null: the data set's largest ε_linf",
        },
        "schedule": {"enum": ["linear", "smoothed"], "default": "smoothed"},
        "schedule_start": {
            "type": ["number", "null"],
            "minimum": 0,
            "default": None,
            "description": "epoch at which ε starts to grow; null: 10% of the epochs",
        },
        "schedule_length": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "epochs for ε to reach eps_train; null: 50% of the epochs",
        },
        "kappa_final": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "weight of the natural loss once ε = eps_train",
        },
        "init": {
            "enum": ["default", "ibp"],
            "default": "default",
            "description": "ibp: Shi et al. (2021) IBP initialisation, σ = √(2π)/fan-in",
        },
        "warmup_reg": {
            "type": "number",
            "minimum": 0,
            "default": 0.0,
            "description": "λ of Shi et al.'s (2021) warm-up regularisers (tightness, ReLU balance); 0: off",
        },
        "warmup_tau": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "τ, the target ratio of Shi et al.'s warm-up regularisers",
        },
    }

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self.bounder = Bounder()

    # ---- configuration ----------------------------------------------------------------
    @property
    def eps_train(self) -> float:
        eps = self.params.get("eps_train")
        if eps is None:
            if not self.context.eps_linf:
                raise ConfigError("params.eps_train: required, the data set defines no ℓ∞ ε")
            eps = max(self.context.eps_linf)
        return float(eps)

    def ramp_epochs(self) -> tuple[float, float]:
        """(start, length) of the ε ramp in epochs."""
        start, length = self.params.get("schedule_start"), self.params.get("schedule_length")
        epochs = self.context.epochs
        return (
            DEFAULT_RAMP[0] * epochs if start is None else float(start),
            DEFAULT_RAMP[1] * epochs if length is None else float(length),
        )

    def check(self) -> None:
        unit_interval("eps_train", self.eps_train)
        unit_interval("kappa_final", float(self.params["kappa_final"]))
        non_negative("warmup_reg", float(self.params["warmup_reg"]))
        tau = float(self.params["warmup_tau"])
        if not 0 < tau <= 1:
            raise ConfigError(f"params.warmup_tau: must lie in (0, 1], got {tau}")
        start, length = self.ramp_epochs()
        if start + length > self.context.epochs:
            raise ConfigError(
                f"params.schedule_length: the ε ramp ends at epoch {start + length:g}, after "
                f"the last epoch ({self.context.epochs})"
            )

    def build_model(self, arch: str, arch_params: Mapping[str, Any]) -> nn.Module:
        model = super().build_model(arch, arch_params)
        if self.params["init"] == "ibp":
            ibp_init(model)
        return model

    def prepare(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ConfigError(
                f"method '{self.name}': auto_LiRPA cannot bound this architecture (ReLU networks "
                f"of Linear/Conv2d/Flatten/BatchNorm/AvgPool/residual sums only): {reason}"
            )

    # ---- schedule and loss ------------------------------------------------------------
    def epsilon(self, progress: float) -> float:
        """ε at ``progress`` (0 → 1 over training) = eps_train · ramp((epoch − start)/length)."""
        start, length = self.ramp_epochs()
        epoch = progress * self.context.epochs
        return self.eps_train * ramp((epoch - start) / length, self.params["schedule"])

    def mix(self, eps: float, final: float) -> float:
        """1 − (ε/ε_train)(1 − final): κ and CROWN-IBP's β both follow ε this way."""
        return 1.0 if self.eps_train == 0 else 1.0 - eps / self.eps_train * (1.0 - final)

    def weights(self, eps: float) -> dict[str, float]:
        """The mixing weights at ε (logged with the losses)."""
        return {"kappa": self.mix(eps, float(self.params["kappa_final"]))}

    def reg_weight(self, eps: float) -> float:
        """λ·(1 − ε/ε_train) during the warm-up, 0 once ε = ε_train (and without a robust phase)."""
        lam = float(self.params["warmup_reg"])
        return 0.0 if lam == 0 or self.eps_train == 0 else lam * max(0.0, 1.0 - eps / self.eps_train)

    def lower_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """Margin lower bounds (B, K−1) the robust loss is computed from."""
        return self.bounder.margin_lower_bounds(model, x, y, eps, ["IBP"])["IBP"]

    def robust_loss(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, float]:
        """(robust cross-entropy, fraction of the batch its bounds do not certify)."""
        lower = self.lower_bounds(model, x, y, eps)
        return robust_cross_entropy(lower), float((lower <= 0).any(1).float().mean())

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        eps = self.epsilon(progress)
        weights = self.weights(eps)
        # bounds before the forward pass: building a BoundedModule rewrites the parameters in place
        bounded = self.robust_loss(model, x, y, eps) if eps > 0 else None
        reg_weight = self.reg_weight(eps)
        regularisers = None
        if reg_weight > 0:
            if bounded is None:  # ε = 0: an IBP pass for the regularisers alone
                self.bounder.margin_lower_bounds(model, x, y, REG_EPS, ["IBP"])
            reference, layers = self.bounder.preactivation_bounds()
            regularisers = warmup_regularisers(reference, layers, float(self.params["warmup_tau"]))
        logits = model(x)
        natural = F.cross_entropy(logits, y)
        # at ε = 0 every bound is exact, so the robust CE equals the natural CE
        robust, robust_error = bounded or (natural, float((logits.argmax(1) != y).float().mean()))
        kappa = weights["kappa"]
        stats = {
            "eps": eps,
            **weights,
            "natural_loss": natural.item(),
            "robust_loss": robust.item(),
            "robust_error": robust_error,
        }
        total = kappa * natural + (1 - kappa) * robust
        if regularisers is not None:
            total = total + reg_weight * (regularisers["tightness"] + regularisers["relu"])
            stats |= {"reg_weight": reg_weight, **{f"reg_{k}": v.item() for k, v in regularisers.items()}}
        return LossOutput(total, stats, logits=logits.detach())


def pgd_linf(
    model: nn.Module,
    lower: torch.Tensor,
    upper: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    step_size: float,
    decay_at: tuple[float, ...] = (),
) -> torch.Tensor:
    """A point of the box [lower, upper] (elementwise) of high cross-entropy, by PGD (Madry et al. 2018).

    A uniform random start in the box, then ``steps`` signed-gradient ascent steps on CE(f(x'), y),
    each of ``step_size`` times the box's half-width per coordinate, projected back onto the box;
    the step is multiplied by 0.1 after each fraction ``decay_at`` of the steps (SABR's schedule).
    Every iterate, the last included, is scored, and the one of highest CE per sample is returned,
    detached. The attack runs in eval mode (BatchNorm and dropout, if any, as at test time, unless the
    caller fixes BatchNorm's statistics with :func:`normalised_by`) and differentiates with respect to
    the input only: no parameter gradient is touched.
    """
    was_training = model.training
    model.eval()
    half = (upper - lower) / 2
    milestones = [math.ceil(fraction * steps) for fraction in decay_at]
    point = (lower + torch.rand_like(lower) * (upper - lower)).detach()
    best, best_loss = point.clone(), torch.full((len(y),), -math.inf, dtype=lower.dtype, device=y.device)
    try:
        for step in range(steps + 1):
            last = step == steps
            with torch.set_grad_enabled(not last):
                point.requires_grad_(not last)
                loss = F.cross_entropy(model(point), y, reduction="none")
            better = loss.detach() >= best_loss
            best = torch.where(better.view(-1, *[1] * (point.dim() - 1)), point.detach(), best)
            best_loss = torch.where(better, loss.detach(), best_loss)
            if not last:
                (gradient,) = torch.autograd.grad(loss.sum(), point)
                size = step_size * 0.1 ** sum(step >= m for m in milestones)
                stepped = point.detach() + size * half * gradient.sign()
                point = torch.minimum(torch.maximum(stepped, lower), upper)
    finally:
        model.train(was_training)
    return best.detach()


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Σ |w| over the weights of every Linear and Conv2d layer (biases left out, as in the MTL-IBP code)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return torch.stack([layer.weight.abs().sum() for layer in layers]).sum()


def attack_params(steps: int, step_size: float) -> dict[str, dict[str, Any]]:
    """The ``params_schema`` entries of the PGD attack, with a method's defaults."""
    return {
        "attack_steps": {
            "type": "integer",
            "minimum": 1,
            "default": steps,
            "description": "PGD steps of the attack during training",
        },
        "attack_step_size": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": step_size,
            "description": "PGD step as a fraction of the attacked box's half-width per pixel",
        },
    }


class AdversarialBoundMethod(BoundPropagationMethod):
    """IBP bounds paired with a PGD point (SABR, MTL-IBP): the shared parameters and the attack.

    Defaults follow both papers' public code: the Shi et al. (2021) recipe on (``init: ibp``,
    ``warmup_reg: 0.5``; SABR's and MTL-IBP's published runs all use it), no natural loss once
    ε = ε_train (``kappa_final: 0``), and an L1 penalty ``l1``·Σ|w| on the weights, added to every
    step's loss (0 here by default: its published value depends on the setting). On a BatchNorm model
    in training, the attack (and MTL-IBP's adversarial forward pass) uses the network the bounds are
    computed for, the clean batch's statistics as constants (Shi et al. 2021, second improvement), so the
    adversarial loss is that of a point of the ε-box under the same function whose worst case IBP
    bounds, and the running statistics move only with the natural forward pass. Subclasses set
    :attr:`attack_decay` and implement :meth:`robust_loss`; :attr:`robust_stats` is what they
    measured in it, logged with the losses.
    """

    params_schema: ClassVar[dict[str, dict[str, Any]]] = {
        **BoundPropagationMethod.params_schema,
        "kappa_final": {**BoundPropagationMethod.params_schema["kappa_final"], "default": 0.0},
        "init": {**BoundPropagationMethod.params_schema["init"], "default": "ibp"},
        "warmup_reg": {**BoundPropagationMethod.params_schema["warmup_reg"], "default": 0.5},
        "l1": {
            "type": "number",
            "minimum": 0,
            "default": 0.0,
            "description": "weight of the L1 penalty Σ|w| on the Linear/Conv2d weights",
        },
    }
    #: Fractions of the attack's steps after which its step is multiplied by 0.1.
    attack_decay: ClassVar[tuple[float, ...]] = ()

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self.robust_stats: dict[str, float] = {}

    def check(self) -> None:
        super().check()
        non_negative("l1", float(self.params["l1"]))
        if not float(self.params["attack_step_size"]) > 0:
            raise ConfigError(f"params.attack_step_size: must be > 0, got {self.params['attack_step_size']}")

    def attack_radius(self, eps: float) -> float:
        """The radius of the box the attack searches at training radius ε."""
        return eps

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """The PGD point of highest CE in the box [x − r, x + r] ∩ [0, 1], r = :meth:`attack_radius`
        (:func:`pgd_linf`). A BatchNorm model in training mode is attacked as the network the bounds
        are computed for, normalised by the clean batch's statistics (Shi et al. 2021, second improvement;
        :func:`as_bounded`, constants here), so the search updates no running statistic."""
        lower, upper = input_box(x, self.attack_radius(eps))
        steps, size = int(self.params["attack_steps"]), float(self.params["attack_step_size"])
        with as_bounded(model, x, differentiable=False):
            return pgd_linf(model, lower, upper, y, steps, size, self.attack_decay)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        self.robust_stats = {}
        out = super().loss(model, x, y, progress)
        out.stats |= self.robust_stats
        lam = float(self.params["l1"])
        if lam > 0:
            penalty = l1_penalty(model)
            out.loss = out.loss + lam * penalty
            out.stats["l1_norm"] = penalty.item()
        return out
