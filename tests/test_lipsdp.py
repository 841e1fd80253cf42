"""LipSDP-Neuron: exactness on one layer, sandwich between sampled gradients and ∏‖W‖₂, the float64
check/repair, time limits and failures, the ADMM W̄-step, the lipsdp-l2 certificate and the
lipsdp-admm method, MLPs that average-pool their input, and the rings2d generator."""

from __future__ import annotations

import copy
import math

import cvxpy as cp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds.lipsdp import (
    NotAnMLPError,
    fixed_multiplier_bound,
    is_certified,
    is_mlp,
    lipsdp,
    lmi_matrix,
    max_eigenvalue,
    min_rho,
    mlp_structure,
    mlp_weights,
    product_bound,
    repair,
    weight_step,
)
from certbench.data.rings2d import RINGS, make_rings2d
from certbench.nn import Normalize
from methods.lipsdp_admm import _balanced_rho, _distance


def make_mlp(
    seed: int,
    shape: tuple[int, int, int],
    widths: tuple[int, ...],
    classes: int,
    activation: type[nn.Module],
    std: tuple[float, ...],
    pool: int = 1,
) -> nn.Sequential:
    """Normalize → [AvgPool2d(pool)] → Flatten → (Linear → activation)* → Linear, in float64."""
    torch.manual_seed(seed)
    pooling = [nn.AvgPool2d(pool)] if pool > 1 else []
    layers: list[nn.Module] = [Normalize([0.5] * shape[0], std), *pooling, nn.Flatten()]
    previous = shape[0] * (shape[1] // pool) * (shape[2] // pool)
    for width in widths:
        layers += [nn.Linear(previous, width), activation()]
        previous = width
    return nn.Sequential(*layers, nn.Linear(previous, classes)).double()


def sampled_gradient_norm(model: nn.Module, shape: tuple[int, int, int], samples: int = 2000) -> float:
    """max over random inputs of ‖∂f/∂x‖₂ (spectral norm of the Jacobian): a lower bound on L."""
    x = torch.rand(samples, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3 - 1
    jac = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))(x).flatten(2)
    return float(torch.linalg.matrix_norm(jac.detach(), 2).max())


def random_weights(seed: int, dims: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((dims[i + 1], dims[i])) / math.sqrt(dims[i]) for i in range(len(dims) - 1)]


# --- LipSDP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (3, 9)])
def test_single_linear_layer_gives_spectral_norm(shape: tuple[int, int]) -> None:
    w = np.random.default_rng(0).standard_normal(shape) * 3
    result = lipsdp([w])
    exact = np.linalg.norm(w, 2)
    assert result.verified and result.multipliers == []
    assert exact <= result.bound <= exact * (1 + 1e-6)


@pytest.mark.parametrize(
    "seed, shape, widths, activation, std",
    [
        (0, (1, 2, 3), (8,), nn.ReLU, (0.5,)),
        (1, (1, 2, 3), (8, 8), nn.ReLU, (0.3,)),
        (2, (2, 1, 3), (10, 6), nn.Tanh, (0.5, 0.25)),
        (3, (1, 4, 4), (12, 12), nn.Tanh, (1.0,)),
    ],
)
def test_bound_between_sampled_gradients_and_norm_product(seed, shape, widths, activation, std) -> None:
    model = make_mlp(seed, shape, widths, 3, activation, std)
    weights = mlp_weights(model)
    result = lipsdp(weights)
    assert result.verified, result.message
    lower = sampled_gradient_norm(model, shape)
    assert lower <= result.bound <= product_bound(weights) * (1 + 1e-9)
    # the returned (bound², T) is a certificate for the full, unreduced, unscaled weights
    assert max_eigenvalue(lmi_matrix(weights, result.bound**2, result.multipliers)) <= 1e-9


def test_normalisation_is_folded_into_the_first_layer() -> None:
    model = make_mlp(0, (2, 1, 2), (4,), 3, nn.ReLU, (0.5, 0.25))
    first = model[2].weight.detach()
    assert np.allclose(mlp_weights(model)[0], (first / torch.tensor([0.5, 0.5, 0.25, 0.25])).numpy())


def lipschitz_lower_bound(weights: list[np.ndarray], samples: int = 2000) -> float:
    """max ‖W_l D_l ⋯ D_1 W₀‖₂ over diagonal D_k with entries in [0, 1]: the identity, 0/1 patterns and
    uniform draws. Each such D is the Jacobian of some activation slope-restricted in [0, 1], so every
    LipSDP-Neuron certificate √ρ is at least this (a lower bound computed without the LMI)."""
    rng = np.random.default_rng(1)
    best = 0.0
    for draw in (
        lambda n: np.ones((1, n)),
        lambda n: rng.integers(0, 2, (samples, n)).astype(float),
        lambda n: rng.uniform(0, 1, (samples, n)),
    ):
        jac = weights[0][None]
        for w in weights[1:]:
            jac = w[None] @ (draw(w.shape[1])[:, :, None] * jac)
        best = max(best, float(np.linalg.norm(jac, 2, axis=(1, 2)).max()))
    return best


@pytest.mark.parametrize("seed", [1, 4, 7])
def test_repair_makes_the_lmi_negative_semidefinite(seed: int) -> None:
    """What :func:`repair` guarantees, whatever (ρ, T) it is given: None, or a certified answer (T ⪰ 0 and
    M(ρ, T) ⪯ 0 with the float64 round-off margin) with T the given one (floored at 1e-9·max T) or that
    times one factor s > 1 when K(T) ⊀ 0, ρ the smallest certified value for that T, and √ρ a bound on the
    Lipschitz constant. Not guaranteed: ρ ≥ the ρ it was given (another T can admit a smaller ρ), nor an
    answer for every T (None when no scaling of T makes K negative definite). The solver's own answer
    varies in its last digits between machines, so only these properties are asserted."""
    weights = random_weights(seed, (6, 10, 10, 3))
    result = lipsdp(weights)
    assert result.verified, result.message
    ts = result.multipliers
    lower = min_rho(weights, ts)
    assert lower is not None and result.bound**2 >= lower
    # a deliberately infeasible ρ is caught
    assert max_eigenvalue(lmi_matrix(weights, 0.98 * lower, ts)) > 0
    assert not is_certified(weights, 0.98 * lower, ts)
    assert not is_certified(weights, result.bound**2, [-t for t in ts])

    shrunk = [0.1 * t for t in ts]
    assert min_rho(weights, shrunk) is None  # T too small: no ρ works unless T is scaled up
    grown = [2.0 * t for t in ts]  # K(2T) = 2K(T) − P ≺ 0: repairable, with another minimal ρ
    rng = np.random.default_rng(0)
    jittered = [t * rng.uniform(0.9, 1.1, t.shape) for t in ts]
    true_lower = lipschitz_lower_bound(weights)
    for bad_rho, bad_t in [(0.5 * lower, ts), (lower, shrunk), (lower, grown), (lower, jittered)]:
        floor = 1e-9 * max(float(v.max()) for v in bad_t)
        floored = [np.maximum(v, floor) for v in bad_t]
        feasible_t = min_rho(weights, floored) is not None
        fixed = repair(weights, bad_rho, bad_t)
        if is_certified(weights, bad_rho, bad_t):  # already a certificate: returned as it is
            assert fixed is not None and fixed[0] == bad_rho
            assert all(np.array_equal(a, b) for a, b in zip(fixed[1], bad_t, strict=True))
            continue
        if fixed is None:
            assert bad_t is jittered and not feasible_t
            continue
        rho, t = fixed
        # certified in float64, with the margin for round-off
        assert all(np.all(v >= 0) for v in t)
        assert is_certified(weights, rho, t)
        assert max_eigenvalue(lmi_matrix(weights, rho, t)) <= 0
        # T kept (floored), or scaled up by one factor where K(T) is not negative definite
        scale = float(t[0][0] / floored[0][0])
        assert scale == 1 if feasible_t else scale > 1
        assert all(np.allclose(a, scale * b, rtol=1e-12, atol=0) for a, b in zip(t, floored, strict=True))
        # ρ is the smallest certified value for that T (bisection down to the Schur-complement minimum),
        # up to round-off, which grows with the condition number of the hidden block K
        minimum = min_rho(weights, t)
        hidden = lmi_matrix(weights, 0.0, t)[weights[0].shape[1] :, weights[0].shape[1] :]
        assert minimum is not None and minimum <= rho <= minimum * (1 + 1e-9 * np.linalg.cond(hidden))
        # √ρ bounds the Lipschitz constant, computed without the LMI
        assert math.sqrt(rho) >= true_lower
        # a certified answer comes back unchanged
        again = repair(weights, rho, t)
        assert again is not None and again[0] == rho
        assert all(np.array_equal(a, b) for a, b in zip(again[1], t, strict=True))


def test_time_limit_and_solver_failure_claim_no_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = random_weights(5, (20, 30, 30, 5))
    late = lipsdp(weights, time_limit=1e-4)
    assert late.status == "time_limit" and late.bound is None and late.repaired_bound is None
    assert "time limit" in late.message

    def fail(self, *args, **kwargs):  # noqa: ANN001
        raise cp.SolverError("simulated breakdown")

    monkeypatch.setattr(cp.Problem, "solve", fail)
    failed = lipsdp(weights)
    assert failed.status == "solver_failed" and failed.bound is None and "simulated" in failed.message


def test_mlp_structure_rejects_other_models() -> None:
    with pytest.raises(NotAnMLPError):
        mlp_structure(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(NotAnMLPError):
        mlp_structure(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(NotAnMLPError):
        mlp_structure(nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    model = make_mlp(0, (2, 1, 2), (4,), 3, nn.Tanh, (0.5, 0.25))
    structure = mlp_structure(model)
    weights = [2 * w for w in structure.numpy_weights()]
    structure.load_weights(weights)
    assert all(np.allclose(a, b) for a, b in zip(mlp_weights(model), weights))


# --- the ADMM W̄-step ---------------------------------------------------------------------------


def test_weight_step_enforces_the_bound_and_keeps_feasible_weights() -> None:
    weights = random_weights(6, (2, 10, 10, 3))
    weights = [3 * w for w in weights]
    result = lipsdp(weights)
    target = result.bound / 2
    enforced = weight_step(weights, result.multipliers, rho_admm=1.0, max_bound=target)
    assert enforced.status == "ok"
    assert lipsdp(enforced.weights).bound <= target * (1 + 1e-3)
    # W already satisfies a looser bound with these T: projecting it changes (almost) nothing
    loose = weight_step(weights, result.multipliers, rho_admm=1.0, max_bound=1.2 * result.bound)
    change = sum(np.sum((a - b) ** 2) for a, b in zip(loose.weights, weights))
    assert change < 1e-6 * sum(np.sum(w**2) for w in weights)
    # penalising L² lowers the bound
    regularised = weight_step(weights, result.multipliers, rho_admm=1.0, mu=0.05)
    assert math.sqrt(regularised.rho) < 0.95 * result.bound
    assert lipsdp(regularised.weights).bound <= math.sqrt(regularised.rho) * (1 + 1e-3)


def test_fixed_multiplier_bound_is_certified_and_homogeneous_in_the_last_layer() -> None:
    """The bound for a given T is a float64 certificate, matches LipSDP at its own T, and scales
    exactly with the last layer when T scales by s² (what the enforced ADMM relies on). The bound is
    proven on the reduced, scaled LMI, which is congruent to this one; checked here 1e-6 above it."""
    slack = (1 + 1e-6) ** 2
    weights = [2 * w for w in random_weights(9, (12, 6, 5, 3))]
    result = lipsdp(weights)
    bound, ts = fixed_multiplier_bound(weights, result.multipliers)
    assert is_certified(weights, slack * bound**2, ts)
    assert bound == pytest.approx(result.bound, rel=1e-6)
    perturbed = [1.05 * weights[0], *weights[1:]]  # another W, the same T: still a verified bound
    bound_p, ts_p = fixed_multiplier_bound(perturbed, result.multipliers)
    assert is_certified(perturbed, slack * bound_p**2, ts_p)
    s = 0.3
    scaled, ts_s = fixed_multiplier_bound([*weights[:-1], s * weights[-1]], [s * s * t for t in ts])
    assert scaled == pytest.approx(s * bound, rel=1e-6)
    assert is_certified([*weights[:-1], s * weights[-1]], slack * scaled**2, ts_s)


def test_weight_step_reduction_of_a_wide_first_layer() -> None:
    """With 12 inputs and 4 hidden neurons W̄₀ is solved in a 4-dim row space; compare with L̄ bounds."""
    weights = [3 * w for w in random_weights(7, (12, 4, 3))]
    result = lipsdp(weights)
    step = weight_step(weights, result.multipliers, rho_admm=1.0, max_bound=result.bound / 3)
    assert step.weights[0].shape == (4, 12)
    assert lipsdp(step.weights).bound <= result.bound / 3 * (1 + 1e-3)


# --- MLPs that average-pool their input (Pauli et al. 2021) ------------------------------------

POOLED = [
    (0, (2, 6, 6), 2, (8, 8), nn.ReLU, (0.5, 0.25)),
    (1, (1, 7, 7), 3, (10,), nn.Tanh, (0.3,)),
]  # 7×7 with 3×3 windows drops a row and a column


def first_layer_jacobian(model: nn.Sequential, shape: tuple[int, int, int]) -> np.ndarray:
    """∂(first Linear's output)/∂pixels, by autograd through Normalize → AvgPool2d → Flatten → Linear."""
    head = model[:4]
    jac = torch.func.jacrev(lambda v: head(v[None])[0])(torch.rand(*shape, dtype=torch.float64))
    return jac.detach().flatten(1).numpy()


@pytest.mark.parametrize("seed, shape, pool, widths, activation, std", POOLED)
def test_pooled_mlp_bound_is_in_pixel_units(seed, shape, pool, widths, activation, std) -> None:
    model = make_mlp(seed, shape, widths, 3, activation, std, pool=pool)
    first = first_layer_jacobian(model, shape)  # W₀·P·diag(1/σ)
    weights = mlp_weights(model, shape)
    assert np.allclose(weights[0], first, rtol=1e-12, atol=0)
    result = lipsdp(weights)
    assert result.verified, result.message
    lower = sampled_gradient_norm(model, shape)
    assert lower <= result.bound <= product_bound([first] + weights[1:]) * (1 + 1e-9)
    with pytest.raises(ValueError, match="input shape"):
        mlp_weights(model)
    with pytest.raises(ValueError, match="features"):
        mlp_weights(model, (shape[0], shape[1] + pool, shape[2]))


def test_only_tiling_poolings_are_accepted() -> None:
    def model(*pooling: nn.Module) -> nn.Sequential:
        return nn.Sequential(Normalize([0.5], [0.5]), *pooling, nn.Linear(9, 4), nn.ReLU(), nn.Linear(4, 2))

    assert is_mlp(model(nn.AvgPool2d(2), nn.Flatten()))
    assert is_mlp(model(nn.AvgPool2d((2, 3), divisor_override=5), nn.Flatten()))
    for pooling in [
        nn.AvgPool2d(3, 2),
        nn.AvgPool2d(2, padding=1),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2),
    ]:
        assert not is_mlp(model(pooling, nn.Flatten()))
    assert not is_mlp(model(nn.AvgPool2d(2)))  # no Flatten


def test_weight_step_carries_the_pooling_into_the_lmi() -> None:
    """W̄₀ stays in pooled coordinates while the LMI bounds W̄₀P: the enforced bound holds for W̄₀P,
    and a W whose W₀P already meets a looser L̄ is left alone (ignoring P would halve that L̄ for W₀)."""
    model = make_mlp(2, (1, 8, 8), (6, 6), 3, nn.ReLU, (0.3,), pool=2)
    structure = mlp_structure(model)
    pool = structure.pool_matrix((1, 8, 8))
    assert pool.shape == (16, 64) and np.allclose(pool @ pool.T, np.eye(16) / 4)
    weights = [3 * w for w in structure.numpy_weights()]
    pixel = [weights[0] @ pool] + weights[1:]
    result = lipsdp(pixel)
    enforced = weight_step(
        weights, result.multipliers, rho_admm=1.0, max_bound=result.bound / 2, input_map=pool
    )
    assert enforced.status == "ok" and enforced.weights[0].shape == (6, 16)
    assert lipsdp([enforced.weights[0] @ pool] + enforced.weights[1:]).bound <= result.bound / 2 * (1 + 1e-3)
    loose = weight_step(
        weights, result.multipliers, rho_admm=1.0, max_bound=1.2 * result.bound, input_map=pool
    )
    change = sum(np.sum((a - b) ** 2) for a, b in zip(loose.weights, weights))
    assert change < 1e-6 * sum(np.sum(w**2) for w in weights)
    with pytest.raises(ValueError, match="orthogonal rows"):
        weight_step(weights, result.multipliers, rho_admm=1.0, max_bound=1.0, input_map=pool + 0.1)


def test_certificate_on_a_pooled_mlp_survives_pgd() -> None:
    from certbench.attacks import Attack
    from certbench.certificates import CERTIFICATES
    from certbench.data.specs import DATASETS
    from certbench.models import build

    spec = DATASETS.get("fashion-mnist")
    torch.manual_seed(3)
    model = build("mlp", spec, widths=[16, 16], input_pool=2).eval()
    x = torch.rand(6, *spec.shape, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    certificate = CERTIFICATES.get("lipsdp-l2")(time_limit=60)
    assert certificate.applies(model)
    result = certificate.certify(model, x, y, [0.01])
    first = first_layer_jacobian(model.double(), spec.shape)
    model.float()
    assert result.extra["lipschitz_bound"] <= product_bound([first] + mlp_weights(model, spec.shape)[1:])
    assert np.all(result.radius > 0)
    attack = Attack("pgd-l2", steps=100)
    assert attack.run(model, x[:1], y[:1], 10 * float(result.radius[0]), seed=0).success[
        0
    ]  # the attack has teeth
    for i, radius in enumerate(result.radius):
        run = attack.run(model, x[i : i + 1], y[i : i + 1], 0.999 * float(radius), seed=0)
        assert not run.success[0] and not run.error[0], f"point {i}: radius {radius} broken"


def test_admm_enforced_on_a_pooled_mlp_ends_below_the_bound() -> None:
    """The Pauli et al. MNIST setting in small: fashion-mnist shape, 2×2 pooling (196 inputs), L̄ in pixels."""
    from certbench.data.fashion_mnist import DEBIAN_FASHION_MNIST
    from certbench.data.loaders import load_split

    if DEBIAN_FASHION_MNIST.exists():
        x, y = load_split("fashion-mnist")[1][1].tensors
        data = x[:600], y[:600]
    else:
        generator = torch.Generator().manual_seed(0)
        data = (
            torch.rand(600, 1, 28, 28, generator=generator),
            torch.randint(0, 10, (600,), generator=generator),
        )
    method, model = _admm_method(
        {"variant": "enforced", "max_bound": 1.0, "rho_admm": 0.25, "tolerance": 0.01},
        epochs=4,
        dataset="fashion-mnist",
        arch_params={"widths": [16], "input_pool": 2},
    )
    _train(method, model, torch.optim.Adam(model.parameters(), lr=0.01), range(4), 4, batches=6, data=data)
    assert method._wbar[0].shape == (16, 196)  # the ADMM variables are the trained weights
    assert max(method._bounds) > 1.0  # the trained W alone would break the bound
    assert lipsdp(mlp_weights(model, (1, 28, 28))).bound <= 1.0


# --- rings2d -----------------------------------------------------------------------------------


def test_rings2d_is_balanced_deterministic_and_separated() -> None:
    x, y = make_rings2d(301, seed=3)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (301, 2)
    assert x.min() >= 0 and x.max() <= 1
    assert np.bincount(y).tolist() == [101, 100, 100]
    radius = np.linalg.norm(x - 0.5, axis=1)
    for label, (inner, outer) in enumerate(RINGS):
        assert np.all((radius[y == label] >= inner - 1e-6) & (radius[y == label] <= outer + 1e-6))
    again, labels = make_rings2d(301, seed=3)
    assert np.array_equal(again, x) and np.array_equal(labels, y)
    assert not np.array_equal(make_rings2d(301, seed=4)[0], x)


# --- the lipsdp-l2 certificate -----------------------------------------------------------------


def test_certificate_radius_is_sound_and_failures_are_errors() -> None:
    from certbench.certificates import CERTIFICATES, ERROR

    model = make_mlp(8, (1, 2, 3), (16, 16), 3, nn.ReLU, (0.3,)).float().eval()
    x = torch.rand(64, 1, 2, 3, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    y[:8] = (y[:8] + 1) % 3  # some misclassified points
    certificate = CERTIFICATES.get("lipsdp-l2")(time_limit=60)
    assert certificate.applies(model)
    assert not certificate.applies(
        nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))
    )
    result = certificate.certify(model, x, y, [0.01, 0.1])
    bound = lipsdp(mlp_weights(model)).bound
    assert result.extra["lipschitz_bound"] == pytest.approx(bound) and result.extra["solve_seconds"] > 0
    assert np.all(result.radius[:8] == 0) and np.all(result.radius[8:] > 0)
    # moving every correctly classified point by 0.999·radius against its margin gradient keeps the label
    x_adv = x[8:].clone().requires_grad_(True)
    logits = model(x_adv)
    others = logits.scatter(1, y[8:, None], float("-inf")).max(1).values
    (logits.gather(1, y[8:, None]).squeeze(1) - others).sum().backward()
    direction = -x_adv.grad / x_adv.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.as_tensor(result.radius[8:], dtype=torch.float32).view(-1, 1, 1, 1)
    assert torch.equal(model(x[8:] + 0.999 * radius * direction).argmax(1), y[8:])
    for eps, status in result.status.items():
        assert np.array_equal(status == "certified", result.radius > eps)
    late = type(certificate)(time_limit=1e-4).certify(model, x, y, [0.01])
    assert late.radius is None and np.all(late.status[0.01] == ERROR) and "time_limit" in late.errors[0]


def test_certificate_is_never_looser_than_the_product_of_norms_on_a_trained_mlp() -> None:
    """Where both LipSDP bounds (whole map and body) are below the products of spectral norms, every
    ``lipsdp-l2`` radius is at least the ``lipschitz-l2`` one: the same two margin forms, smaller slopes.
    (Before the body form, ``lipsdp-l2`` used only margin/(√2·L) and lost to ``lipschitz-l2``'s
    last-layer form on most points.)"""
    from certbench.certificates import CERTIFICATES
    from certbench.certificates.lipschitz import exact_bound

    torch.manual_seed(0)
    model = make_mlp(8, (1, 2, 3), (16, 16), 3, nn.ReLU, (0.3,)).float()
    x = torch.rand(256, 1, 2, 3)
    teacher = torch.randn(6, 3)
    y = (x.flatten(1) @ teacher).argmax(1)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    sdp = CERTIFICATES.get("lipsdp-l2")(time_limit=120).certify(model, x, y, [0.1])
    product = CERTIFICATES.get("lipschitz-l2")().certify(model, x, y, [0.1])
    estimate, _ = exact_bound(model, (1, 2, 3))
    assert sdp.extra["lipschitz_bound"] <= float(estimate.total)
    assert sdp.extra["lipschitz_bound_sub"] <= float(estimate.sub)
    assert (sdp.radius > 0).mean() > 0.5
    assert np.all(sdp.radius >= product.radius)
    assert np.mean(sdp.radius > product.radius) > 0.5  # strictly better on most certified points


# --- the lipsdp-admm method --------------------------------------------------------------------


def _admm_method(params: dict, epochs: int, dataset: str = "rings2d", arch_params: dict | None = None):  # noqa: ANN202
    from certbench import config as cfg
    from certbench.catalogue import params_schema
    from certbench.data.specs import DATASETS
    from certbench.method import RunContext, get_method

    filled = cfg.validate_against(params_schema("lipsdp-admm"), params, "params.")
    method = get_method("lipsdp-admm")(
        filled, RunContext(DATASETS.get(dataset), epochs, (0.02,), (0.02,), torch.device("cpu"))
    )
    method.check()
    torch.manual_seed(0)
    model = method.build_model("mlp", arch_params or {"widths": [10, 10], "activation": "tanh"})
    method.prepare(model)
    return method, model


def _rings() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_rings2d(300, seed=0)
    return torch.from_numpy(x).view(-1, 1, 1, 2), torch.from_numpy(y)


def _train(
    method,
    model,
    optimiser,
    epochs: range,
    total: int,
    batches: int = 10,  # noqa: ANN001
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """The framework's loop: progress = (epoch + batch/len(loader))/epochs, after_step after each step,
    finish after the last epoch. ``data`` defaults to 300 rings2d points."""
    x, y = data if data is not None else _rings()
    for epoch in epochs:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for batch, idx in enumerate(order.split(len(x) // batches)):
            out = method.loss(model, x[idx], y[idx], (epoch + batch / batches) / total)
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
            method.after_step(model)
    if epochs[-1] == total - 1:
        method.finish(model)


def test_admm_enforced_variant_ends_below_the_bound() -> None:
    params = {"variant": "enforced", "max_bound": 3.0, "rho_admm": 0.1, "tolerance": 0.01}
    method, model = _admm_method(params, epochs=8)
    _train(method, model, torch.optim.Adam(model.parameters(), lr=0.03), range(8), 8)
    assert max(method._bounds) > 3.0  # the trained W alone would break the bound
    assert lipsdp(mlp_weights(model)).bound <= 3.0


def test_admm_enforced_bound_holds_after_every_epoch_on_the_rings() -> None:
    """Pauli et al. 2021, enforced variant: W̄ has L ≤ L̄ during the whole training. The ADMM starts
    from the initial weights, and after every epoch the recorded ``wbar_bound`` is a float64-verified
    bound ≤ L̄ of the W̄ the method holds (checked again here by an independent LipSDP solve)."""
    epochs, max_bound = 5, 2.5
    params = {"variant": "enforced", "max_bound": max_bound, "rho_admm": 0.1}
    method, model = _admm_method(params, epochs=epochs)
    x, y = _rings()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    recorded = []
    for epoch in range(epochs):
        for batch, idx in enumerate(torch.arange(len(x)).split(30)):
            out = method.loss(model, x[idx], y[idx], (epoch + batch / 10) / epochs)
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
        assert method._wbar is not None, f"no W̄ in epoch {epoch + 1}"
        recorded.append(out.stats["wbar_bound"])
        assert recorded[-1] <= max_bound
        assert lipsdp(method._wbar).bound <= max_bound * (1 + 1e-6)
    assert method._stats["admm_iterations"] == epochs  # no early stop by default
    assert max(method._bounds) > max_bound  # W alone breaks the bound: W̄ is what keeps it
    wbar_model = copy.deepcopy(model)
    method.finish(model)
    mlp_structure(wbar_model).load_weights(method._wbar)
    with torch.no_grad():  # the delivered model is W̄ with its last layer (and bias) scaled
        assert torch.equal(model(x).argmax(1), wbar_model(x).argmax(1))
    assert lipsdp(mlp_weights(model)).bound <= max_bound


@pytest.mark.parametrize(
    ("seed", "dims", "ratio"), [(6, (2, 10, 10, 3), 2.0), (3, (2, 10, 10, 3), 6.0), (9, (12, 6, 5, 3), 3.0)]
)
def test_scaled_multipliers_put_the_bound_scaled_weights_in_the_projection_set(seed, dims, ratio) -> None:
    """Enforced W̄-step, T from LipSDP of W (bound L > L̄) times (L̄/L)² (``_step_multipliers``): W with
    its last layer scaled by s = L̄/L lies in the set W̄ is projected onto, so the W̄-step's answer is no
    farther from W than that point and has a verified bound ≈ L̄ for that T; with T unscaled the step moves W
    farther (the rings' collapse of the first layer)."""
    weights = [3 * w for w in random_weights(seed, dims)]
    result = lipsdp(weights)
    max_bound = result.bound / ratio
    method, _ = _admm_method({"variant": "enforced", "max_bound": max_bound}, epochs=1)
    method._multipliers, method._bounds = result.multipliers, [result.bound]
    ts = method._step_multipliers()
    s = max_bound / result.bound
    assert all(np.allclose(t, s * s * u) for t, u in zip(ts, result.multipliers))
    scaled = [*weights[:-1], s * weights[-1]]
    bound, _ = fixed_multiplier_bound(scaled, ts)
    assert bound <= max_bound * (1 + 1e-6)  # the bound-scaled W is in the set (homogeneity)
    step = weight_step(weights, ts, rho_admm=1.0, max_bound=max_bound)
    moved = _distance(step.weights, weights)
    assert moved <= (1 - s) * np.linalg.norm(weights[-1]) * (1 + 1e-3)
    # the solver's W̄ meets the LMI only approximately (the method scales it onto L̄: _verified_wbar)
    assert fixed_multiplier_bound(step.weights, ts)[0] <= max_bound * (1 + 1e-2)
    unscaled = weight_step(weights, result.multipliers, rho_admm=1.0, max_bound=max_bound)
    assert _distance(unscaled.weights, weights) > moved


@pytest.mark.parametrize(
    ("params", "bound", "factor"),
    [
        ({"variant": "enforced", "max_bound": 4.0}, 8.0, 0.25),
        ({"variant": "enforced", "max_bound": 4.0}, 3.0, 1.0),  # W is feasible: T as solved
        ({"variant": "enforced", "max_bound": 4.0, "scale_multipliers": False}, 8.0, 1.0),
        ({"variant": "regularised", "mu": 0.01}, 8.0, 1.0),  # no L̄: T as solved
    ],
)
def test_step_multipliers_are_scaled_only_for_an_active_bound(params, bound, factor) -> None:
    method, _ = _admm_method(params, epochs=1)
    method._multipliers, method._bounds = [np.array([1.0, 2.0]), np.array([3.0])], [bound]
    assert [list(t) for t in method._step_multipliers()] == [[factor, 2 * factor], [3 * factor]]


@pytest.mark.parametrize(
    ("primal", "dual", "expected"),
    [(1.0, 0.01, 0.2), (0.01, 1.0, 0.05), (1.0, 0.5, 0.1), (1.0, 0.0, 0.2), (0.0, 1.0, 0.05)],
)
def test_residual_balancing_doubles_or_halves_rho(primal, dual, expected) -> None:
    """Boyd et al. 2011, Sec. 3.4.1 (μ = 10, τ = 2), within [rho_min, rho_max]."""
    assert _balanced_rho(0.1, primal, dual, 0.01, 100.0) == pytest.approx(expected)
    assert _balanced_rho(0.1, primal, dual, 0.1, 0.1) == 0.1


def test_admm_stopping_rule_is_optional() -> None:
    """With ``tolerance`` set the ADMM stops once the bound of W changes by less; by default it runs
    every epoch (the paper's 0.5 froze W̄ after two iterations on the rings)."""
    for tolerance, iterations in ((None, 4), (100.0, 2)):
        method, model = _admm_method({"mu": 0.01, "tolerance": tolerance}, epochs=4)
        _train(method, model, torch.optim.Adam(model.parameters(), lr=0.03), range(4), 4, batches=5)
        assert method._stats["admm_iterations"] == iterations
        assert method._converged == (tolerance is not None)


@pytest.mark.parametrize(
    "params",
    [
        {"variant": "regularised", "mu": 0.01, "tolerance": 1e-3},
        {"variant": "enforced", "max_bound": 2.0, "rho_admm": 0.05, "rho_balance": True},  # ρ_a moves
    ],
)
def test_admm_state_survives_a_checkpoint(params: dict) -> None:
    import io

    method, model = _admm_method(params, epochs=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    _train(method, model, optimiser, range(2), 4, batches=5)
    buffer = io.BytesIO()
    torch.save(
        {"method": method.state_dict(), "model": model.state_dict(), "optimiser": optimiser.state_dict()},
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, model2 = _admm_method(params, epochs=4)
    model2.load_state_dict(saved["model"])
    optimiser2 = torch.optim.Adam(model2.parameters(), lr=0.03)
    optimiser2.load_state_dict(saved["optimiser"])
    resumed.load_state_dict(saved["method"])
    _train(method, model, optimiser, range(2, 4), 4, batches=5)
    _train(resumed, model2, optimiser2, range(2, 4), 4, batches=5)
    # one per epoch, from the initial weights on, and the enforced variant's final W̄-step
    assert method._stats["admm_iterations"] == 4 + (params["variant"] == "enforced")
    final, final2 = model.state_dict(), model2.state_dict()
    assert all(torch.allclose(final[key], final2[key], atol=1e-6) for key in final)
    assert resumed._bounds == pytest.approx(method._bounds)
    assert resumed._rho() == pytest.approx(method._rho())


def test_admm_rejects_bad_configurations() -> None:
    from certbench.config import ConfigError
    from certbench.data.specs import DATASETS
    from certbench.method import RunContext

    for params in (
        {"mu": -1.0},
        {"variant": "enforced", "max_bound": 0.0},
        {"variant": "enforced"},
        {"max_bound": 2.0},
    ):
        with pytest.raises(ConfigError, match="params"):
            _admm_method(params, epochs=1)
    method, _ = _admm_method({}, epochs=1)
    method.context = RunContext(DATASETS.get("digits"), 1, (0.1,), (0.5,), torch.device("cpu"))
    with pytest.raises(ConfigError, match="arch"):
        method.build_model("cnn-small", {})


# --- the trade-off figure of config/paper/pauli.yaml ------------------------------------------


def test_lipsdp_tradeoff_figure_from_a_tiny_summary(tmp_path) -> None:  # noqa: ANN001
    """Clean and certified accuracy against the verified LipSDP bound, per data set, every experiment
    named beside its point; a summary with no LipSDP bound gives the placeholder, never an error."""
    import pandas as pd

    from certbench.figures import draw_lipsdp_tradeoff, lipsdp_tradeoff_figure

    rows = []
    runs = [("standard", "standard", 239.0, 1.0), ("admm-enforced", "lipsdp-admm", 8.0, 0.75)]
    runs += [(f"admm-regularised-mu{mu}", "lipsdp-admm", 8 / mu, 0.9) for mu in (1, 10)]
    for dataset in ("rings2d", "mnist"):
        for name, method, bound, clean in runs:
            run = {
                "dataset": dataset,
                "name": name,
                "method": method,
                "arch": "mlp",
                "seed": 0,
                "status": "ok",
            }
            rows.append({**run, "metric": "clean_accuracy", "kind": "clean", "value": clean})
            rows.append(
                {
                    **run,
                    "metric": "lipschitz_bound",
                    "kind": "certificate",
                    "evaluation": "lipsdp-l2",
                    "value": bound,
                }
            )
            for eps in (0.02, 0.05):
                rows.append(
                    {
                        **run,
                        "metric": "certified_accuracy",
                        "kind": "certificate",
                        "evaluation": "lipsdp-l2",
                        "norm": "l2",
                        "eps": eps,
                        "value": clean / (1 + bound * eps),
                    }
                )
    summary = pd.DataFrame(rows)
    figure = draw_lipsdp_tradeoff(summary)
    names = {"standard training", "admm-enforced", "admm-regularised-mu1", "admm-regularised-mu10"}
    for axis in figure.axes[:4]:  # every point is named once on each of the four panels
        assert sorted(text.get_text() for text in axis.texts) == sorted(names)
    lipsdp_tradeoff_figure(summary, tmp_path / "figures")
    assert (tmp_path / "figures" / "lipsdp_tradeoff.png").stat().st_size > 5000
    assert (tmp_path / "figures" / "lipsdp_tradeoff.pdf").read_bytes().startswith(b"%PDF")
    no_bound = summary[summary["metric"] != "lipschitz_bound"]
    lipsdp_tradeoff_figure(no_bound, tmp_path / "empty")
    assert (tmp_path / "empty" / "lipsdp_tradeoff.png").exists()
