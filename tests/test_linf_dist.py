"""ℓ∞-dist nets: the layer against the naive formula (both backends), large-p float32, exact
interval bounds, the network's ℓ∞ Lipschitz constant (Normalize included), the certificates
against PGD, the methods' schedules and config errors, and short real training runs on digits."""

from __future__ import annotations

import ctypes
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linf_pgd import pgd_flips
from torch import nn

from certbench import config as cfg
from certbench import models
from certbench.bounds.linf_dist import interval_bounds, lipschitz_linf, split_trunk
from certbench.catalogue import params_schema
from certbench.certificates import CERTIFICATES, margins
from certbench.config import ConfigError
from certbench.data.loaders import load_split
from certbench.data.specs import DATASETS
from certbench.method import RunContext, get_method
from certbench.nn import Normalize
from certbench.nn import linf_dist as ld
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate, lp_distance, lp_distance_bounds, set_p
from certbench.train import make_optimizer

INF = math.inf
DIGITS = DATASETS.get("digits")


def naive(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    d = (x[:, None, :] - w[None]).abs()
    return d.amax(-1) if math.isinf(p) else d.pow(p).sum(-1).pow(1 / p)


def naive_scaled(x: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """``naive`` with each difference divided by its largest entry first (an identity): in float64
    |d|^p still underflows at p = 100 once every |d_i| < 1e-3, which ``naive`` turns into 0 and ∞."""
    d = (x[:, None, :] - w[None]).abs()
    m = d.amax(-1)
    return m if math.isinf(p) else m * (d / m[..., None]).pow(p).sum(-1).pow(1 / p)


@pytest.fixture(params=["kernel", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a float32 test once on the compiled kernel (if it builds here) and once on PyTorch."""
    if request.param == "kernel" and not ld.kernel_available():
        pytest.skip("no C++ compiler: the compiled kernel is unavailable")
    if request.param == "torch":
        monkeypatch.setattr(ld, "use_kernel", lambda *tensors: False)
    return request.param


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))


# --- the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 8.0, 100.0, INF])
def test_forward_and_gradients_match_naive_formula_in_float64(p: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 37, dtype=torch.float64, requires_grad=True)
    g = torch.randn(9, 13, dtype=torch.float64)
    y = lp_distance(x, w, p)
    reference = naive(x, w, p)
    assert torch.allclose(y, reference, rtol=1e-12, atol=0)
    for ours, theirs in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(reference, (x, w), g)):
        assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def assert_float32_matches_float64(
    b: int, n_in: int, n_out: int, p: float, value_tolerance: float, gradient_tolerance: float
) -> None:
    """The layer in float32 against the naive formula in float64: values and both gradients."""
    x, w = torch.randn(b, n_in, dtype=torch.float64), torch.randn(n_out, n_in, dtype=torch.float64)
    g = torch.randn(b, n_out, dtype=torch.float64)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, reference = lp_distance(x32, w32, p), naive_scaled(x64, w64, p)
    assert relative_error(y, reference) < value_tolerance
    for ours, theirs in zip(
        torch.autograd.grad(y, (x32, w32), g.float()), torch.autograd.grad(reference, (x64, w64), g)
    ):
        assert relative_error(ours, theirs) < gradient_tolerance


@settings(max_examples=25)
@given(
    b=st.integers(1, 9),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 20),
    p=st.sampled_from([1.0, 2.0, 3.5, 8.0, 8.7, 100.0, INF]),
    seed=st.integers(0, 2**16),
)
def test_float32_kernel_matches_naive_formula(b: int, n_in: int, n_out: int, p: float, seed: int) -> None:
    """Any shape (tails shorter than a vector, single rows) through the default float32 path."""
    torch.manual_seed(seed)
    assert_float32_matches_float64(b, n_in, n_out, p, value_tolerance=1e-5, gradient_tolerance=1e-3)


@pytest.mark.parametrize("p", [1.0, 8.0, 8.5, INF])
def test_both_float32_backends_match_float64(backend: str, p: float) -> None:
    torch.manual_seed(1)
    assert_float32_matches_float64(70, 100, 33, p, value_tolerance=1e-6, gradient_tolerance=1e-4)


def test_p_infinity_gradient_is_one_entry_per_pair(backend: str) -> None:
    torch.manual_seed(2)
    x, w = torch.randn(1, 50, requires_grad=True), torch.randn(6, 50, requires_grad=True)
    y = lp_distance(x, w, INF)
    (grad_w,) = torch.autograd.grad(y.sum(), w)
    assert (grad_w != 0).sum(1).tolist() == [1] * 6
    assert torch.equal(grad_w.abs().sum(1), torch.ones(6))


def test_p_1000_in_float32_is_finite_and_correct(backend: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(16, 300, dtype=torch.float64) * 50
    w = torch.randn(24, 300, dtype=torch.float64) * 50
    assert not torch.isfinite(naive(x.float(), w.float(), 1000.0)).all()  # the naive form overflows
    d = (x[:, None] - w[None]).abs()
    m = d.amax(-1, keepdim=True)
    reference = m.squeeze(-1) * (d / m).pow(1000.0).sum(-1).pow(1e-3)  # scaled form, float64
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    y = lp_distance(x32, w32, 1000.0)
    assert torch.isfinite(y).all() and relative_error(y, reference) < 1e-6
    assert (y.double() >= m.squeeze(-1) * (1 - 1e-6)).all()  # ‖d‖_p ≥ ‖d‖_∞
    grads = torch.autograd.grad(y.sum(), (x32, w32))
    assert all(torch.isfinite(g).all() for g in grads)


def test_kernel_self_check_rejects_a_wrong_kernel() -> None:
    class Zeros:  # writes zeros instead of distances
        def linf_dist_forward(self, x, w, b, n_out, n_in, p, p_is_inf, y, idx, threads):  # noqa: ANN001
            ctypes.memset(y, 0, 4 * b * n_out)
            if idx:
                ctypes.memset(idx, 0, 8 * b * n_out)

    assert ld._self_check(Zeros()) == "forward at p=inf"
    if ld.kernel_available():
        assert ld._self_check(ld._kernel()) == ""


def test_p_is_validated_and_saved_with_the_state_dict() -> None:
    layer = LinfDist(4, 6, p=8.0)
    for bad in (0.5, float("nan"), -INF):
        with pytest.raises(ValueError):
            layer.p = bad
    layer.p = INF
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    restored = LinfDist(4, 6, p=3.0)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.p == INF and torch.equal(restored.weight, layer.weight)


def test_identity_like_initialisation() -> None:
    torch.manual_seed(0)
    wide = LinfDist(3, 7).weight
    rows = torch.arange(7)
    assert torch.equal(wide[rows, rows % 3], torch.full((7,), -10.0))
    narrow = LinfDist(7, 3).weight
    assert (narrow > -6).all()  # N(0, 1) only


def test_mean_shift_uses_batch_mean_in_training_and_running_mean_in_eval() -> None:
    shift = MeanShift(3)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]])
    assert torch.allclose(shift(x), x - x.mean(0))
    assert torch.allclose(shift.running_mean, 0.1 * x.mean(0))
    shift.eval()
    assert torch.allclose(shift(x), x - 0.1 * x.mean(0))
    with pytest.raises(RuntimeError):
        shift.train().interval(x, x)


# --- interval bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 3.0, 8.0, INF])
def test_layer_interval_bounds_are_exact(p: float) -> None:
    """Each bound is attained at a point of the box, and no sampled point leaves them."""
    torch.manual_seed(4)
    w = torch.randn(5, 12, dtype=torch.float64)
    centre, radius = torch.randn(3, 12, dtype=torch.float64), torch.rand(3, 12, dtype=torch.float64)
    lower, upper = centre - radius, centre + radius
    lo, hi = lp_distance_bounds(lower, upper, w, p)
    samples = lower + (upper - lower) * torch.rand(400, 3, 12, dtype=torch.float64)
    values = torch.stack([naive(s, w, p) for s in samples])
    assert (values >= lo - 1e-12).all() and (values <= hi + 1e-12).all()
    for j in range(5):  # the maximiser is a corner, the minimiser the projection of w_j
        far = torch.where((lower - w[j]).abs() >= (upper - w[j]).abs(), lower, upper)
        near = torch.minimum(torch.maximum(w[j].expand_as(lower), lower), upper)
        assert torch.allclose(naive(far, w[j : j + 1], p)[:, 0], hi[:, j])
        assert torch.allclose(naive(near, w[j : j + 1], p)[:, 0], lo[:, j])


def test_network_interval_bounds_contain_sampled_outputs() -> None:
    torch.manual_seed(5)
    model = models.build("linf-dist-mlp+head", DIGITS, depth=2, width=24, hidden=16).double()
    set_p(model, 6.0)
    model(torch.rand(64, *DIGITS.shape, dtype=torch.float64))  # running means away from 0
    model.eval()
    x = torch.rand(4, *DIGITS.shape, dtype=torch.float64)
    lower, upper = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    lo, hi = interval_bounds(model, lower, upper)
    samples = lower + (upper - lower) * torch.rand(300, *x.shape, dtype=torch.float64)
    with torch.no_grad():
        outputs = model(samples.flatten(0, 1)).view(300, 4, -1)
    assert (outputs >= lo - 1e-9).all() and (outputs <= hi + 1e-9).all()
    assert (hi - lo).max() < 10 * (outputs.amax(0) - outputs.amin(0)).max()  # not vacuous


# --- Lipschitz constant --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [INF, 8.0])
def test_network_is_lipschitz_in_linf_with_normalisation(p: float) -> None:
    """‖f(x+δ) − f(x)‖∞ ≤ L‖δ‖∞ with L = n^{1/p} per layer / min(std); the std factor is needed."""
    torch.manual_seed(6)
    spec = DATASETS.get("mnist")  # std 0.3081: L = 3.25 at p = ∞
    model = models.build("linf-dist-mlp", spec, depth=3, width=48).double()
    set_p(model, p)
    model(torch.rand(32, *spec.shape, dtype=torch.float64))
    model.eval()
    bound = lipschitz_linf(model)
    assert bound == pytest.approx(1 / 0.3081 * (784 * 48 * 48) ** (1 / p))
    x = torch.rand(256, *spec.shape, dtype=torch.float64)
    delta = (torch.rand_like(x) * 2 - 1) * 0.02 * torch.rand(256, 1, 1, 1, dtype=torch.float64)
    delta[:128] = delta[:128].sign() * delta[:128].abs().amax((1, 2, 3), keepdim=True)  # corners
    with torch.no_grad():
        change = (model(x + delta) - model(x)).abs().amax(1)
    ratio = change / delta.abs().amax((1, 2, 3))
    assert (ratio <= bound * (1 + 1e-9)).all()
    if math.isinf(p):
        assert ratio.max() > 1.0  # above the bound that forgets Normalize's 1/std


# --- the methods ------------------------------------------------------------------------------


def make_method(name: str, params: dict, epochs: int = 20, eps: tuple[float, ...] = (0.1,)):
    context = RunContext(DIGITS, epochs, eps, (0.5,), torch.device("cpu"))
    method = get_method(name)(cfg.validate_against(params_schema(name), params, "params."), context)
    method.check()
    return method


def test_p_and_eps_schedule() -> None:
    method = make_method("linf-dist", {"loss": "v2", "epochs": [0, 4, 5, 15]}, epochs=20)
    schedule = method.schedule
    assert [schedule.eps_ratio(e) for e in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    assert schedule.p(0) == schedule.p(5) == 8.0
    assert schedule.p(10) == pytest.approx(8.0 * (1000 / 8) ** 0.5)
    assert schedule.p(14.99) < 1000 and schedule.p(15) == INF and schedule.p(20) == INF
    model = method.build_model("linf-dist-mlp", {"depth": 2, "width": 16})
    method.prepare(model)
    x, y = torch.rand(8, *DIGITS.shape), torch.arange(8)
    early, late = method.loss(model, x, y, 0.1), method.loss(model, x, y, 0.74)
    assert early.stats["lam"] == pytest.approx(0.05) and late.stats["lam"] < 0.01
    assert all(m.p == pytest.approx(8 * 125 ** (9.8 / 10)) for m in model if isinstance(m, LinfDist))
    assert method.loss(model, x, y, 0.9).stats["inv_p"] == 0.0


def test_default_epochs_follow_the_paper_proportions() -> None:
    assert make_method("linf-dist", {"loss": "v1"}, epochs=400).schedule.e3 == 350
    v2 = make_method("linf-dist", {"loss": "v2"}, epochs=450).schedule
    assert (v2.e1, v2.e2, v2.e3) == (0, pytest.approx(25), pytest.approx(400))
    assert make_method("linf-dist", {}).eps_train == pytest.approx(0.15)
    assert make_method("linf-dist-head", {}).eps_train == pytest.approx(0.11)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("linf-dist", {"p_start": 0.5}, "params.p_start"),
        ("linf-dist", {"p_start": 100, "p_end": 8}, "params.p_start"),
        ("linf-dist", {"eps_train": 0.05}, "params.eps_train"),
        ("linf-dist", {"loss": "v1", "eps_train": 0.08}, "params.eps_train"),
        ("linf-dist", {"epochs": [0, 5, 3, 10]}, "params.epochs"),
        ("linf-dist", {"epochs": [0, 0, 5, 30]}, "params.epochs"),
        ("linf-dist-head", {"epochs": [2, 1, 3, 4]}, "params.epochs"),
        ("linf-dist", {"loss": "v3"}, "params.loss"),
    ],
)
def test_bad_parameters_are_config_errors(name: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_method(name, params)


def test_head_weight_decay_reaches_only_the_head() -> None:
    method = make_method("linf-dist-head", {"head_weight_decay": 0.5})
    model = method.build_model("linf-dist-mlp+head", {"depth": 2, "width": 8, "hidden": 4})
    trunk, head = split_trunk(model)
    optimizer = make_optimizer(
        method.parameter_groups(model),
        {"optimizer": "adamw", "lr": 0.1, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-10},
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only the decoupled decay moves a parameter, by the factor 1 − lr·wd
    head_names = {
        f"{len(trunk)}.weight",
        f"{len(trunk)}.bias",
        f"{len(trunk) + 2}.weight",
        f"{len(trunk) + 2}.bias",
    }
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name] * (0.95 if name in head_names else 1.0)), name
    assert sum(1 for _ in head.parameters()) == len(head_names)
    assert make_method("linf-dist-head", {}).parameter_groups(model)[0]["params"] == list(model.parameters())


def test_methods_refuse_the_other_architecture() -> None:
    plain = make_method("linf-dist", {})
    with pytest.raises(ConfigError, match="head"):
        plain.prepare(plain.build_model("linf-dist-mlp+head", {"depth": 1, "width": 8, "hidden": 4}))
    head = make_method("linf-dist-head", {})
    with pytest.raises(ConfigError, match="linf-dist-mlp\\+head"):
        head.prepare(head.build_model("linf-dist-mlp", {"depth": 2, "width": 8}))
    with pytest.raises(ConfigError, match="linf-dist-\\*"):
        plain.prepare(plain.build_model("mlp", {"widths": [8]}))


# --- training on digits and the certificates -----------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    _, (train, test) = load_split("digits")
    return (*train.tensors, *test.tensors)


def train_on_digits(
    name: str, arch: str, arch_params: dict, params: dict, digits: tuple[torch.Tensor, ...], epochs: int = 20
) -> nn.Module:
    torch.manual_seed(0)
    method = make_method(name, params, epochs=epochs)
    model = method.build_model(arch, arch_params)
    method.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.9, 0.99), eps=1e-10)
    x_train, y_train = digits[0], digits[1]
    batches = math.ceil(len(x_train) / 128)
    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for batch in range(batches):
            idx = order[batch * 128 : (batch + 1) * 128]
            out = method.loss(model, x_train[idx], y_train[idx], (epoch + batch / batches) / epochs)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    return model.eval()


def test_linf_dist_net_trained_on_digits_is_certified_and_sound(digits, one_thread) -> None:
    model = train_on_digits("linf-dist", "linf-dist-mlp", {"depth": 3, "width": 128}, {"loss": "v1"}, digits)
    x, y = digits[2][:200], digits[3][:200]
    certificate = CERTIFICATES.get("linf-dist")()
    assert certificate.applies(model) and not certificate.applies(models.build("mlp", DIGITS))
    result = certificate.certify(model, x, y, [0.1])
    assert (result.status[0.1] == "certified").mean() > 0.4  # non-trivial at ε = 0.1
    assert result.extra["lipschitz_bound"] == pytest.approx(1 / DIGITS.std[0])
    radius = torch.as_tensor(result.radius, dtype=torch.float32)
    assert not model.training
    ours = radius > 0
    assert not pgd_flips(model, x[ours], y[ours], 0.999 * radius[ours]).any()
    # the attack is strong enough to catch a radius that forgets Normalize's 1/std
    naive_radius = margins(model(x[ours]), y[ours]).detach() / 2
    assert pgd_flips(model, x[ours], y[ours], 0.999 * naive_radius).any()
    # the ℓ2 certificate reports the same radius
    l2 = CERTIFICATES.get("linf-dist-l2")().certify(model, x, y, [0.5])
    assert np.array_equal(l2.radius, result.radius)


def test_head_variant_trained_on_digits_is_certified_and_sound(digits, one_thread) -> None:
    model = train_on_digits(
        "linf-dist-head", "linf-dist-mlp+head", {"depth": 2, "width": 128, "hidden": 64}, {}, digits
    )
    x, y = digits[2][:200], digits[3][:200]
    certificate = CERTIFICATES.get("linf-dist")()
    assert certificate.applies(model)
    result = certificate.certify(model, x, y, [0.05, 0.1])
    assert result.radius is None
    certified = torch.as_tensor(result.status[0.1] == "certified")
    assert certified.float().mean() > 0.4
    assert (result.status[0.05] == "certified").sum() >= certified.sum()
    assert not pgd_flips(model, x[certified], y[certified], torch.full((int(certified.sum()),), 0.1)).any()
    assert pgd_flips(model, x, y, torch.full((len(x),), 0.3)).any()  # the attack has teeth


def test_rounding_allowance_is_tiny_and_certificate_restores_training_mode() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), LinfDist(64, 10, bias=True), Negate())
    model.train()
    x, y = torch.rand(16, *DIGITS.shape), torch.randint(0, 10, (16,))
    result = CERTIFICATES.get("linf-dist")().certify(model, x, y, [0.01])
    assert model.training
    with torch.no_grad():
        margin = margins(model(x), y).double().numpy()
    expected = np.where(margin > 0, margin * 0.25 / 2, 0.0)
    assert np.all(result.radius <= expected) and np.allclose(result.radius, expected, atol=1e-5)
