"""``lipsdp-admm``: training with LipSDP Lipschitz bounds by ADMM (Pauli et al., L-CSS 2021).

The training problem ``min_W CE(W) + μ·L(W)²`` (regularised) or ``min_W CE(W) s.t. L(W) ≤ L̄``
(enforced), L the LipSDP-Neuron bound, is split with a copy W̄ of the weights and solved by ADMM
(Pauli et al. 2021, Sec. IV):

1. W-step: ``admm_every`` epochs of the framework's training on
   ``CE + Σ_k (ρ_a/2)‖W_k − W̄_k‖²_F + tr(Y_kᵀ(W_k − W̄_k))``;
2. W̄-step: the SDP :func:`certbench.bounds.lipsdp.weight_step` with T from a LipSDP solve on the current W
   (compiled once; with ``warm_start``, started from the previous iteration's solution); in the
   enforced variant T is scaled by (L̄/L(W))² when L(W) > L̄ (``scale_multipliers``,
   :meth:`LipSDPADMM._step_multipliers`), so that W with its last layer scaled to L̄ is in the set
   W̄ is projected onto;
3. dual update ``Y_k += ρ_a (W_k − W̄_k)``; with ``rho_balance``, ρ_a then adapted by residual
   balancing (Boyd et al. 2011, Sec. 3.4.1; :func:`_balanced_rho`);

from the initial weights on (so W̄ exists from the first epoch) until training ends, or, with
``tolerance`` set, until the LipSDP bound of W changes by less than it (the paper's rule; then W̄, Y
stay fixed and training goes on with the last coupling terms). The rule is off by default: on the
rings it fired after two iterations, while W had barely left its initialisation (bound 3.9 → 4.3,
plain training ends at 239), and pinned W to that W̄ for the remaining epochs (55 % accuracy).

Every W̄ is checked in float64 before it is used (:meth:`LipSDPADMM._verified_wbar`): its LipSDP
bound for the W̄-step's T is verified by :func:`certbench.bounds.lipsdp.fixed_multiplier_bound`
(no SDP), and recorded per epoch as ``wbar_bound``, with ``lipsdp_bound`` (of W) and
``primal_residual`` ‖W − W̄‖_F.

W, W̄, Y are the weights the optimiser trains, with the Normalize layer's 1/σ folded into W₀
(:meth:`certbench.bounds.lipsdp.MLPStructure.weights`), while every bound (L, L̄, and μ's L²) is in pixel
units, for inputs in [0, 1] of the data set's shape. The two differ when the MLP average-pools its
input (``input_pool``, Pauli et al. 2021): the network's first map is then W₀P, P the pooling
matrix (196×784 for 2×2 pooling of 28×28 images), and W₀, W̄₀, Y₀ have the pooled width (50×196).
P is carried inside the W̄-step's LMI (``weight_step(..., input_map=P)``), so the ADMM constraint
is W₀ = W̄₀ in the trained coordinates and W̄ ranges over the convex set where the LMI of
``[W̄₀P, W̄₁, …]`` holds. This is exact, not a bound: PPᵀ = cI (c = 1/4 for disjoint 2×2 windows),
so that LMI equals the one of √c·W̄₀ (:func:`certbench.bounds.lipsdp.weight_step`). Running the ADMM on the
50×784 matrix W₀P instead would need W̄₀ mapped back through P⁺ and would silently scale the
penalty ρ_a on the trained W₀ by c.

Enforced variant: W̄ has a verified bound ≤ L̄ after every W̄-step (the solver's W̄ satisfies the LMI
for ρ = L̄² only approximately; its last layer is scaled down where the float64 check needs it);
after the last optimiser step of training the model's weights are replaced by W̄ from a final
W̄-step, and the last layer (weights and bias) is scaled down if a verified bound of the stored
(float32) weights (for W̄'s T, or from a fresh LipSDP solve, the larger) exceeds L̄·(1 − 1e-4) (the
bound is homogeneous in W_l). When no bound can be
verified there, the product of spectral norms is used instead, so the delivered model always has
L ≤ L̄.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipsdp import (
    SOLVERS,
    LipSDPProblem,
    fixed_multiplier_bound,
    is_mlp,
    lipsdp,
    mlp_structure,
    product_bound,
    weight_step,
)
from certbench.config import ConfigError
from certbench.method import LossOutput, Method, register_method

log = logging.getLogger(__name__)
#: Relative margin below L̄ for the final scaling (covers the float32 round trip of the weights).
FINAL_MARGIN = 1e-4


@register_method("lipsdp-admm")
class LipSDPADMM(Method):
    """ADMM with a LipSDP W̄-step; ``variant`` "regularised" (μ·L²) or "enforced" (L ≤ L̄)."""

    default_certificate = "lipsdp-l2"
    params_schema = {
        "variant": {"enum": ["regularised", "enforced"], "default": "regularised"},
        "mu": {
            "type": "number",
            "minimum": 0,
            "default": 8e-4,
            "description": "weight μ of L² (regularised variant)",
        },
        "max_bound": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "L̄ in pixel units (enforced variant)",
        },
        "rho_admm": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 2.0,
            "description": "ADMM penalty ρ_a",
        },
        "rho_balance": {
            "type": "boolean",
            "default": False,
            "description": "adapt ρ_a by residual balancing (Boyd et al. 2011, Sec. 3.4.1): ×2 when "
            "‖W − W̄‖ > 10·ρ_a‖W̄ − W̄_prev‖, ÷2 in the opposite case, within [rho_min, rho_max]",
        },
        "rho_min": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.01,
            "description": "with rho_balance",
        },
        "rho_max": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 100.0,
            "description": "with rho_balance",
        },
        "scale_multipliers": {
            "type": "boolean",
            "default": True,
            "description": "enforced variant: scale the W̄-step's T by (L̄/L(W))² when L(W) > L̄, so that "
            "W with its last layer scaled to the bound lies in the set W̄ is projected onto",
        },
        "admm_every": {"type": "integer", "minimum": 1, "default": 1, "description": "epochs per W-step"},
        "tolerance": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "stop the ADMM updates once the bound changes by less (null: never)",
        },
        "warm_start": {
            "type": "boolean",
            "default": False,
            "description": "start each LipSDP solve from the previous iteration's solution (fewer SCS "
            "iterations; a resumed run then differs from an uninterrupted one within the solver tolerance)",
        },
        "solver": {"enum": list(SOLVERS), "default": "SCS"},
        "sdp_time_limit": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 600,
            "description": "seconds per SDP solve",
        },
    }

    def __init__(self, params: Mapping[str, Any], context: Any) -> None:
        super().__init__(params, context)
        self._wbar: list[np.ndarray] | None = None
        self._dual: list[np.ndarray] | None = None
        self._multipliers: list[np.ndarray] | None = None
        self._wbar_multipliers: list[np.ndarray] | None = None
        self._bounds: list[float] = []
        self._epoch = -1  # the last epoch whose start was seen: the first batch starts the ADMM
        self._converged = False
        self._stats: dict[str, float] = {}
        self._device_copies: tuple[torch.device, list[torch.Tensor], list[torch.Tensor]] | None = None
        #: compiled LipSDP problems, reused across ADMM iterations (not checkpointed)
        self._sdp_cache: dict[tuple[int, ...], LipSDPProblem] = {}

    @property
    def enforced(self) -> bool:
        return self.params["variant"] == "enforced"

    def check(self) -> None:
        if self.enforced and self.params["max_bound"] is None:
            raise ConfigError("params.max_bound: the enforced variant needs a bound L̄ > 0")
        if not self.enforced and self.params["max_bound"] is not None:
            raise ConfigError("params.max_bound: only the enforced variant uses it (set variant: enforced)")

    def build_model(self, arch: str, arch_params: Mapping[str, Any]) -> nn.Module:
        model = super().build_model(arch, arch_params)
        if not is_mlp(model):
            raise ConfigError(
                f"arch: lipsdp-admm needs an MLP (Linear layers with ReLU or Tanh), got '{arch}'"
            )
        return model

    def prepare(self, model: nn.Module) -> None:
        mlp_structure(model)

    # --- training hooks --------------------------------------------------------------------------

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> LossOutput:
        epoch = math.floor(progress * self.context.epochs + 1e-9)
        if epoch > self._epoch:
            self._epoch = epoch
            if epoch % self.params["admm_every"] == 0 and not self._converged:
                self._admm_update(model)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        stats = dict(self._stats)
        if self._wbar is not None:
            coupling = self._coupling(model)
            loss = loss + coupling
            stats["coupling"] = float(coupling.detach())
        return LossOutput(loss, stats=stats, logits=logits)

    def finish(self, model: nn.Module) -> None:
        """After the last epoch (enforced variant): deliver W̄ with L ≤ L̄."""
        if self.enforced:
            self._admm_update(model)
            self._deliver(model)

    # --- ADMM ------------------------------------------------------------------------------------

    def _coupling(self, model: nn.Module) -> torch.Tensor:
        """Σ_k (ρ_a/2)‖W_k − W̄_k‖²_F + tr(Y_kᵀ(W_k − W̄_k)) (Pauli et al. 2021, augmented Lagrangian)."""
        weights = mlp_structure(model).weights()
        device = weights[0].device
        if self._device_copies is None or self._device_copies[0] != device:
            self._device_copies = (device, _tensors(self._wbar, weights[0]), _tensors(self._dual, weights[0]))
        _, wbar, dual = self._device_copies
        rho_a = self._rho()
        return sum(
            rho_a / 2 * (w - b).pow(2).sum() + (d * (w - b)).sum() for w, b, d in zip(weights, wbar, dual)
        )

    def _rho(self) -> float:
        """ρ_a of the current ADMM iteration: ``rho_admm``, or where residual balancing has moved it."""
        return self._stats.get("rho_admm", self.params["rho_admm"])

    def _step_multipliers(self) -> list[np.ndarray]:
        """T of the W̄-step: that of the last verified LipSDP solve of W (bound L(W)), and in the
        enforced variant, when L(W) > L̄ and ``scale_multipliers``, that T times (L̄/L(W))².

        The LMI is homogeneous: if (L², T) certifies ``[W₀ … W_l]``, then (s²L², s²T) certifies
        ``[W₀ … s·W_l]``. With T scaled so, the convex set {W̄ : S(L̄², T, W̄) ⪰ 0} the W̄-step
        projects onto contains W with its last layer scaled by L̄/L(W), which decides as W does (with
        the last bias scaled alike). With T unscaled it need not: for fixed T, the smallest ρ scales
        with the square of the first layer's scale, while shrinking the last layer lowers it only down
        to its value at W_l = 0, and on the rings the projection shrank the first layer (spectral
        norm 2.3 → 0.8 at L(W) = 48, L̄ = 16) until the tanh units
        were almost linear and W̄ predicted one class (33 % test accuracy while W had 94 %).
        """
        multipliers = self._multipliers
        assert multipliers is not None
        if self.enforced and self.params["scale_multipliers"] and self._bounds:
            factor = min(1.0, (self.params["max_bound"] / self._bounds[-1]) ** 2)
            multipliers = [factor * t for t in multipliers]
        return multipliers

    def _admm_update(self, model: nn.Module) -> None:
        """One ADMM iteration around the model's current weights W: LipSDP of W for T, the W̄-step,
        the float64 check of W̄ and the dual update."""
        structure, shape = mlp_structure(model), self.context.spec.shape
        weights = structure.numpy_weights()
        limit, solver = self.params["sdp_time_limit"], self.params["solver"]
        bound = lipsdp(
            structure.pixel_weights(shape),
            solver=solver,
            time_limit=limit,
            cache=self._sdp_cache,
            warm_start=self.params["warm_start"],
        )
        seconds = bound.solve_time
        if bound.verified:
            self._multipliers = bound.multipliers
            self._bounds.append(bound.bound)
        if self._multipliers is None:
            log.warning("ADMM update skipped: no LipSDP multipliers yet (%s)", bound.message)
            return
        multipliers = self._step_multipliers()
        rho_a = self._rho()
        dual = self._dual if self._dual is not None else [np.zeros_like(w) for w in weights]
        targets = [w + d / rho_a for w, d in zip(weights, dual)]
        variant = {"max_bound": self.params["max_bound"]} if self.enforced else {"mu": self.params["mu"]}
        pool = structure.pool_matrix(shape)
        step = weight_step(
            targets,
            multipliers,
            rho_admm=rho_a,
            input_map=pool,
            solver=solver,
            time_limit=limit,
            **variant,
        )
        seconds += step.solve_time
        self._stats["sdp_seconds"] = self._stats.get("sdp_seconds", 0.0) + seconds
        if step.weights is None:
            log.warning("ADMM update skipped: W̄-step %s (%s)", step.status, step.message)
            return
        checked = self._verified_wbar(step.weights, pool, multipliers)
        if checked is None:
            log.warning("ADMM update skipped: no bound of the W̄-step's answer could be verified")
            return
        previous = self._wbar
        self._wbar, wbar_bound, self._wbar_multipliers = checked
        self._dual = [d + rho_a * (w - b) for d, w, b in zip(dual, weights, self._wbar)]
        self._device_copies = None
        residual = _distance(weights, self._wbar)
        if self.params["rho_balance"] and previous is not None:
            self._stats["rho_admm"] = _balanced_rho(
                rho_a,
                residual,
                rho_a * _distance(self._wbar, previous),
                self.params["rho_min"],
                self.params["rho_max"],
            )
        self._stats.update(
            admm_iterations=self._stats.get("admm_iterations", 0.0) + 1,
            wbar_bound=wbar_bound,
            primal_residual=residual,
        )
        if self._bounds:
            self._stats["lipsdp_bound"] = self._bounds[-1]
        tolerance = self.params["tolerance"]
        self._converged = (
            tolerance is not None
            and len(self._bounds) >= 2
            and abs(self._bounds[-1] - self._bounds[-2]) < tolerance
        )
        log.info(
            "ADMM %d: LipSDP bound of W %s, verified bound of W̄ %.4f, ‖W − W̄‖ %.3g, %.1f s in SDPs%s",
            int(self._stats["admm_iterations"]),
            f"{self._bounds[-1]:.4f}" if self._bounds else "n/a",
            wbar_bound,
            residual,
            seconds,
            " (converged)" if self._converged else "",
        )

    def _verified_wbar(
        self, wbar: list[np.ndarray], pool: np.ndarray | None, step_multipliers: list[np.ndarray]
    ) -> tuple[list[np.ndarray], float, list[np.ndarray]] | None:
        """(W̄, its float64-verified bound, the T that certifies it), or None if none is found.

        The SDP solver's W̄ satisfies the LMI only approximately (measured on the rings: bounds up to
        0.3 % above L̄). The bound is verified for the W̄-step's T (:func:`fixed_multiplier_bound`),
        or, if that T certifies nothing, by a LipSDP solve on W̄. Enforced variant: W̄_l is then
        scaled by s so that the bound is ≤ L̄(1 − margin), with T scaled by s² (homogeneity), and
        verified again.
        """
        pixel = [wbar[0] if pool is None else wbar[0] @ pool, *wbar[1:]]
        checked = fixed_multiplier_bound(pixel, step_multipliers)
        if checked is None:
            solved = lipsdp(pixel, solver=self.params["solver"], time_limit=self.params["sdp_time_limit"])
            if not solved.verified:
                return None
            checked = solved.bound, solved.multipliers
        bound, multipliers = checked
        target = self.params["max_bound"] * (1 - FINAL_MARGIN) if self.enforced else math.inf
        if bound > target:
            s = target / bound
            wbar = [*wbar[:-1], wbar[-1] * s]
            checked = fixed_multiplier_bound([*pixel[:-1], pixel[-1] * s], [s * s * t for t in multipliers])
            if checked is None or checked[0] > self.params["max_bound"]:
                return None
            bound, multipliers = checked
        return wbar, bound, multipliers

    def _deliver(self, model: nn.Module) -> None:
        """Load W̄ into the model and scale its last layer (weights and bias, so the decisions of W̄
        stay) until every verified bound of the stored weights is ≤ L̄(1 − margin).

        Two bounds are computed: the one for W̄'s own T (no SDP) and a fresh LipSDP solve, as the
        ``lipsdp-l2`` certificate computes it. Both are sound upper bounds; the fresh one can be the
        larger (measured on the rings: T of W̄ 15.998, SCS 15.967 before and 16.078 after its
        float64 repair), and the last layer is scaled by the larger, so the certificate of the
        delivered model also reports ≤ L̄. Scaling W_l leaves the solve unchanged up to the scale
        (each layer is normalised before it), so its bound scales exactly.
        """
        if self._wbar is None:
            log.warning("enforced variant: no W̄ was ever computed; the model keeps its trained weights")
            return
        structure = mlp_structure(model)
        structure.load_weights(self._wbar)
        pixel = structure.pixel_weights(self.context.spec.shape)
        checked = fixed_multiplier_bound(pixel, self._wbar_multipliers or self._multipliers)
        result = lipsdp(pixel, solver=self.params["solver"], time_limit=self.params["sdp_time_limit"])
        bounds = [(checked[0], "LipSDP, T of W̄")] if checked is not None else []
        bounds += [(result.bound, "LipSDP")] if result.verified else []
        bound, source = max(bounds) if bounds else (product_bound(pixel), "∏‖W‖₂")
        target = self.params["max_bound"] * (1 - FINAL_MARGIN)
        if bound > target:
            last = structure.linears[-1]
            with torch.no_grad():
                last.weight.mul_(target / bound)
                if last.bias is not None:
                    last.bias.mul_(target / bound)
        log.info(
            "enforced variant: delivered W̄ with bound %.4f (%s) scaled to ≤ %.4f",
            bound,
            source,
            min(bound, target),
        )

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "wbar": _tensors(self._wbar),
            "dual": _tensors(self._dual),
            "multipliers": _tensors(self._multipliers),
            "wbar_multipliers": _tensors(self._wbar_multipliers),
            "bounds": list(self._bounds),
            "epoch": self._epoch,
            "converged": self._converged,
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._wbar, self._dual = _arrays(state["wbar"]), _arrays(state["dual"])
        self._multipliers = _arrays(state["multipliers"])
        self._wbar_multipliers = _arrays(state["wbar_multipliers"])
        self._bounds = list(state["bounds"])
        self._epoch, self._converged = state["epoch"], state["converged"]
        self._stats = dict(state["stats"])
        self._device_copies = None


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Frobenius distance between two lists of matrices."""
    return math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)))


def _balanced_rho(rho: float, primal: float, dual: float, low: float, high: float) -> float:
    """Residual balancing (Boyd et al. 2011, Sec. 3.4.1, μ = 10, τ = 2), ρ kept within [low, high].

    ``primal`` = ‖W − W̄‖, ``dual`` = ρ‖W̄ − W̄_prev‖. Y is the unscaled dual variable, so it stays as
    it is when ρ changes.
    """
    if primal > 10 * dual:
        rho *= 2
    elif dual > 10 * primal:
        rho /= 2
    return min(max(rho, low), high)


def _tensors(arrays: list[np.ndarray] | None, like: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """numpy → torch (float64 on the CPU, or dtype and device of ``like``); None stays None."""
    if arrays is None:
        return None
    if like is None:
        return [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in arrays]
    return [torch.as_tensor(a, dtype=like.dtype, device=like.device) for a in arrays]


def _arrays(tensors: list[torch.Tensor] | None) -> list[np.ndarray] | None:
    """Inverse of :func:`_tensors` (float64 numpy)."""
    return None if tensors is None else [t.detach().cpu().double().numpy() for t in tensors]
