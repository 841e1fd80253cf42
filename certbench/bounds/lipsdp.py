"""LipSDP-Neuron ℓ2 Lipschitz bounds (Fazlyab et al. 2019) with a float64 certificate check.

Network (Pauli et al. 2021, eq. (1)): ``x¹ = φ(W₀x⁰ + b₀) … xˡ = φ(W_{l−1}x^{l−1} + b_{l−1})``,
``f(x⁰) = W_l xˡ + b_l`` with φ slope-restricted in [α, β] = [0, 1] (ReLU, tanh).
LipSDP-Neuron (Fazlyab et al. 2019, Thm. 2; Pauli et al. 2021, eq. (4)) certifies ``L = √ρ`` when, for a
diagonal ``T = diag(T₁ … T_l) ⪰ 0``,

    M(ρ, T) = [A; B]ᵀ [[−2αβT, (α+β)T], [(α+β)T, −2T]] [A; B] + blkdiag(−ρI, 0, …, 0, W_lᵀW_l) ⪯ 0,

``A = [blkdiag(W₀ … W_{l−1}), 0]``, ``B = [0, I]``. With α = 0, β = 1 its blocks are ``M₀₀ = −ρI``,
``M_kk = −2T_k`` (+ ``W_lᵀW_l`` for k = l) and ``M_{k,k−1} = T_k W_{k−1}``.

Solving the SDP with a first-order solver gives an answer that is not yet a certificate (see
``papers/METHODS.md``): :func:`lipsdp` therefore checks the returned (ρ, T) in float64 and, if the
matrix is not negative definite, repairs it (keep T, scale it if needed, bisect ρ). Only a verified
bound is returned as ``bound``.

Two exact reductions keep the SDP small and well scaled:

* first layer: with ``W₀ = UΣVᵀ`` (thin SVD), ``f(x) = g(Vᵀx)`` where g uses ``UΣ``; V has orthonormal
  columns, so f and g have the same Lipschitz constant and the input block shrinks to rank(W₀) ≤ n₁;
* layer scaling: the congruence ``D M D`` with ``D = blkdiag(d₀I, …, d_lI)`` maps a certificate for
  weights ``W_k`` to one for ``(d_k/d_{k+1}) W_k`` (``d_{l+1} = 1``), ``ρ d₀²`` and ``T_k d_k²``, so the
  SDP is solved with every ``W_k`` scaled to spectral norm 1 and mapped back afterwards.

MLPs that average-pool their input (Pauli et al. 2021: 28×28 → 196 inputs) are handled exactly:
the pooling is a linear map P, so the network from the pixels is the MLP with first weight
``W₀·diag(1/σ)·P`` (:class:`MLPStructure`); the first-layer reduction then brings the input block
back to ≤ n₁.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import scipy.linalg
import torch
from scipy.optimize import minimize_scalar
from threadpoolctl import threadpool_limits
from torch import nn

from certbench.nn import Normalize

SOLVERS = ("SCS", "CLARABEL")
#: Clarabel (interior point) factors a dense block of (d(d+1)/2)² entries for a d×d PSD cone:
#: d = 300 needs about 16 GB. Larger LMIs are refused instead of exhausting the memory.
CLARABEL_MAX_DIM = 150
#: BLAS threads for the SDP solve and the float64 check: more threads than free cores made the
#: eigenvalue bisection of the repair 100× slower on a loaded 2-core machine (benchmarks/lipsdp.py).
BLAS_THREADS = 1
_EPS64 = np.finfo(np.float64).eps
_BISECTION_STEPS = 40


# ---------------------------------------------------------------------------------------------
# The LMI and its float64 check
# ---------------------------------------------------------------------------------------------


def _check_chain(weights: Sequence[np.ndarray]) -> None:
    for k in range(1, len(weights)):
        if weights[k].shape[1] != weights[k - 1].shape[0]:
            raise ValueError(
                f"weights[{k}] has {weights[k].shape[1]} inputs but weights[{k - 1}] "
                f"has {weights[k - 1].shape[0]} outputs"
            )


def lmi_matrix(weights: Sequence[np.ndarray], rho: float, multipliers: Sequence[np.ndarray]) -> np.ndarray:
    """M(ρ, T) of LipSDP-Neuron for α = 0, β = 1 (module docstring); feasible iff ⪯ 0 and T ⪰ 0.

    ``weights = [W₀ … W_l]`` (W_k of shape (n_{k+1}, n_k)), ``multipliers = [t₁ … t_l]`` with
    ``t_k`` the diagonal of T_k (length n_k).
    """
    _check_chain(weights)
    if len(multipliers) != len(weights) - 1:
        raise ValueError(f"{len(weights)} weight matrices need {len(weights) - 1} multiplier vectors")
    sizes = [w.shape[1] for w in weights]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    m = np.zeros((offsets[-1], offsets[-1]))
    m[: sizes[0], : sizes[0]] = -rho * np.eye(sizes[0])
    for k in range(1, len(weights)):
        t = np.asarray(multipliers[k - 1], dtype=np.float64)
        rows, cols = slice(offsets[k], offsets[k + 1]), slice(offsets[k - 1], offsets[k])
        m[rows, rows] = -2.0 * np.diag(t)
        m[rows, cols] = t[:, None] * weights[k - 1]
        m[cols, rows] = m[rows, cols].T
    last = slice(offsets[-2], offsets[-1])
    m[last, last] += weights[-1].T @ weights[-1]
    return m


def max_eigenvalue(matrix: np.ndarray) -> float:
    """Largest eigenvalue of a symmetric matrix in float64."""
    n = matrix.shape[0]
    return float(scipy.linalg.eigvalsh(matrix, subset_by_index=[n - 1, n - 1])[0])


def is_certified(weights: Sequence[np.ndarray], rho: float, multipliers: Sequence[np.ndarray]) -> bool:
    """True iff T ⪰ 0 and M(ρ, T) is negative semidefinite despite float64 round-off.

    LAPACK's symmetric eigensolver is backward stable: the computed eigenvalues are exact for some
    ``M + E`` with ``‖E‖₂ ≲ n·ε·‖M‖``. Requiring ``λ_max ≤ −8·n·ε·‖M‖_F`` therefore proves
    ``λ_max(M) ≤ 0`` (Weyl's inequality); the same slack covers the rounding in forming M.
    """
    if any(np.any(np.asarray(t) < 0) for t in multipliers) or not math.isfinite(rho):
        return False
    m = lmi_matrix(weights, rho, multipliers)
    if not np.all(np.isfinite(m)):
        return False
    margin = 8.0 * m.shape[0] * _EPS64 * float(np.linalg.norm(m))
    return max_eigenvalue(m) <= -margin


def min_rho(weights: Sequence[np.ndarray], multipliers: Sequence[np.ndarray]) -> float | None:
    """Smallest ρ with M(ρ, T) ⪯ 0 for fixed T, by the Schur complement on the input block.

    With ``K`` the hidden block of M and ``C`` its coupling to the input block,
    ``M ⪯ 0 ⟺ K ≺ 0 and ρI ⪰ Cᵀ(−K)⁻¹C``, so ``ρ_min = ‖L⁻¹C‖₂²`` with ``−K = LLᵀ``.
    Returns None when K is not negative definite (no ρ works for this T).
    """
    m = lmi_matrix(weights, 0.0, multipliers)
    n0 = weights[0].shape[1]
    if m.shape[0] == n0:  # no hidden layer: M = −ρI + W₀ᵀW₀
        return float(np.linalg.norm(weights[0], 2) ** 2)
    try:
        chol = scipy.linalg.cholesky(-m[n0:, n0:], lower=True)
    except np.linalg.LinAlgError:
        return None
    z = scipy.linalg.solve_triangular(chol, m[n0:, :n0], lower=True)
    return float(np.linalg.norm(z, 2) ** 2)


def _scale_for_definiteness(weights: Sequence[np.ndarray], multipliers: Sequence[np.ndarray]) -> float | None:
    """Smallest s with K(sT) ≺ 0, or None if no scaling of T helps.

    ``K(sT) = s·G(T) + P`` with ``P = blkdiag(0, …, W_lᵀW_l) ⪰ 0``: it is negative definite iff
    ``−G ≻ 0`` and s exceeds the largest generalised eigenvalue of ``(P, −G)``.
    """
    n0 = weights[0].shape[1]
    k_full = lmi_matrix(weights, 0.0, multipliers)[n0:, n0:]
    p = np.zeros_like(k_full)
    n_last = weights[-1].shape[1]
    p[-n_last:, -n_last:] = weights[-1].T @ weights[-1]
    try:
        return float(scipy.linalg.eigh(p, -(k_full - p), eigvals_only=True)[-1])
    except np.linalg.LinAlgError:
        return None


def repair(
    weights: Sequence[np.ndarray], rho: float, multipliers: Sequence[np.ndarray]
) -> tuple[float, list[np.ndarray]] | None:
    """Turn an approximate LipSDP answer (ρ, T) into a verified one, or None.

    Returns (ρ, T) unchanged if :func:`is_certified` already holds. Otherwise T is clipped to ≥ 0
    (entries below 1e-9·max T are raised to that floor so that no hidden direction is left with a
    zero diagonal), scaled by the factor minimising ρ_min(sT) if K(T) is not negative definite, and
    the smallest certified ρ ≥ :func:`min_rho` is found by bisection.
    """
    if is_certified(weights, rho, multipliers):
        return rho, [np.asarray(t, dtype=np.float64) for t in multipliers]
    top = max((float(np.max(t)) for t in multipliers if t.size), default=0.0)
    if multipliers and top <= 0:
        return None
    ts = [np.maximum(np.asarray(t, dtype=np.float64), 1e-9 * top) for t in multipliers]
    lo = min_rho(weights, ts)
    if lo is None:
        s_min = _scale_for_definiteness(weights, ts)
        if s_min is None or not math.isfinite(s_min):
            return None

        def rho_at(log_s: float) -> float:
            value = min_rho(weights, [math.exp(log_s) * t for t in ts])
            return math.inf if value is None else value

        best = minimize_scalar(
            rho_at,
            bounds=(math.log(s_min) + 1e-6, math.log(s_min) + math.log(4.0)),
            method="bounded",
            options={"xatol": 1e-4},
        )
        ts = [math.exp(best.x) * t for t in ts]
        lo = min_rho(weights, ts)
        if lo is None:
            return None
    gap = max(lo, 1.0) * 1e-12
    for _ in range(80):
        if is_certified(weights, lo + gap, ts):
            break
        gap *= 2.0
    else:
        return None
    hi = lo + gap
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if is_certified(weights, mid, ts):
            hi = mid
        else:
            lo = mid
    return hi, ts


# ---------------------------------------------------------------------------------------------
# Exact reductions
# ---------------------------------------------------------------------------------------------


def reduce_first_layer(weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Replace W₀ = UΣVᵀ by UΣ when W₀ has more columns than rows (same Lipschitz constant)."""
    w0 = np.asarray(weights[0], dtype=np.float64)
    if w0.shape[1] <= w0.shape[0]:
        return [np.asarray(w, dtype=np.float64) for w in weights]
    u, s, _ = np.linalg.svd(w0, full_matrices=False)
    return [u * s] + [np.asarray(w, dtype=np.float64) for w in weights[1:]]


def layer_scales(weights: Sequence[np.ndarray]) -> np.ndarray:
    """Spectral norms ‖W_k‖₂ (zero norms replaced by 1)."""
    norms = np.array([np.linalg.norm(w, 2) for w in weights], dtype=np.float64)
    return np.where(norms > 0, norms, 1.0)


def multiplier_factors(scales: np.ndarray) -> np.ndarray:
    """``c_k = (∏_{j≥k} s_j)²``, k = 1 … l: T_k for the original weights is c_k times T_k for W_k/s_k."""
    tails = np.cumprod(scales[::-1])[::-1]
    return tails[1:] ** 2


def product_bound(weights: Sequence[np.ndarray]) -> float:
    """The naive bound ∏ ‖W_k‖₂ (valid for 1-Lipschitz activations)."""
    return float(np.prod([np.linalg.norm(w, 2) for w in weights]))


# ---------------------------------------------------------------------------------------------
# Solving LipSDP
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LipSDPResult:
    """Outcome of :func:`lipsdp`.

    ``bound`` is the verified ℓ2 Lipschitz bound (None unless ``status == "verified"``);
    ``raw_bound`` is √ρ as the solver returned it, ``repaired_bound`` the bound after the float64
    check and repair (equal to ``bound`` when verified). ``multipliers`` are the diagonals of
    T₁ … T_l for the *original* weights, certified together with ``bound²``.
    ``status``: "verified", "time_limit", "solver_failed" or "unverified" (repair failed).
    """

    bound: float | None
    raw_bound: float | None
    repaired_bound: float | None
    multipliers: list[np.ndarray] = field(repr=False)
    status: str
    solver: str
    solver_status: str
    solve_time: float
    message: str = ""

    @property
    def verified(self) -> bool:
        return self.status == "verified"


def _solver_options(solver: str, time_limit: float | None, eps: float) -> dict[str, object]:
    if solver == "SCS":
        options: dict[str, object] = {"eps_abs": eps, "eps_rel": eps, "max_iters": 200_000}
        if time_limit is not None:
            options["time_limit_secs"] = max(time_limit, 1e-3)
        return options
    options = {"tol_gap_abs": eps, "tol_gap_rel": eps, "tol_feas": eps}
    if time_limit is not None:
        options["time_limit"] = max(time_limit, 1e-3)
    return options


def solve_sdp(
    problem: cp.Problem,
    solver: str,
    time_limit: float | None,
    eps: float,
    started: float,
    lmi_dim: int,
    warm_start: bool = False,
) -> tuple[str, str]:
    """Solve ``problem`` (``lmi_dim``: the side of its largest PSD cone) within the time left of
    ``time_limit`` (seconds since ``started``).

    Returns ``(outcome, message)`` with outcome "ok" (optimal or optimal_inaccurate and in time),
    "time_limit" or "solver_failed". The solver's own accuracy warnings are silenced: the caller
    checks the answer in float64 anyway.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown SDP solver '{solver}'; known: {', '.join(SOLVERS)}")
    if solver == "CLARABEL" and lmi_dim > CLARABEL_MAX_DIM:
        return "solver_failed", (
            f"CLARABEL refused: a {lmi_dim}×{lmi_dim} LMI needs about "
            f"{8 * (lmi_dim * (lmi_dim + 1) / 2) ** 2 / 1e9:.0f} GB; use SCS"
        )
    left = None if time_limit is None else time_limit - (time.perf_counter() - started)
    if left is not None and left <= 0:
        return "time_limit", f"time limit of {time_limit:g} s reached before the solver started"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            problem.solve(solver=solver, warm_start=warm_start, **_solver_options(solver, left, eps))
    except cp.SolverError as error:
        return "solver_failed", f"{solver} failed: {error}"
    elapsed = time.perf_counter() - started
    if time_limit is not None and elapsed > time_limit:
        return "time_limit", f"time limit of {time_limit:g} s exceeded ({elapsed:.1f} s, {problem.status})"
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or any(
        v.value is None for v in problem.variables()
    ):
        return "solver_failed", f"{solver} returned status '{problem.status}'"
    return "ok", ""


class LipSDPProblem:
    """The LipSDP-Neuron SDP for one pattern of layer sizes, with the (reduced, scaled) weights as
    cvxpy parameters: compiled once (DPP) and, re-solved with new weights, started by SCS from the
    previous solution (warm start). Meant to be kept across the solves of one training run (the
    ADMM's once-per-iteration LipSDP); the answer is checked and repaired by :func:`lipsdp` as always.

    The LMI is block tridiagonal (blocks ``M_{k,k−1}`` only), a chordal sparsity pattern whose
    maximal cliques are the consecutive block pairs (k−1, k). By the chordal decomposition theorem
    (Agler, Helton, McCullough & Rodman 1988; Vandenberghe & Andersen 2015, Thm. 9.2), −M ⪰ 0 iff
    ``−M = Σ_k E_kᵀ S_k E_k`` with ``S_k ⪰ 0`` on clique k, so the one PSD cone of size Σn_k is replaced,
    exactly, by l cones of size n_{k−1} + n_k (as in Chordal-LipSDP, Xue et al. 2022). Measured on
    784-100-100-10: 300 → two cones of 200, about half the SCS time (``benchmarks/lipsdp.py --study``).
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        """``sizes = [n₀, …, n_l]``: the inputs of W₀ … W_l (after the first-layer reduction)."""
        self.sizes = tuple(sizes)
        self.weights = [cp.Parameter((sizes[k + 1], sizes[k])) for k in range(len(sizes) - 1)]
        self.gram = cp.Parameter((sizes[-1], sizes[-1]), symmetric=True)
        self.rho = cp.Variable(nonneg=True)
        self.ts = [cp.Variable(n, nonneg=True) for n in sizes[1:]]
        if len(sizes) == 1:  # no hidden layer: ρI − W₀ᵀW₀ ⪰ 0
            constraints = [self.rho * np.eye(sizes[0]) - self.gram >> 0]
        else:
            constraints = self._clique_constraints()
        self.problem = cp.Problem(cp.Minimize(self.rho), constraints)
        self.solved = False

    @property
    def largest_cone(self) -> int:
        """The side of the largest PSD cone (what an interior-point solver's memory grows with)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        return max(a + b for a, b in zip(self.sizes, self.sizes[1:]))

    def _clique_constraints(self) -> list[cp.Constraint]:
        """−M(ρ, T) = Σ_k E_kᵀ S_k E_k, S_k ⪰ 0 on blocks (k−1, k): off-diagonal blocks of S_k are
        −T_k W_{k−1}; diagonal block k of −M (2T_k, or ρI for k = 0, minus W_lᵀW_l for k = l) is split
        between the two cliques that hold it."""
        sizes, count = self.sizes, len(self.sizes) - 1
        cliques = [cp.Variable((sizes[k - 1] + sizes[k],) * 2, PSD=True) for k in range(1, count + 1)]
        constraints = [cliques[0][: sizes[0], : sizes[0]] == self.rho * np.eye(sizes[0])]
        for k in range(1, count + 1):
            before, clique = sizes[k - 1], cliques[k - 1]
            constraints.append(clique[before:, :before] == -cp.diag(self.ts[k - 1]) @ self.weights[k - 1])
            diagonal = clique[before:, before:]
            if k < count:
                diagonal = diagonal + cliques[k][: sizes[k], : sizes[k]]
                constraints.append(diagonal == 2 * cp.diag(self.ts[k - 1]))
            else:
                constraints.append(diagonal == 2 * cp.diag(self.ts[k - 1]) - self.gram)
        return constraints

    def load(self, scaled: Sequence[np.ndarray]) -> None:
        """Set the parameters to the weights ``[W₀ … W_l]`` (W_l only through W_lᵀW_l)."""
        for parameter, w in zip(self.weights, scaled[:-1]):
            parameter.value = w
        gram = scaled[-1].T @ scaled[-1]
        self.gram.value = (gram + gram.T) / 2


def lipsdp(
    weights: Sequence[np.ndarray],
    *,
    solver: str = "SCS",
    time_limit: float | None = None,
    eps: float = 1e-5,
    cache: dict[tuple[int, ...], LipSDPProblem] | None = None,
    warm_start: bool = False,
    blas_threads: int | None = BLAS_THREADS,
) -> LipSDPResult:
    """Verified LipSDP-Neuron bound for ``f = W_l φ(… φ(W₀x))`` with φ slope-restricted in [0, 1].

    Solves ``min ρ s.t. M(ρ, T) ⪯ 0, T ⪰ 0 diagonal`` (Fazlyab et al. 2019, eq. (10)) on the reduced,
    scaled weights (module docstring), then checks and repairs the answer in float64
    (:func:`repair`). ``time_limit`` (seconds, wall clock, including problem construction) is a hard
    limit on claiming a bound: past it, no bound is returned. ``cache`` (a dict owned by the caller)
    keeps one :class:`LipSDPProblem` per size pattern, so repeated solves skip the compilation; with
    ``warm_start`` SCS starts from the cached problem's last solution (fewer iterations near it, but
    the answer then depends on the previous solve, not on the weights alone). Dense linear algebra
    runs on ``blas_threads`` BLAS threads (None: the library's default).
    """
    started = time.perf_counter()
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    _check_chain(weights)
    reduced = reduce_first_layer(weights)
    scales = layer_scales(reduced)
    scaled = [w / s for w, s in zip(reduced, scales)]
    sizes = tuple(w.shape[1] for w in scaled)
    sdp = cache.get(sizes) if cache is not None else None
    if sdp is None:
        sdp = LipSDPProblem(sizes)
        if cache is not None:
            cache[sizes] = sdp
    sdp.load(scaled)
    problem, rho, ts = sdp.problem, sdp.rho, sdp.ts
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        outcome, message = solve_sdp(
            problem,
            solver,
            time_limit,
            eps,
            started,
            sdp.largest_cone,
            warm_start=warm_start and sdp.solved and solver == "SCS",
        )
        sdp.solved = sdp.solved or outcome == "ok"
        return _lipsdp_result(problem, rho, ts, scaled, scales, solver, outcome, message, time_limit, started)


def _lipsdp_result(
    problem: cp.Problem,
    rho: cp.Variable,
    ts: Sequence[cp.Variable],
    scaled: Sequence[np.ndarray],
    scales: np.ndarray,
    solver: str,
    outcome: str,
    message: str,
    time_limit: float | None,
    started: float,
) -> LipSDPResult:
    """Check and repair the solver's answer of :func:`lipsdp` in float64; map T back to the weights."""

    def result(
        status: str,
        raw: float | None = None,
        repaired: float | None = None,
        multipliers: list[np.ndarray] | None = None,
        note: str = "",
    ) -> LipSDPResult:
        return LipSDPResult(
            bound=repaired if status == "verified" else None,
            raw_bound=raw,
            repaired_bound=repaired,
            multipliers=multipliers or [],
            status=status,
            solver=solver,
            solver_status=str(problem.status),
            solve_time=time.perf_counter() - started,
            message=note,
        )

    if outcome != "ok":
        return result(outcome, note=message)
    scale_prod = float(np.prod(scales))
    raw_rho = float(rho.value)
    raw_t = [np.asarray(t.value, dtype=np.float64) for t in ts]
    raw_bound = math.sqrt(max(raw_rho, 0.0)) * scale_prod
    repaired = repair(scaled, raw_rho, raw_t)
    if repaired is None:
        return result(
            "unverified",
            raw_bound,
            note=f"{solver} answer ({problem.status}) could not be repaired into a certificate",
        )
    rho_ok, t_ok = repaired
    factors = multiplier_factors(scales)
    multipliers = [c * t for c, t in zip(factors, t_ok)]
    bound = math.sqrt(rho_ok) * scale_prod
    if time_limit is not None and time.perf_counter() - started > time_limit:
        return result("time_limit", raw_bound, note=f"time limit of {time_limit:g} s exceeded during repair")
    return result("verified", raw_bound, bound, multipliers)


def fixed_multiplier_bound(
    weights: Sequence[np.ndarray], multipliers: Sequence[np.ndarray]
) -> tuple[float, list[np.ndarray]] | None:
    """Verified LipSDP bound of ``weights`` near the given T (no SDP) and the T that certifies it, or
    None if no multiple of T certifies any ρ.

    The smallest ρ with M(ρ, T) ⪯ 0 (Fazlyab et al. 2019, Thm. 2) found by :func:`repair` in float64,
    after the same exact reductions as :func:`lipsdp`: with ``W₀ = UΣVᵀ`` the LMI of W₀ is congruent to
    that of UΣ plus a decoupled −ρI block, so the same T certifies both; layer scaling maps T_k to
    ``T_k / c_k`` (:func:`multiplier_factors`). Used for the ADMM's W̄ (Pauli et al. 2021, Sec. IV),
    which an SDP solver returns only approximately feasible. T is kept if the hidden block of
    M(·, T) is negative definite, else scaled (:func:`repair`). Homogeneity: if (ρ, T) certifies
    ``[W₀ … W_l]``, then (s²ρ, s²T) certifies ``[W₀ … s·W_l]`` (M scales by s²).
    """
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    _check_chain(weights)
    if len(multipliers) != len(weights) - 1:
        raise ValueError(f"{len(weights)} weight matrices need {len(weights) - 1} multiplier vectors")
    reduced = reduce_first_layer(weights)
    scales = layer_scales(reduced)
    scaled = [w / s for w, s in zip(reduced, scales)]
    factors = multiplier_factors(scales)
    repaired = repair(
        scaled, math.inf, [np.asarray(t, dtype=np.float64) / c for t, c in zip(multipliers, factors)]
    )
    if repaired is None:
        return None
    rho, ts = repaired
    return math.sqrt(rho) * float(np.prod(scales)), [c * t for c, t in zip(factors, ts)]


def isotropic_gain(input_map: np.ndarray, rows: int) -> float:
    """√c for a map P with ``PPᵀ = cI`` (``rows`` rows); ValueError for any other P.

    Then ``(WP)(WP)ᵀ = (√c·W)(√c·W)ᵀ`` for every W, so LipSDP cannot tell WP from √c·W
    (:func:`weight_step`).
    """
    p = np.asarray(input_map, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != rows:
        raise ValueError(f"input_map must have {rows} rows (the first layer's inputs), got shape {p.shape}")
    gram = p @ p.T
    c = float(np.trace(gram)) / rows
    if not c > 0 or np.linalg.norm(gram - c * np.eye(rows)) > 1e-12 * c * rows:
        raise ValueError(
            "input_map must have orthogonal rows of equal norm (P Pᵀ = cI), as average "
            "pooling with kernel = stride and no padding has"
        )
    return math.sqrt(c)


@dataclass(frozen=True)
class WeightStepResult:
    """Outcome of :func:`weight_step`: the new W̄ (None unless status == "ok") and its ρ."""

    weights: list[np.ndarray] | None
    rho: float | None
    status: str
    solve_time: float
    message: str = ""


def weight_step(
    targets: Sequence[np.ndarray],
    multipliers: Sequence[np.ndarray],
    *,
    rho_admm: float,
    mu: float | None = None,
    max_bound: float | None = None,
    input_map: np.ndarray | None = None,
    solver: str = "SCS",
    time_limit: float | None = None,
    eps: float = 1e-5,
) -> WeightStepResult:
    """The W̄-step of the ADMM of Pauli et al. (2021), with T fixed:

        min_{W̄, ρ}  μρ + (ρ_a/2) Σ_k ‖W̄_k − Z_k‖²_F   s.t.   S(ρ, T, W̄) ⪰ 0,

    ``Z_k = W_k + Y_k/ρ_a`` (``targets``; this equals the coupling terms
    ``(ρ_a/2)‖W_k − W̄_k‖² + tr(Y_kᵀ(W_k − W̄_k))`` up to a constant) and S the LipSDP-Neuron LMI with
    the last layer moved into a Schur complement so that it is linear in W̄:

        S = [[ρI, −W̄₀ᵀT₁, 0, …], [−T₁W̄₀, 2T₁, −W̄₁ᵀT₂, …], …, [… −T_lW̄_{l−1}, 2T_l, −W̄_lᵀ], [… −W̄_l, I]].

    Regularised variant: pass ``mu`` (ρ is a variable, L² = ρ penalised); enforced variant: pass
    ``max_bound`` L̄ (ρ = L̄² fixed). W̄₀ enters S only through W̄₀W̄₀ᵀ, so with ``Z₀ = UΣVᵀ`` the optimum
    has ``W̄₀ = AVᵀ`` (a component orthogonal to V's columns raises both the objective and W̄₀W̄₀ᵀ):
    the SDP is solved for A with target UΣ, an exact reduction of the input dimension to rank(Z₀).

    ``input_map`` P (shape (n₀, N)): the network's first linear map is W̄₀P (e.g. P the average pooling
    of :meth:`MLPStructure.pool_matrix`), so S is the LMI of ``[W̄₀P, W̄₁, …]`` — the bound L̄ holds on
    the N inputs of P — while W̄₀ (n₀ columns) and its target stay in the coordinates the optimiser
    trains. P is carried into the LMI exactly: S depends on W̄₀P only through ``W̄₀PPᵀW̄₀ᵀ``
    (Schur complement on the ρI block), and P must have orthogonal rows of equal norm, ``PPᵀ = cI``
    (true for average pooling with kernel = stride and no padding: disjoint windows of equal size),
    so S for W̄₀P equals S for √c·W̄₀. The objective is unchanged, so the row-space reduction above
    stays exact, and the returned ρ is the bound for the N inputs of P.
    """
    if (mu is None) == (max_bound is None):
        raise ValueError("pass exactly one of mu (regularised) and max_bound (enforced)")
    started = time.perf_counter()
    targets = [np.asarray(z, dtype=np.float64) for z in targets]
    _check_chain(targets)
    gain = 1.0 if input_map is None else isotropic_gain(input_map, targets[0].shape[1])
    z0 = targets[0]
    if z0.shape[1] > z0.shape[0]:
        u, s, vt = np.linalg.svd(z0, full_matrices=False)
        z0_reduced, basis = u * s, vt
    else:
        z0_reduced, basis = z0, None
    variables = [cp.Variable(z0_reduced.shape)] + [cp.Variable(z.shape) for z in targets[1:]]
    lmi_weights = [gain * variables[0]] + variables[1:]
    rho = cp.Variable(nonneg=True) if mu is not None else cp.Constant(float(max_bound) ** 2)
    sizes = [z0_reduced.shape[1]] + [z.shape[1] for z in targets[1:]] + [targets[-1].shape[0]]
    blocks: list[list[object]] = [[np.zeros((a, b)) for b in sizes] for a in sizes]
    blocks[0][0] = rho * np.eye(sizes[0])
    for k in range(1, len(targets)):
        t = np.asarray(multipliers[k - 1], dtype=np.float64)
        blocks[k][k] = 2 * np.diag(t)
        coupling = -np.diag(t) @ lmi_weights[k - 1]
        blocks[k][k - 1], blocks[k - 1][k] = coupling, coupling.T
    blocks[-1][-1] = np.eye(sizes[-1])
    blocks[-1][-2], blocks[-2][-1] = -variables[-1], -variables[-1].T
    fit = sum(cp.sum_squares(v - z) for v, z in zip(variables, [z0_reduced] + targets[1:]))
    objective = rho_admm / 2 * fit + (mu * rho if mu is not None else 0)
    problem = cp.Problem(cp.Minimize(objective), [cp.bmat(blocks) >> 0])
    outcome, message = solve_sdp(problem, solver, time_limit, eps, started, sum(sizes))
    if outcome != "ok":
        return WeightStepResult(None, None, outcome, time.perf_counter() - started, message)
    new = [np.asarray(v.value, dtype=np.float64) for v in variables]
    if basis is not None:
        new[0] = new[0] @ basis
    return WeightStepResult(new, float(rho.value), "ok", time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# MLP models
# ---------------------------------------------------------------------------------------------


class NotAnMLPError(ValueError):
    """The model is not ``[Normalize] [AvgPool2d] [Flatten] Linear (ReLU|Tanh Linear)*``."""


def _leaves(module: nn.Module) -> list[nn.Module]:
    if type(module) is nn.Sequential:
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


@dataclass
class MLPStructure:
    """The linear layers of an MLP, the input scaling 1/σ of its Normalize layer and its input pooling.

    Two sets of weights (the mean of Normalize only shifts the first bias):

    * :meth:`weights` ``[W₀·diag(1/σ), W₁, …]``: the trained weights with 1/σ folded in (per input
      feature of W₀); the map from the first Linear's inputs in pixel scale;
    * :meth:`pixel_weights` ``[W₀·diag(1/σ)·P, W₁, …]``: the map from the image pixels in [0, 1],
      P the matrix of the ``pool`` layer (identity without one). Its ℓ2 Lipschitz constant is the
      model's. Average pooling commutes with the per-channel 1/σ, so this is also W₀·P·diag(1/σ_pixel).
    """

    linears: list[nn.Linear]
    scale: torch.Tensor | None
    pool: nn.AvgPool2d | None = None

    def weights(self) -> list[torch.Tensor]:
        """``[W₀·diag(1/σ), W₁, …, W_l]``, differentiable w.r.t. the model's parameters."""
        first = self.linears[0].weight
        if self.scale is not None:
            first = first * self.scale.to(first)
        return [first] + [lin.weight for lin in self.linears[1:]]

    def numpy_weights(self) -> list[np.ndarray]:
        """:meth:`weights` as float64 numpy arrays."""
        return [w.detach().cpu().double().numpy() for w in self.weights()]

    @torch.no_grad()
    def pool_matrix(self, input_shape: Sequence[int]) -> np.ndarray | None:
        """P (pooled features × pixels) of the pooling layer on inputs of shape (C, H, W), or None.

        Built exactly in float64 by pooling the identity basis (N = C·H·W images; 5 MB for 784 pixels).
        """
        if self.pool is None:
            return None
        n = math.prod(input_shape)
        pooled = self.pool(torch.eye(n, dtype=torch.float64).view(n, *input_shape)).flatten(1)
        if pooled.shape[1] != self.linears[0].in_features:
            raise ValueError(
                f"pooling inputs of shape {tuple(input_shape)} gives {pooled.shape[1]} features, "
                f"but the first Linear takes {self.linears[0].in_features}"
            )
        return pooled.T.numpy()

    def pixel_weights(self, input_shape: Sequence[int] | None = None) -> list[np.ndarray]:
        """``[W₀·diag(1/σ)·P, W₁, …]`` in float64; ``input_shape`` (C, H, W) is needed with a pooling
        layer."""
        weights = self.numpy_weights()
        if self.pool is None:
            return weights
        if input_shape is None:
            raise ValueError("an MLP with an input pooling layer needs the input shape (C, H, W)")
        return [weights[0] @ self.pool_matrix(input_shape)] + weights[1:]

    @torch.no_grad()
    def load_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Write weights in the form of :meth:`numpy_weights` back into the model."""
        for k, (lin, w) in enumerate(zip(self.linears, weights)):
            value = torch.as_tensor(np.asarray(w), dtype=torch.float64)
            if k == 0 and self.scale is not None:
                value = value / self.scale.double().cpu()
            lin.weight.copy_(value.to(lin.weight))


def _check_pool(pool: nn.AvgPool2d) -> None:
    """Accept average pooling whose windows tile the input: kernel = stride, no padding, floor mode.

    Its matrix P then has disjoint rows with equal entries, ``PPᵀ = cI`` (see :func:`isotropic_gain`).
    """
    kernel, stride, padding = (
        tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        for v in (pool.kernel_size, pool.stride, pool.padding)
    )
    if kernel != stride or padding != (0, 0) or pool.ceil_mode:
        raise NotAnMLPError(
            f"input pooling must have kernel = stride, no padding and ceil_mode=False, got "
            f"kernel {kernel}, stride {stride}, padding {padding}, ceil_mode {pool.ceil_mode}"
        )


def mlp_structure(model: nn.Module) -> MLPStructure:
    """Parse ``[Normalize] [AvgPool2d] [Flatten] Linear (ReLU|Tanh Linear)*`` (nested Sequentials allowed).

    A pooling layer must tile its input (:func:`_check_pool`) and be followed by Flatten.
    Raises :class:`NotAnMLPError` for anything else. ReLU and tanh are both slope-restricted in
    [0, 1], which is what LipSDP-Neuron assumes. Layers are matched by exact type: a subclass
    (a ReLU with another slope, say) may compute something else and is refused.
    """
    leaves = _leaves(model)
    normalize = leaves.pop(0) if leaves and type(leaves[0]) is Normalize else None
    pool = leaves.pop(0) if leaves and type(leaves[0]) is nn.AvgPool2d else None
    flatten = leaves.pop(0) if leaves and type(leaves[0]) is nn.Flatten else None
    linears = [m for m in leaves[0::2] if type(m) is nn.Linear]
    activations = [m for m in leaves[1::2] if type(m) in (nn.ReLU, nn.Tanh)]
    if (
        not leaves
        or len(leaves) % 2 == 0
        or len(linears) != (len(leaves) + 1) // 2
        or len(activations) != len(leaves) // 2
        or (pool is not None and flatten is None)
    ):
        kinds = ", ".join(type(m).__name__ for m in _leaves(model))
        raise NotAnMLPError(
            f"not a [Normalize] [AvgPool2d] [Flatten] Linear (ReLU|Tanh Linear)* chain "
            f"of exactly these types (pooling needs Flatten): {kinds}"
        )
    if pool is not None:
        _check_pool(pool)
    scale = None
    if normalize is not None:
        inv_std = 1.0 / normalize.std.detach().flatten()
        features = linears[0].in_features
        if features % inv_std.numel():
            raise NotAnMLPError(f"{features} input features do not split into {inv_std.numel()} channels")
        scale = inv_std.repeat_interleave(features // inv_std.numel())
    return MLPStructure(linears, scale, pool)


def is_mlp(model: nn.Module) -> bool:
    """True iff :func:`mlp_structure` accepts the model."""
    try:
        mlp_structure(model)
    except NotAnMLPError:
        return False
    return True


def mlp_weights(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[np.ndarray]:
    """Float64 weights of an MLP from the pixels in [0, 1] (:meth:`MLPStructure.pixel_weights`);
    ``input_shape`` (C, H, W) is needed when the MLP pools its input."""
    return mlp_structure(model).pixel_weights(input_shape)
