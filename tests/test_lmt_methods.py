"""The LMT family (lmt, lipschitz-reg, spectral, parseval, weight-decay) and the ``lipschitz-l2``
certificate.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certbench.bounds.lipschitz import margin_slopes
from certbench.certificates import CERTIFICATES, margins
from certbench.certificates.lipschitz import exact_bound
from certbench.config import ConfigError
from certbench.data.loaders import load_split
from certbench.data.specs import DATASETS
from certbench.method import Method, RunContext, get_method
from certbench.nn import Normalize, Residual
from methods.parseval import retract

SPEC = DATASETS.get("digits")
FAMILY = ["lmt", "lipschitz-reg", "spectral", "parseval", "weight-decay"]


def make(name: str, epochs: int = 4, **params: Any) -> Method:
    cls = get_method(name)
    filled = {key: schema["default"] for key, schema in cls.params_schema.items()} | params
    method = cls(filled, RunContext(SPEC, epochs, SPEC.eps_linf, SPEC.eps_l2, torch.device("cpu")))
    method.check()
    return method


def fit(name: str, epochs: int, arch: str = "cnn-small", **params: Any) -> nn.Module:
    """Adam 1e-3, batch 64 on the digits training split (inputs /16), the method's own loss and hooks."""
    torch.manual_seed(0)
    method = make(name, epochs, **params)
    model = method.build_model(arch, {})
    method.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = DIGITS[0].tensors
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            out = method.loss(model, x[batch], y[batch], (epoch + start / len(x)) / epochs)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            method.after_step(model)
    return model.eval()


DIGITS = load_split("digits")[1]


@pytest.fixture(scope="module")
def trained() -> dict[str, nn.Module]:
    return {"standard": fit("standard", 4), "lmt++": fit("lmt", 4, c=0.1)}


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    return CERTIFICATES.get("lipschitz-l2")().certify(model, x, y, list(SPEC.eps_l2))


def test_lmt_plus_plus_certifies_larger_radii_than_cross_entropy(trained: dict[str, nn.Module]) -> None:
    x, y = DIGITS[1].tensors
    medians = {name: float(np.median(certify(model, x, y).radius)) for name, model in trained.items()}
    assert medians["lmt++"] > 1.3 * medians["standard"] > 0, medians


def pgd_l2_min_margin(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int = 40, restarts: int = 3
) -> torch.Tensor:
    """Smallest margin PGD-ℓ2 (per-sample ε, step ε/4, random starts, no box) finds in the balls."""
    radius = eps.view(-1, 1, 1, 1)
    best = torch.full((len(x),), math.inf)
    for _ in range(restarts):
        delta = torch.randn_like(x)
        delta *= radius * torch.rand(len(x), 1, 1, 1) / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(margins(model(x + delta), y).sum(), delta)
            with torch.no_grad():
                delta = delta - radius / 4 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(
                    -1, 1, 1, 1
                )
                delta *= (radius / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(
                    max=1
                )
        with torch.no_grad():
            best = torch.minimum(best, margins(model(x + delta), y))
    return best


def test_pgd_never_flips_a_point_inside_its_certified_radius(trained: dict[str, nn.Module]) -> None:
    x, y = DIGITS[1].tensors
    for name, model in trained.items():
        radius = torch.as_tensor(certify(model, x, y).radius, dtype=torch.float32)
        certified = radius > 0
        assert certified.sum() > len(x) / 2, name
        xs, ys, rs = x[certified], y[certified], radius[certified]
        assert (pgd_l2_min_margin(model, xs, ys, 0.999 * rs) > 0).all(), name
        # the same attack is real: at 10× the radius it flips many of these points
        assert (pgd_l2_min_margin(model, xs, ys, 10 * rs) < 0).float().mean() > 0.3, name


def test_certificate_records_the_tighter_form(trained: dict[str, nn.Module]) -> None:
    model = trained["lmt++"]
    x, y = DIGITS[1].tensors[0][:64], DIGITS[1].tensors[1][:64]
    result = certify(model, x, y)
    assert {"lipschitz_bound", "lipschitz_bound_sub"} <= set(result.extra)
    estimate, _ = exact_bound(model, SPEC.shape)
    with torch.no_grad():  # the exact logits, to float64 accuracy
        logits = copy.deepcopy(model).double()(x.double())
    weight = model[-1].weight.detach().double()
    ratios = []
    for i in range(len(x)):
        label = int(y[i])
        if logits[i].argmax() != label:
            assert result.radius[i] == 0
            continue
        plain = (logits[i, label] - logits[i].index_fill(0, torch.tensor([label]), -math.inf).max()) / (
            math.sqrt(2) * result.extra["lipschitz_bound"]
        )
        tight = min(
            (logits[i, label] - logits[i, j])
            / (result.extra["lipschitz_bound_sub"] * (weight[label] - weight[j]).norm())
            for j in range(10)
            if j != label
        )
        assert float(tight) >= float(plain) * (1 - 1e-6)
        assert result.radius[i] <= float(tight)  # never above the exact-arithmetic radius
        ratios.append(result.radius[i] / float(tight))
    # the proven rounding allowance costs < 1 % of the median radius
    assert np.median(ratios) > 0.99
    assert float(estimate.total) == result.extra["lipschitz_bound"]


def test_bound_cache_follows_the_weights() -> None:
    torch.manual_seed(0)
    model = make("lmt").build_model("mlp", {"widths": [16]})
    first, _ = exact_bound(model, SPEC.shape)
    assert exact_bound(model, SPEC.shape)[0] is first
    with torch.no_grad():
        model[-1].weight.mul_(2)
    assert float(exact_bound(model, SPEC.shape)[0].total) == pytest.approx(2 * float(first.total))


def test_radius_forms_on_a_hand_example() -> None:
    """Two classes, L_sub = 1, rows at distance 2: slope √2·L = √2 (global) vs L_sub·2 = 2 (last layer);
    with L_sub = 0.5 the last-layer slope 1 is the smaller one."""
    from certbench.bounds.lipschitz import LipschitzEstimate

    weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    one = torch.tensor(1.0, dtype=torch.float64)
    estimate = LipschitzEstimate(one, one, weight)
    assert float(margin_slopes(torch.tensor([0]), estimate, 2)[0, 1]) == pytest.approx(math.sqrt(2))
    estimate = LipschitzEstimate(one, one / 2, weight)
    assert float(margin_slopes(torch.tensor([0]), estimate, 2)[0, 1]) == pytest.approx(1.0)


# ---- LMT loss ------------------------------------------------------------------------------


def test_lmt_margin_forms_and_clip() -> None:
    torch.manual_seed(0)
    x, y = DIGITS[0].tensors[0][:8], DIGITS[0].tensors[1][:8]
    for form in ("global", "last-layer"):
        method = make("lmt", c=0.3, margin=form)
        model = method.build_model("mlp", {"widths": [16]})
        method.prepare(model)
        estimate = method.estimate(model)
        added = method.additions(estimate, y, 10, 0.3)
        assert (added.gather(1, y[:, None]) == 0).all()
        weight = model[-1].weight
        for i in range(8):
            for j in range(10):
                if j == int(y[i]):
                    continue
                expected = (
                    math.sqrt(2) * 0.3 * estimate.total
                    if form == "global"
                    else 0.3 * estimate.sub * (weight[j] - weight[y[i]]).norm()
                )
                assert added[i, j].item() == pytest.approx(expected.item(), rel=1e-5)
    # clip: a misclassified sample gets factor 0, i.e. plain cross-entropy
    method = make("lmt", c=0.3, clip=True)
    model = method.build_model("mlp", {"widths": [16]})
    method.prepare(model)
    with torch.no_grad():
        wrong = model(x).argmin(1)
    clipped = method.loss(model, x, wrong, 0.5).loss
    assert float(clipped) == pytest.approx(float(F.cross_entropy(model(x), wrong)), rel=1e-6)


def test_lmt_ramp() -> None:
    method = make("lmt", epochs=10, c=0.01, c_start=1e-5, ramp_epochs=5)
    assert method.c_at(0.0) == pytest.approx(1e-5)
    assert method.c_at(0.25) == pytest.approx(1e-5 + (0.01 - 1e-5) / 2)
    assert method.c_at(0.5) == method.c_at(0.9) == pytest.approx(0.01)
    assert make("lmt", c=0.2).c_at(0.0) == 0.2


@pytest.mark.parametrize(
    "name, params, key",
    [
        ("lmt", {"c": -0.1}, "params.c"),
        ("lmt", {"c_start": -1.0, "ramp_epochs": 1}, "params.c_start"),
        ("lmt", {"ramp_epochs": 9}, "params.ramp_epochs"),
        ("lipschitz-reg", {"lambda": -1.0}, "params.lambda"),
        ("spectral", {"lambda": -0.01}, "params.lambda"),
        ("parseval", {"beta": 0.0}, "params.beta"),
        ("parseval", {"beta": 1.0}, "params.beta"),
        ("parseval", {"beta": -0.5}, "params.beta"),
        ("parseval", {"row_fraction": 0.0}, "params.row_fraction"),
        ("parseval", {"row_fraction": 1.5}, "params.row_fraction"),
        ("weight-decay", {"weight_decay": -1e-4}, "params.weight_decay"),
    ],
)
def test_bad_parameters_raise_config_errors(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make(name, **params)


@pytest.mark.parametrize("name", ["lmt", "lipschitz-reg", "spectral", "parseval"])
def test_unsupported_architecture_is_refused_before_training(name: str) -> None:
    model = nn.Sequential(
        Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(64, 16), nn.GELU(), nn.Linear(16, 10)
    )
    with pytest.raises(ConfigError, match="layer type GELU"):
        make(name).prepare(model)


def test_last_layer_margin_needs_a_final_linear_layer() -> None:
    model = nn.Sequential(Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(64, 10), nn.ReLU())
    with pytest.raises(ConfigError, match="params.margin"):
        make("lmt").prepare(model)
    make("lmt", margin="global").prepare(model)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("arch", ["mlp", "cnn-small", "cnn-large", "wrn-16-4"])
def test_every_method_steps_on_every_architecture(name: str, arch: str) -> None:
    torch.manual_seed(0)
    method = make(name)
    model = method.build_model(arch, {})
    method.prepare(model)
    x, y = DIGITS[0].tensors[0][:4], DIGITS[0].tensors[1][:4]
    out = method.loss(model, x, y, 0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    method.after_step(model)
    assert CERTIFICATES.get("lipschitz-l2")().applies(model)


@pytest.mark.parametrize("name", ["lmt", "lipschitz-reg", "spectral"])
def test_power_iteration_state_survives_a_resume(name: str) -> None:
    """A fresh method loaded with state_dict() continues with exactly the same losses."""
    torch.manual_seed(0)
    x, y = DIGITS[0].tensors[0][:16], DIGITS[0].tensors[1][:16]
    method = make(name)
    model = method.build_model("cnn-small", {})
    method.prepare(model)
    for _ in range(3):
        method.loss(model, x, y, 0.5)
    state = method.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in next(iter(state.values())).values())
    resumed = make(name)
    resumed.load_state_dict(state)
    resumed.prepare(model)
    assert float(resumed.loss(model, x, y, 0.5).loss) == float(method.loss(model, x, y, 0.5).loss)


def test_spectral_penalty_converges_to_the_sum_of_squared_norms() -> None:
    torch.manual_seed(0)
    method = make("spectral")
    model = method.build_model("cnn-small", {})
    for _ in range(200):
        penalty = method.penalty(model)
    exact = sum(
        float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)) ** 2
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    assert float(penalty) == pytest.approx(exact, rel=1e-3)


# ---- Parseval ------------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_parseval_retraction_moves_singular_values_towards_one(rows: int, cols: int, seed: int) -> None:
    torch.manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64))
    sigma = torch.rand(min(rows, cols), dtype=torch.float64) * 1.6
    weight = u[:, : len(sigma)] @ torch.diag(sigma) @ v[:, : len(sigma)].T
    before = torch.linalg.svdvals(weight)
    retract(weight, 0.1)
    after = torch.linalg.svdvals(weight)
    assert ((after - 1).abs() <= (before - 1).abs() + 1e-12).all()
    assert torch.allclose(after, before + 0.1 * before * (1 - before**2), atol=1e-10)


def test_parseval_row_sampling_retracts_a_subset_of_rows() -> None:
    torch.manual_seed(0)
    weight = torch.randn(10, 30, dtype=torch.float64)
    before = weight.clone()
    retract(weight, 0.1, row_fraction=0.3)
    changed = (weight != before).any(dim=1)
    assert int(changed.sum()) == 3
    rows = before[changed]
    assert torch.allclose(weight[changed], 1.1 * rows - 0.1 * rows @ rows.T @ rows)


def test_parseval_retracts_all_but_the_last_layer_and_uses_convex_residuals() -> None:
    torch.manual_seed(0)
    method = make("parseval", beta=0.2)
    model = method.build_model("wrn-16-4", {})
    residuals = [m for m in model.modules() if isinstance(m, Residual)]
    assert residuals and all(m.coefficients == (0.5, 0.5) for m in residuals)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    deviation = [float((torch.linalg.svdvals(c.weight.detach().flatten(1)) - 1).abs().max()) for c in convs]
    last = model[-1].weight.detach().clone()
    for _ in range(20):
        method.after_step(model)
    after = [float((torch.linalg.svdvals(c.weight.detach().flatten(1)) - 1).abs().max()) for c in convs]
    assert all(a < b for a, b in zip(after, deviation))
    assert torch.equal(model[-1].weight, last)
