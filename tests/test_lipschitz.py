"""The layer-wise ℓ2 Lipschitz bounds of :mod:`certbench.bounds.lipschitz` hold and are tight where
they should be.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

from certbench.bounds import lipschitz as lip
from certbench.nn import Normalize, Residual

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@torch.no_grad()
def _operator_matrix(f, shape: tuple[int, ...]) -> torch.Tensor:
    """The explicit matrix of a linear map on inputs of ``shape`` (float64)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return f(basis).reshape(n, -1).T


def _conv_case(draw: st.DrawFn) -> tuple[nn.Conv2d, tuple[int, int]]:
    groups = draw(st.sampled_from([1, 2]))
    conv = nn.Conv2d(
        groups * draw(st.integers(1, 2)),
        groups * draw(st.integers(1, 3)),
        kernel_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        groups=groups,
    ).double()
    extent = [d * (k - 1) + 1 - 2 * p for d, k, p in zip(conv.dilation, conv.kernel_size, conv.padding)]
    hw = (max(extent[0], 1) + draw(st.integers(0, 5)), max(extent[1], 1) + draw(st.integers(0, 5)))
    return conv, hw


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Conv2d, tuple[int, int]]:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return _conv_case(draw)


@given(conv_cases())
@SETTINGS
def test_conv_adjoint_is_the_transpose(case: tuple[nn.Conv2d, tuple[int, int]]) -> None:
    """⟨A x, y⟩ = ⟨x, Aᵀ y⟩ for every stride, padding, dilation and group count (output_padding right)."""
    conv, hw = case
    x = torch.randn(1, conv.in_channels, *hw, dtype=torch.float64)
    ax = lip.conv_apply(conv, x)
    y = torch.randn_like(ax)
    aty = lip.conv_adjoint(conv, y, hw)
    assert aty.shape == x.shape
    assert torch.allclose((ax * y).sum(), (x * aty).sum(), rtol=1e-10, atol=1e-10)


@given(conv_cases())
@SETTINGS
def test_conv_bounds_against_the_explicit_operator(case: tuple[nn.Conv2d, tuple[int, int]]) -> None:
    """Explicit SVD is the exact norm; the circulant and the closed-form bounds lie above it."""
    conv, hw = case
    matrix = _operator_matrix(lambda x: lip.conv_apply(conv, x), (conv.in_channels, *hw))
    exact = float(torch.linalg.matrix_norm(matrix, ord=2))
    assert exact <= lip.conv_explicit_norm(conv, hw) <= exact * (1 + 2e-6)
    assert exact <= lip.conv_circulant_bound(conv, hw)
    assert exact <= lip.conv_closed_form_bound(conv, hw)
    assert exact <= lip.conv_operator_norm(conv, hw)


def test_circulant_bound_is_the_same_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    whole = lip.conv_circulant_bound(conv, (9, 7))
    monkeypatch.setattr(lip, "SPECTRUM_CHUNK", 1)
    assert lip.conv_circulant_bound(conv, (9, 7)) == pytest.approx(whole, rel=1e-12)


def test_closed_form_matches_the_paper_formula() -> None:
    """‖W_mat‖ · √∏⌈min(k, H+2p−k+1)/s⌉ for an undilated convolution (LMT Sec. 4.2)."""
    torch.manual_seed(0)
    for k, s, p, n in [(4, 2, 1, 8), (3, 1, 1, 6), (5, 3, 0, 7), (3, 1, 0, 3)]:
        conv = nn.Conv2d(2, 3, k, s, p).double()
        w_norm = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(3, -1), ord=2))
        per_axis = math.ceil(min(k, n + 2 * p - k + 1) / s)
        assert lip.conv_closed_form_bound(conv, (n, n)) == pytest.approx(w_norm * per_axis, rel=2e-6)


def test_power_iteration_converges_to_the_exact_norm() -> None:
    """Repeated training-mode steps approach the exact norm from below (Linear and strided Conv2d)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    bound = lip.LipschitzBound(model, (2, 7, 7))
    for _ in range(300):
        trained = bound.compute()
    exact = bound.compute(exact=True)
    assert trained.total.item() <= float(exact.total) * (1 + 1e-6)
    assert trained.total.item() == pytest.approx(float(exact.total), rel=1e-3)


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.2), nn.ELU, nn.Softplus]


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 2.0)
    return bn


@st.composite
def random_networks(draw: st.DrawFn, linear_only: bool = False) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A small network of every supported kind: conv (stride/padding/dilation/groups), BN with random
    statistics, activations, max/average/adaptive pools, residual blocks, dropout, then fc layers."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    channels, h, w = draw(st.integers(1, 2)), draw(st.integers(4, 7)), draw(st.integers(4, 7))
    shape = input_shape = (channels, h, w)
    layers: list[nn.Module] = [
        Normalize([0.5] * channels, [draw(st.floats(0.2, 1.0)) for _ in range(channels)])
    ]
    kinds = ["conv", "bn", "avgpool", "residual", "dropout"] + ([] if linear_only else ["act", "maxpool"])
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4)):
        c, hh, ww = shape
        if kind == "conv":
            k, s, p = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
            if min(hh, ww) + 2 * p < k:
                continue
            groups = draw(st.sampled_from([1, c]))
            layer: nn.Module = nn.Conv2d(c, groups * draw(st.integers(1, 2)), k, s, p, groups=groups)
        elif kind == "bn":
            layer = _batchnorm(c)
        elif kind == "act":
            layer = draw(st.sampled_from(ACTIVATIONS))()
        elif kind in ("maxpool", "avgpool"):
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            if min(hh, ww) < k:
                continue
            pad = draw(st.integers(0, k // 2))
            layer = (
                nn.MaxPool2d(k, s, pad, ceil_mode=draw(st.booleans()))
                if kind == "maxpool"
                else draw(
                    st.sampled_from(
                        [
                            nn.AvgPool2d(
                                k,
                                s,
                                pad,
                                count_include_pad=draw(st.booleans()),
                                ceil_mode=draw(st.booleans()),
                            ),
                            nn.AdaptiveAvgPool2d((max(hh // 2, 1), ww)),
                        ]
                    )
                )
            )
        elif kind == "residual":
            body: list[nn.Module] = [nn.Conv2d(c, c, 3, 1, 1)]
            if not linear_only:
                body += [nn.ReLU(), _batchnorm(c)]
            shortcut = nn.Conv2d(c, c, 1) if draw(st.booleans()) else None
            coefficients = (draw(st.floats(-1.5, 1.5)), draw(st.floats(-1.5, 1.5)))
            layer = Residual(nn.Sequential(*body), shortcut, coefficients)
        else:
            layer = nn.Dropout(0.3)
        with torch.no_grad():
            out = nn.Sequential(*layers, layer).eval()(torch.zeros(1, *input_shape))
        shape = tuple(out.shape[1:])
        layers.append(layer)
    hidden = draw(st.integers(2, 6))
    layers += [nn.Flatten(), nn.Linear(math.prod(shape), hidden)]
    if not linear_only:
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    layers.append(nn.Linear(hidden, 3))
    return nn.Sequential(*layers).double().eval(), input_shape


def _affine_norm(model: nn.Module, shape: tuple[int, ...]) -> float:
    """‖A‖₂ of an affine network x ↦ Ax + b, from its (constant) Jacobian, without differencing outputs."""
    jac = jacrev(lambda v: model(v[None])[0])(torch.rand(shape, dtype=torch.float64)).detach()
    return float(torch.linalg.matrix_norm(jac.reshape(-1, math.prod(shape)), ord=2))


def _max_jacobian_norm(model: nn.Module, shape: tuple[int, ...], samples: int = 64) -> float:
    """max over sampled inputs of σ_max(∂f/∂x): a lower bound on the Lipschitz constant."""
    x = torch.cat([torch.rand(samples // 2, *shape), 3 * torch.randn(samples // 2, *shape)]).double()
    jac = vmap(jacrev(lambda v: model(v[None])[0]))(x).reshape(samples, 3, -1)
    return float(torch.linalg.matrix_norm(jac, ord=2).max())


def _max_gradient_norm(model: nn.Module, shape: tuple[int, ...], samples: int = 64) -> float:
    """Largest ‖∇ₓ(z_i − z_j)‖/√2 over sampled inputs and class pairs, another Lipschitz lower bound."""
    x = torch.randn(samples, *shape, dtype=torch.float64, requires_grad=True)
    logits = model(x)
    best = 0.0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        (grad,) = torch.autograd.grad((logits[:, i] - logits[:, j]).sum(), x, retain_graph=True)
        best = max(best, float(grad.flatten(1).norm(dim=1).max()) / math.sqrt(2))
    return best


@given(random_networks())
@SETTINGS
def test_bound_dominates_jacobians_of_random_networks(
    case: tuple[nn.Sequential, tuple[int, int, int]],
) -> None:
    model, shape = case
    bound = lip.LipschitzBound(model, shape).compute(exact=True)
    assert float(bound.total) >= _max_jacobian_norm(model, shape)
    assert float(bound.total) >= _max_gradient_norm(model, shape)
    assert float(bound.total) == pytest.approx(
        float(bound.sub) * lip.linear_spectral_norm(model[-1].weight), rel=1e-9
    )


@given(random_networks(linear_only=True))
@SETTINGS
def test_bound_dominates_the_operator_norm_of_linear_networks(
    case: tuple[nn.Sequential, tuple[int, int, int]],
) -> None:
    """Without nonlinearities the network is affine: compare with the exact norm of its matrix."""
    model, shape = case
    assert float(lip.LipschitzBound(model, shape).compute(exact=True).total) >= _affine_norm(model, shape)


def test_single_layers_are_bounded_tightly() -> None:
    """For one linear layer the composed bound is the exact operator norm (up to SAFETY)."""
    torch.manual_seed(1)
    shape = (2, 6, 6)
    for layer in [nn.Conv2d(2, 3, 3, 2, 1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), _batchnorm(2)]:
        model = nn.Sequential(layer).double().eval()
        exact = _affine_norm(model, shape)
        bound = float(lip.LipschitzBound(model, shape).compute(exact=True).total)
        assert exact <= bound <= exact * (1 + 1e-5), type(layer).__name__


def _peak(shape: tuple[int, ...], where: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    x = torch.full(shape, value, dtype=torch.float64)
    x[where] = 1.0
    return x


def _identity_conv(scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(scale)
    return conv


@pytest.mark.parametrize(
    "layer, shape, x",
    [
        (nn.ReLU(), (4,), torch.ones(4)),
        (nn.LeakyReLU(2.0), (4,), -torch.ones(4)),
        (nn.ELU(2.0), (4,), torch.full((4,), -1e-9)),
        (nn.Sigmoid(), (4,), torch.zeros(4)),
        (nn.Tanh(), (4,), torch.zeros(4)),
        (nn.Softplus(), (4,), torch.full((4,), 40.0)),
        (nn.MaxPool2d(3, 1), (1, 6, 6), _peak((1, 6, 6), (0, 2, 2))),
        (nn.MaxPool2d(3, 2, 1), (1, 6, 6), _peak((1, 6, 6), (0, 3, 3))),
        (nn.AdaptiveMaxPool2d(3), (1, 5, 5), _peak((1, 5, 5), (0, 1, 1))),
        (Residual(_identity_conv(2.0), None, (0.5, 1.5)), (1, 3, 3), torch.rand(1, 3, 3)),
        (Residual(_identity_conv(-2.0), _identity_conv(1.0), (0.5, -1.5)), (1, 3, 3), torch.rand(1, 3, 3)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_each_rule_is_attained(layer: nn.Module, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """Each layer's constant is the Jacobian norm at some input, so no rule over- or under-counts."""
    model = nn.Sequential(layer).double().eval()
    jac = jacrev(lambda v: model(v[None])[0])(x.double()).detach().reshape(-1, x.numel())
    bound = float(lip.LipschitzBound(model, shape).compute(exact=True).total)
    assert bound == pytest.approx(float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-5)


def test_pooling_and_normalisation_constants() -> None:
    """Max pool √overlap, average pool √overlap/k (the paper's values) and Normalize 1/min σ."""

    def bound(layer: nn.Module, shape: tuple[int, ...] = (1, 8, 8)) -> float:
        return float(lip.LipschitzBound(nn.Sequential(layer), shape).compute(exact=True).total)

    assert bound(nn.MaxPool2d(2)) == pytest.approx(1.0)
    assert bound(nn.MaxPool2d(3, 1)) == pytest.approx(3.0)  # each pixel is in up to 3×3 windows
    assert bound(nn.AvgPool2d(3, 1)) == pytest.approx(1.0)  # √9 / 3
    assert bound(nn.AvgPool2d(2)) == pytest.approx(0.5)  # √1 / 2
    assert bound(Normalize([0.5, 0.5], [0.25, 0.5]), (2, 4, 4)) == pytest.approx(4.0)
    assert bound(nn.Sigmoid()) == 0.25


def test_training_bound_is_differentiable_and_vectors_persist() -> None:
    """Gradients reach conv, linear and BN weights; a resumed bound continues the same iteration."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.0], [1.0]),
        nn.Conv2d(1, 4, 3, 2, 1),
        _batchnorm(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    bound = lip.LipschitzBound(model, (1, 8, 8))
    for _ in range(3):
        estimate = bound.compute()
    estimate.total.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in (model[1].weight, model[2].weight, model[5].weight)
    )
    state = bound.state_dict()
    assert set(state) == {"1", "5"}
    resumed = lip.LipschitzBound(model, (1, 8, 8))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.compute().total, bound.compute().total)
    with pytest.raises(KeyError, match="unknown"):
        resumed.load_state_dict({"7": torch.zeros(3)})


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.parametrize(
    "layer, name",
    [
        (nn.GELU(), "GELU"),
        (Custom(), "Custom"),
        (nn.LayerNorm(4), "LayerNorm"),
        (nn.BatchNorm1d(4, track_running_stats=False), "BatchNorm1d"),
        (nn.Conv2d(1, 1, 3, padding_mode="circular"), "Conv2d"),
    ],
)
def test_unsupported_layers_raise_naming_the_type(layer: nn.Module, name: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Sequential(layer), nn.Linear(4, 2))
    with pytest.raises(lip.UnsupportedLayerError, match=f"layer type {name}"):
        lip.check_supported(model)
    with pytest.raises(lip.UnsupportedLayerError, match=f"layer type {name}"):
        lip.LipschitzBound(model, (1, 2, 2))


def test_last_layer_split() -> None:
    """L_sub stops below the last Linear even when dropout follows it; an activation after it disables
    the split."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Dropout(0.1)).double()
    estimate = lip.LipschitzBound(model, (1, 2, 2)).compute(exact=True)
    assert float(estimate.sub) == pytest.approx(lip.linear_spectral_norm(model[1].weight))
    assert estimate.last_weight is model[3].weight
    ending_in_relu = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    assert lip.LipschitzBound(ending_in_relu, (1, 2, 2)).compute(exact=True).sub is None


def test_wide_resnet_is_supported() -> None:
    """WRN-16-4 (BN, residual blocks with conv shortcuts, adaptive pooling) gets a finite bound."""
    from certbench.data.specs import DATASETS
    from certbench.models import build

    spec = DATASETS.get("digits")
    model = build("wrn-16-4", spec, dropout=0.4)
    assert model(torch.rand(2, *spec.shape)).shape == (2, 10)
    bound = lip.LipschitzBound(model, spec.shape)
    estimate = bound.compute()
    assert torch.isfinite(estimate.total) and estimate.total > 0
    estimate.total.backward()
    assert len(bound.state_dict()) == 1 + 6 * 2 + 3 + 1  # stem, 6 blocks × 2 convs, 3 shortcuts, fc
