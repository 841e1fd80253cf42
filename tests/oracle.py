"""Exact adversarial distances of tiny piecewise-linear networks, with verified counterexamples.

A test oracle for the certificates (issue 13, part 4). A network is read from an ``nn.Sequential``
of ``Normalize``, ``Flatten``, ``Linear``, ``ReLU``, ``LinfDist`` (p = ∞), ``MeanShift`` (eval mode),
``Negate``, ``Identity`` into ops that hold the stored float32 parameters both as exact rationals
and rounded to float64. "The network" below is the real-valued function these parameters define.

* ℓ∞: the least ‖δ‖∞ with ``x + δ ∈ [0, 1]ⁿ`` and ``z_j(x + δ) ≥ z_y(x + δ)`` is a mixed-integer
  linear program: ReLU, |·| and max are encoded with one binary per unstable unit and big-M
  constants from float64 interval bounds (widened by a relative 1e-9). Variables are deviations
  from their values at x, and the search box is shrunk to ``‖δ‖∞ ≤ R`` around x (R from a
  linearisation, enlarged until the problem is feasible; a minimum inside that box is the global
  one), so that points a hair from the decision boundary are solved to a relative accuracy far
  below the certificates' rounding allowances. HiGHS (``scipy.optimize.milp``) runs with gap 0 and
  feasibility tolerances 1e-10.
* ℓ2: on each activation pattern the network is affine and the region a polyhedron, so the least
  ‖δ‖₂ into ``{z_j ≥ z_y}`` ∩ region ∩ box is a least-distance programme, solved exactly by
  Lawson–Hanson's reduction to NNLS. For ReLU nets every pattern of the units not fixed by interval
  bounds is enumerated (exact distance); for ℓ∞-dist nets the patterns met at x, at the ℓ∞
  counterexamples and along the way are tried (an upper bound).
* No solver output is trusted: a candidate point counts only as a *verified counterexample* —
  either the exact rational logits at it rank a class strictly above y, or the model's own float32
  forward pass predicts a class other than y there (the two arithmetics a certificate covers).
  Candidates are pushed outwards by relative steps 1e-12 … 1e-2 until one verifies; the float32
  pass is also scanned along the segment from x. The distance of the nearest verified
  counterexample is a proven upper bound of the exact distance: a certified radius or ε above it
  is a proven overclaim.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp, nnls
from torch import nn

from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate

#: Relative pushes tried on a candidate until the exact logits or the float32 pass confirm it.
PUSHES = (0.0, 1e-12, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
#: HiGHS options: the smallest feasibility tolerances HiGHS accepts, no optimality gap.
MILP_OPTIONS = {
    "mip_rel_gap": 0.0,
    "time_limit": 30.0,
    "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10,
    "mip_feasibility_tolerance": 1e-10,
}


# --- the network as ops ---------------------------------------------------------------------


@dataclass
class _Rows:
    """Rows ``w_j`` and biases ``b_j`` held exactly (fractions) and in float64."""

    weight: list[list[Fraction]]
    bias: list[Fraction]
    w64: np.ndarray = field(init=False)
    b64: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.w64 = np.array([[float(w) for w in row] for row in self.weight], dtype=np.float64)
        self.b64 = np.array([float(b) for b in self.bias], dtype=np.float64)


@dataclass
class Affine(_Rows):
    """``v ↦ W v + b``."""


@dataclass
class ReLU:
    pass


@dataclass
class LinfDistOp(_Rows):
    """``v ↦ (max_i |v_i − w_ji| + b_j)_j`` (a ℓ∞-dist layer at p = ∞)."""


Op = Affine | ReLU | LinfDistOp


def _rational(values: float | list) -> Fraction | list:
    return [_rational(v) for v in values] if isinstance(values, list) else Fraction(values)


def _exact(t: torch.Tensor) -> list:
    """A float tensor's entries as exact rationals (nested lists): every float is a rational."""
    return _rational(t.detach().cpu().double().tolist())


def ops_of(model: nn.Module, input_shape: Sequence[int]) -> list[Op]:
    """The ops of a chain of supported modules; anything else raises ``TypeError``."""
    ops: list[Op] = []
    width = math.prod(input_shape)
    modules = list(model) if isinstance(model, nn.Sequential) else [model]
    for m in modules:
        kind = type(m)
        if kind in (nn.Flatten, nn.Identity):
            continue
        if kind is Normalize:
            mean, std = _exact(m.mean.flatten()), _exact(m.std.flatten())
            per_channel = width // len(mean)
            channel = [f // per_channel for f in range(width)]
            ops.append(
                Affine(
                    [
                        [Fraction(1) / std[channel[f]] if g == f else Fraction(0) for g in range(width)]
                        for f in range(width)
                    ],
                    [-mean[channel[f]] / std[channel[f]] for f in range(width)],
                )
            )
        elif kind is nn.Linear:
            bias = _exact(m.bias) if m.bias is not None else [Fraction(0)] * m.out_features
            ops.append(Affine(_exact(m.weight), bias))
            width = m.out_features
        elif kind is nn.ReLU:
            ops.append(ReLU())
        elif kind is LinfDist:
            if not math.isinf(m.p):
                raise TypeError("the oracle encodes ℓ∞-dist layers at p = ∞ only")
            bias = _exact(m.bias) if m.bias is not None else [Fraction(0)] * m.out_features
            ops.append(LinfDistOp(_exact(m.weight), bias))
            width = m.out_features
        elif kind is MeanShift:
            if m.training:
                raise TypeError("MeanShift must be in eval mode")
            shift = _exact(m.running_mean)
            ops.append(
                Affine(
                    [[Fraction(int(f == g)) for g in range(width)] for f in range(width)], [-s for s in shift]
                )
            )
        elif kind is Negate:
            ops.append(
                Affine(
                    [[Fraction(-int(f == g)) for g in range(width)] for f in range(width)],
                    [Fraction(0)] * width,
                )
            )
        else:
            raise TypeError(f"the oracle has no encoding for {kind.__name__}")
    return ops


def exact_values(ops: Sequence[Op], x: Sequence[float]) -> list[list[Fraction]]:
    """The exact input of every op and the exact logits last (rational arithmetic)."""
    values = [[Fraction(float(v)) for v in x]]
    for op in ops:
        v = values[-1]
        if isinstance(op, Affine):
            out = [sum((w * a for w, a in zip(row, v) if w), b) for row, b in zip(op.weight, op.bias)]
        elif isinstance(op, ReLU):
            out = [a if a > 0 else Fraction(0) for a in v]
        else:
            out = [max(abs(a - w) for a, w in zip(v, row)) + b for row, b in zip(op.weight, op.bias)]
        values.append(out)
    return values


def forward64(ops: Sequence[Op], points: np.ndarray) -> np.ndarray:
    """Float64 logits of the rows of ``points``."""
    v = np.atleast_2d(points).astype(np.float64)
    for op in ops:
        if isinstance(op, Affine):
            v = v @ op.w64.T + op.b64
        elif isinstance(op, ReLU):
            v = np.maximum(v, 0.0)
        else:
            v = np.abs(v[:, None, :] - op.w64[None]).max(-1) + op.b64
    return v


# --- the network with its float32 model -----------------------------------------------------


@dataclass
class Counterexample:
    """A point of [0, 1]ⁿ whose prediction is not y, verified in ``arithmetic``."""

    distance: float
    point: np.ndarray
    arithmetic: str  # "exact" (rational logits) or "float32" (the model's forward pass)


@dataclass
class SampleOracle:
    """``estimate``: the solver's optimum (exact up to solver tolerance where ``exact``), inf if the
    box holds no point of another class; ``counterexample``: the nearest verified one, if any."""

    estimate: float
    counterexample: Counterexample | None
    exact: bool

    @property
    def verified(self) -> float:
        return math.inf if self.counterexample is None else self.counterexample.distance


class Network:
    """A model, the shape of one input and its ops."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        self.shape = tuple(input_shape)
        self.n = math.prod(self.shape)
        self.ops = ops_of(model, self.shape)

    # arithmetic -------------------------------------------------------------------------
    def exact_logits(self, point: np.ndarray) -> list[Fraction]:
        return exact_values(self.ops, point)[-1]

    def flips_exactly(self, point: np.ndarray, y: int) -> bool:
        """Some class has exactly a strictly larger logit than y."""
        z = self.exact_logits(point)
        return any(v > z[y] for k, v in enumerate(z) if k != y)

    @torch.no_grad()
    def labels32(self, points: np.ndarray) -> np.ndarray:
        """The model's float32 predictions at the rows of ``points`` (already float32 values)."""
        x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).view(-1, *self.shape)
        return self.model(x).argmax(1).numpy()

    # verification ----------------------------------------------------------------------------
    def verify(self, x: np.ndarray, y: int, delta: np.ndarray, norm: str) -> Counterexample | None:
        """The nearest verified counterexample on the ray x + s·δ, s ≥ 0 (pushed beyond s = 1 for the
        exact check; float32 points of the segment scanned as well)."""
        order = math.inf if norm == "linf" else 2

        def dist(q: np.ndarray) -> float:
            return float(np.linalg.norm(q - x, ord=order))

        best = None
        for push in PUSHES:
            q = np.clip(x + (1.0 + push) * delta, 0.0, 1.0)
            if self.flips_exactly(q, y):
                best = Counterexample(dist(q), q, "exact")
                break
        scales = np.concatenate([np.geomspace(1e-6, 1.0, 40), 1.0 + np.array(PUSHES[1:])])
        points = np.clip(x[None] + scales[:, None] * delta[None], 0.0, 1.0).astype(np.float32)
        wrong = np.flatnonzero(self.labels32(points) != y)
        if len(wrong):
            q = points[wrong].astype(np.float64)
            d = np.linalg.norm(q - x[None], ord=order, axis=1)
            k = int(d.argmin())
            if best is None or d[k] < best.distance:
                best = Counterexample(float(d[k]), q[k], "float32")
        return best

    def at_x(self, x: np.ndarray, y: int) -> Counterexample | None:
        """x itself, if its prediction is not y (float32 pass or exact logits)."""
        if self.labels32(x[None])[0] != y:
            return Counterexample(0.0, x.copy(), "float32")
        if self.flips_exactly(x, y):
            return Counterexample(0.0, x.copy(), "exact")
        return None

    # oracles ---------------------------------------------------------------------------------
    def linf(self, x: np.ndarray, y: int) -> SampleOracle:
        """Least ℓ∞ distance to another class in [0, 1]ⁿ (MILP) and the nearest verified counterexample."""
        x = np.asarray(x, dtype=np.float64)
        direct = self.at_x(x, y)
        if direct is not None:
            return SampleOracle(0.0, direct, True)
        rational = exact_values(self.ops, x)
        values = [[float(v) for v in layer] for layer in rational]
        logits = values[-1]
        size = max(abs(v) for v in logits) or 1.0
        _, g, _, _ = trace(self.ops, x, point=x)
        estimate, best, exact = math.inf, None, True
        for j in range(len(logits)):
            if j == y:
                continue
            slope = float(np.abs(g[y] - g[j]).sum())
            for gap in (0.0, 1e-12 * size, 1e-9 * size, 1e-6 * size):
                # gap > 0 (z_j ≥ z_y + gap) only when the optimum itself did not verify (a tie)
                margin = float(rational[-1][y] - rational[-1][j])  # exact, then rounded
                required = margin + gap
                radius = min(1.0, max(4 * required / slope, 1e-14)) if slope > 0 else 1.0
                solution: np.ndarray | str = "failed"
                for _ in range(40):
                    solution = _linf_milp(self.ops, values, x, y, j, radius, required)
                    if isinstance(solution, str) and solution == "infeasible" and radius < 1.0:
                        radius = min(1.0, radius * 16)
                        continue
                    break
                if isinstance(solution, str):
                    exact = exact and solution == "infeasible"
                    break
                t = float(np.abs(solution).max())
                if 0 < t < 0.05 * radius:  # re-solve in a box fitted to the optimum (conditioning)
                    refined = _linf_milp(self.ops, values, x, y, j, 2 * t, required)
                    if isinstance(refined, np.ndarray):
                        solution, t = refined, float(np.abs(refined).max())
                if gap == 0:
                    estimate = min(estimate, t)
                found = self.verify(x, y, solution, "linf")
                if found is not None:
                    if best is None or found.distance < best.distance:
                        best = found
                    break
        return SampleOracle(estimate, best, exact)

    def l2(
        self, x: np.ndarray, y: int, starts: Sequence[np.ndarray] = (), max_patterns: int = 256
    ) -> SampleOracle:
        """Least ℓ2 distance to another class in [0, 1]ⁿ: exact for ReLU nets (every activation
        pattern), an upper bound from the patterns met at ``starts`` and along the way otherwise."""
        x = np.asarray(x, dtype=np.float64)
        direct = self.at_x(x, y)
        if direct is not None:
            return SampleOracle(0.0, direct, True)
        masks = self._relu_patterns(max_patterns)
        size = max(abs(float(v)) for v in self.exact_logits(x)) or 1.0
        best, estimate = None, math.inf
        for gap in (0.0, 1e-9 * size, 1e-6 * size):
            # gap > 0 (z_j ≥ z_y + gap) only when no optimum verified (a tie)
            candidates = self._l2_candidates(x, y, starts, masks, gap)
            if gap == 0 and candidates:
                estimate = candidates[0][0]
            for distance, delta in candidates[:6]:
                if best is not None and distance >= best.distance:
                    break
                found = self.verify(x, y, delta, "l2")
                if found is not None and (best is None or found.distance < best.distance):
                    best = found
            if best is not None or not candidates:
                break
        for s in starts:  # the ℓ∞ counterexamples are ℓ2 counterexamples too
            found = self.verify(x, y, np.asarray(s, dtype=np.float64) - x, "l2")
            if found is not None and (best is None or found.distance < best.distance):
                best = found
        return SampleOracle(estimate, best, masks is not None)

    def _l2_candidates(
        self,
        x: np.ndarray,
        y: int,
        starts: Sequence[np.ndarray],
        masks: list[list[np.ndarray]] | None,
        gap: float,
    ) -> list[tuple[float, np.ndarray]]:
        """Least-distance solutions on every ReLU pattern (``masks``), else on the patterns met at x,
        at ``starts``, at the first float32 flips along fixed directions and along the way; sorted."""
        candidates: list[tuple[float, np.ndarray]] = []
        if masks is not None:
            for mask in masks:
                candidates += _ldp_candidates(self.ops, x, y, masks=mask, gap=gap)
        else:
            tried: set[bytes] = set()
            frontier = [x, *[np.asarray(s, dtype=np.float64) for s in starts], *self._scan(x, y)]
            for _ in range(6):
                new: list[tuple[float, np.ndarray]] = []
                for p in frontier:
                    key = _pattern_key(self.ops, x, p)
                    if key in tried:
                        continue
                    tried.add(key)
                    new += _ldp_candidates(self.ops, x, y, point=p, gap=gap)
                candidates += new
                if not new:
                    break
                best_delta = min(candidates, key=lambda c: c[0])[1]
                frontier = [x + s * best_delta for s in (0.25, 0.5, 0.9, 0.99, 0.999999, 1.000001, 1.01)]
        return sorted(candidates, key=lambda c: c[0])

    def _scan(self, x: np.ndarray, y: int, directions: int = 48, steps: int = 48) -> list[np.ndarray]:
        """The first float32 point of another class along fixed pseudo-random directions (pattern seeds)."""
        rng = np.random.default_rng(0)
        dirs = rng.standard_normal((directions, self.n))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        scales = np.geomspace(1e-6, math.sqrt(self.n), steps)
        points = np.clip(x[None, None] + scales[None, :, None] * dirs[:, None], 0.0, 1.0)
        wrong = (self.labels32(points.reshape(-1, self.n).astype(np.float32)) != y).reshape(directions, steps)
        return [points[d, int(np.argmax(wrong[d]))] for d in range(directions) if wrong[d].any()]

    def _relu_patterns(self, limit: int) -> list[list[np.ndarray]] | None:
        """Every pattern of the ReLU units that interval bounds over [0, 1]ⁿ leave undecided, or None
        (ℓ∞-dist layers, or more than ``limit`` patterns)."""
        if any(isinstance(op, LinfDistOp) for op in self.ops):
            return None
        lower, upper = np.zeros(self.n), np.ones(self.n)
        choices: list[list[np.ndarray]] = []
        for op in self.ops:
            if isinstance(op, Affine):
                centre, radius = (upper + lower) / 2, (upper - lower) / 2
                centre, radius = op.w64 @ centre + op.b64, np.abs(op.w64) @ radius
                pad = 1e-9 * (np.abs(op.w64) @ np.maximum(np.abs(lower), np.abs(upper)) + np.abs(op.b64))
                lower, upper = centre - radius - pad, centre + radius + pad
            else:
                units = [
                    [True] if lo >= 0 else [False] if hi <= 0 else [True, False]
                    for lo, hi in zip(lower, upper)
                ]
                choices.append([np.array(p, dtype=bool) for p in itertools.product(*units)])
                lower, upper = np.maximum(lower, 0.0), np.maximum(upper, 0.0)
        if math.prod(len(c) for c in choices) > limit:
            return None
        return [list(p) for p in itertools.product(*choices)]


# --- ℓ∞: the MILP -----------------------------------------------------------------------------


class _Program:
    """Columns with bounds, rows ``lo ≤ a·v ≤ hi``; expressions are ({column: coefficient}, constant)."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integral: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []

    def var(self, lo: float, hi: float, integral: bool = False) -> int:
        self.lb.append(lo)
        self.ub.append(hi)
        self.integral.append(int(integral))
        return len(self.lb) - 1

    def row(self, expr: tuple[dict[int, float], float], lo: float, hi: float) -> None:
        coefs, const = expr
        self.rows.append((coefs, lo - const, hi - const))

    def bounds(self, expr: tuple[dict[int, float], float]) -> tuple[float, float]:
        coefs, const = expr
        lo = hi = const
        size = abs(const)
        for col, a in coefs.items():
            ends = (a * self.lb[col], a * self.ub[col])
            lo, hi = lo + min(ends), hi + max(ends)
            size += max(abs(e) for e in ends)
        pad = 1e-9 * size
        return lo - pad, hi + pad


def _combine(terms: Sequence[tuple[float, tuple[dict[int, float], float]]]) -> tuple[dict[int, float], float]:
    coefs: dict[int, float] = {}
    const = 0.0
    for a, (c, k) in terms:
        if a == 0:
            continue
        const += a * k
        for col, v in c.items():
            coefs[col] = coefs.get(col, 0.0) + a * v
    return coefs, const


def _var(col: int) -> tuple[dict[int, float], float]:
    return {col: 1.0}, 0.0


def _linf_milp(
    ops: Sequence[Op],
    values: list[list[float]],
    x: np.ndarray,
    y: int,
    target: int,
    radius: float,
    required: float,
) -> np.ndarray | str:
    """min ‖δ‖∞ over ‖δ‖∞ ≤ radius, x + δ ∈ [0, 1]ⁿ and Δz_target − Δz_y ≥ ``required``
    (the margin z_y − z_target at x, plus a gap); δ, "infeasible" or "failed".

    Every network quantity v is modelled as v(x) + Δv, Δv linear in the variables; ``values`` are
    the exact values at x (rounded to float64).
    """
    prog = _Program()
    n = len(x)
    t = prog.var(0.0, 1.0)
    us = [prog.var(max(-1.0, -x[i] / radius), min(1.0, (1.0 - x[i]) / radius)) for i in range(n)]
    for u in us:
        prog.row(_combine([(1.0, _var(u)), (-1.0, _var(t))]), -math.inf, 0.0)
        prog.row(_combine([(1.0, _var(u)), (1.0, _var(t))]), 0.0, math.inf)
    deltas = [({u: radius}, 0.0) for u in us]
    for op, v0, v1 in zip(ops, values[:-1], values[1:]):
        if isinstance(op, Affine):
            deltas = [_combine(list(zip(row, deltas))) for row in op.w64]
        elif isinstance(op, ReLU):
            out = []
            for z0, a0, dz in zip(v0, v1, deltas):
                lo, hi = prog.bounds(dz)
                low, high = z0 + lo, z0 + hi
                if low >= 0:
                    out.append(dz)
                elif high <= 0:
                    out.append(({}, -a0))
                else:
                    da, s = prog.var(-a0, high - a0), prog.var(0.0, 1.0, integral=True)
                    prog.row(_combine([(1.0, _var(da)), (-1.0, dz)]), z0 - a0, math.inf)
                    prog.row(
                        _combine([(1.0, _var(da)), (-1.0, dz), (-low, _var(s))]), -math.inf, z0 - a0 - low
                    )
                    prog.row(_combine([(1.0, _var(da)), (-high, _var(s))]), -math.inf, -a0)
                    out.append(_var(da))
            deltas = out
        else:
            out = []
            for row in op.w64:
                ps, plo, phi, p0s = [], [], [], []
                for a0, w, dv in zip(v0, row, deltas):
                    c0 = a0 - w
                    p0 = abs(c0)
                    lo, hi = prog.bounds(dv)
                    low, high = c0 + lo, c0 + hi
                    if low >= 0:
                        ps.append(_combine([(1.0, dv), (1.0, ({}, c0 - p0))]))
                        plo.append(low)
                        phi.append(high)
                    elif high <= 0:
                        ps.append(_combine([(-1.0, dv), (1.0, ({}, -c0 - p0))]))
                        plo.append(-high)
                        phi.append(-low)
                    else:
                        top = max(-low, high)
                        dp, s = prog.var(-p0, top - p0), prog.var(0.0, 1.0, integral=True)
                        prog.row(_combine([(1.0, _var(dp)), (-1.0, dv)]), c0 - p0, math.inf)
                        prog.row(_combine([(1.0, _var(dp)), (1.0, dv)]), -c0 - p0, math.inf)
                        prog.row(
                            _combine([(1.0, _var(dp)), (-1.0, dv), (-2 * low, _var(s))]),
                            -math.inf,
                            c0 - p0 - 2 * low,
                        )
                        prog.row(
                            _combine([(1.0, _var(dp)), (1.0, dv), (-2 * high, _var(s))]), -math.inf, -c0 - p0
                        )
                        ps.append(_var(dp))
                        plo.append(0.0)
                        phi.append(top)
                    p0s.append(p0)
                m0 = max(p0s)
                floor = max(plo)
                candidates = [i for i in range(len(ps)) if phi[i] >= floor]
                # Δp_i measured from p_i(x); the max from m0 = max_i p_i(x)
                shifted = [_combine([(1.0, ps[i]), (1.0, ({}, p0s[i] - m0))]) for i in range(len(ps))]
                if len(candidates) == 1:
                    out.append(shifted[candidates[0]])
                    continue
                top = max(phi)
                dm = prog.var(floor - m0, top - m0)
                picks = [prog.var(0.0, 1.0, integral=True) for _ in candidates]
                prog.row((dict.fromkeys(picks, 1.0), 0.0), 1.0, 1.0)
                for i, s in zip(candidates, picks):
                    big = top - plo[i]
                    prog.row(_combine([(1.0, _var(dm)), (-1.0, shifted[i])]), 0.0, math.inf)
                    prog.row(_combine([(1.0, _var(dm)), (-1.0, shifted[i]), (big, _var(s))]), -math.inf, big)
                out.append(_var(dm))
            deltas = out
    prog.row(_combine([(1.0, deltas[target]), (-1.0, deltas[y])]), required, math.inf)

    size = len(prog.lb)
    matrix = np.zeros((len(prog.rows), size))
    lows, highs = np.empty(len(prog.rows)), np.empty(len(prog.rows))
    for r, (coefs, lo, hi) in enumerate(prog.rows):
        scale = max((abs(v) for v in coefs.values()), default=1.0) or 1.0
        for col, v in coefs.items():
            matrix[r, col] = v / scale
        lows[r], highs[r] = lo / scale, hi / scale
    cost = np.zeros(size)
    cost[t] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # HiGHS options scipy passes on verbatim
        result = milp(
            cost,
            integrality=np.array(prog.integral),
            bounds=Bounds(prog.lb, prog.ub),
            constraints=LinearConstraint(matrix, lows, highs),
            options=dict(MILP_OPTIONS),
        )
    if result.status == 2:
        return "infeasible"
    if result.x is None or result.status != 0:
        return "failed"
    return radius * result.x[us]


# --- ℓ2: activation patterns and least-distance programmes ------------------------------------


def trace(
    ops: Sequence[Op],
    x: np.ndarray,
    point: np.ndarray | None = None,
    masks: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The affine piece of the network on one linear region, in δ = x' − x: logits ``c + G δ`` on the
    region ``{δ : rows_c + rows_G δ ≥ 0}``. The region is the one of ``point`` or, for ReLU nets,
    given by ``masks`` (one boolean array per ReLU op: active units)."""
    n = len(x)
    c, g = x.astype(np.float64).copy(), np.eye(n)
    offset = None if point is None else point - x
    rows_c: list[np.ndarray] = []
    rows_g: list[np.ndarray] = []
    relu = 0
    for op in ops:
        if isinstance(op, Affine):
            c, g = op.w64 @ c + op.b64, op.w64 @ g
        elif isinstance(op, ReLU):
            active = masks[relu] if masks is not None else (c + g @ offset) >= 0
            relu += 1
            sign = np.where(active, 1.0, -1.0)
            rows_c.append(sign * c)
            rows_g.append(sign[:, None] * g)
            c, g = np.where(active, c, 0.0), g * active[:, None]
        else:
            outs_c, outs_g = [], []
            for w, b in zip(op.w64, op.b64):
                vc, vg = c - w, g
                at = vc + vg @ offset
                sign = np.where(at >= 0, 1.0, -1.0)
                ac, ag = sign * vc, sign[:, None] * vg
                k = int(np.argmax(sign * at))
                rows_c += [ac, ac[k] - np.delete(ac, k)]
                rows_g += [ag, ag[k][None] - np.delete(ag, k, axis=0)]
                outs_c.append(ac[k] + b)
                outs_g.append(ag[k])
            c, g = np.array(outs_c), np.array(outs_g)
    region_c = np.concatenate(rows_c) if rows_c else np.zeros(0)
    region_g = np.concatenate(rows_g) if rows_g else np.zeros((0, n))
    return c, g, region_c, region_g


def _pattern_key(ops: Sequence[Op], x: np.ndarray, point: np.ndarray) -> bytes:
    _, _, region_c, region_g = trace(ops, x, point=point)
    return np.signbit(region_c + region_g @ (point - x)).tobytes() + region_g.tobytes()


def least_distance(g: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """argmin ‖δ‖₂ subject to g δ ≥ h, or None if infeasible (Lawson & Hanson 1974, ch. 23: LDP by NNLS)."""
    norms = np.linalg.norm(g, axis=1)
    zero = norms == 0
    if np.any(h[zero] > 0):
        return None
    g, h = g[~zero] / norms[~zero, None], h[~zero] / norms[~zero]
    n = g.shape[1]
    if len(g) == 0:
        return np.zeros(n)
    e = np.vstack([g.T, h[None]])
    f = np.zeros(n + 1)
    f[-1] = 1.0
    w, _ = nnls(e, f, maxiter=50 * (len(h) + n + 1))
    r = e @ w - f
    if abs(r[-1]) < 1e-12:
        return None
    delta = -r[:n] / r[-1]
    if np.any(g @ delta < h - 1e-9 * (1.0 + np.abs(h))):  # NNLS stopped short: not a solution
        return None
    return delta


def _ldp_candidates(
    ops: Sequence[Op],
    x: np.ndarray,
    y: int,
    point: np.ndarray | None = None,
    masks: Sequence[np.ndarray] | None = None,
    gap: float = 0.0,
) -> list[tuple[float, np.ndarray]]:
    """For each class j ≠ y, the ℓ2-nearest δ in the region with x + δ ∈ [0, 1]ⁿ and z_j ≥ z_y + gap."""
    c, g, region_c, region_g = trace(ops, x, point=point, masks=masks)
    n = len(x)
    box_g = np.vstack([np.eye(n), -np.eye(n)])
    box_h = np.concatenate([-x, x - 1.0])
    found = []
    for j in range(len(c)):
        if j == y:
            continue
        rows = np.vstack([region_g, box_g, (g[j] - g[y])[None]])
        rhs = np.concatenate([-region_c, box_h, [c[y] - c[j] + gap]])
        delta = least_distance(rows, rhs)
        if delta is not None:
            found.append((float(np.linalg.norm(delta)), delta))
    return found
