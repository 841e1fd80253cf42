"""The rounding walk (certbench.bounds.rounding) on every layer kind it has a rule for.

For each architecture, points are sampled in a box (and an ℓ2 ball) around test inputs: the
float64 margins of the model (a stand-in for exact arithmetic, 2⁻²⁹ times finer than float32) must
lie above the proven lower bound, and the float32 margins within the proven error of them. The
layers the exact oracle (test_exact_oracle.py) does not reach are here: convolutions with stride,
padding and groups, BatchNorm, every average-pooling setting, max pooling, residual sums and the
smooth activations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from certbench.bounds.rounding import (
    Region,
    RoundingUnsupported,
    _linf_distance_box,
    check,
    input_region,
    margin_bounds,
    walk,
)
from certbench.nn import Normalize, Residual
from certbench.nn.linf_dist import lp_distance_bounds


def _conv_net() -> nn.Module:
    return nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 16),
        nn.Sigmoid(),
        nn.Linear(16, 5),
    )


def _residual_net() -> nn.Module:
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ELU(),
        Residual(body, coefficients=(0.5, 0.5)),
        nn.AvgPool2d(2, divisor_override=3),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.LeakyReLU(0.1),
        nn.Linear(8, 5),
    )


def _trained_like(model: nn.Module) -> nn.Module:
    """Random weights with BatchNorm statistics that are not the identity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.1, 3)
            module.weight.data.uniform_(-2, 2)
    return model.eval()


def _clamp_net(clamp: nn.Module) -> nn.Module:
    """Half the units' biases shifted by ±3, so that they saturate on the whole region."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), copy.deepcopy(clamp), nn.Linear(32, 32), clamp, nn.Linear(32, 5)
    )
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.bias.add_(torch.where(torch.rand(32) < 0.5, 3.0 * torch.randn(32).sign(), 0.0))
    return model


ARCHITECTURES = {
    "conv": _conv_net,
    "residual": _residual_net,
    "relu": lambda: _clamp_net(nn.ReLU()),
    "relu6": lambda: _clamp_net(nn.ReLU6()),
    "hardtanh": lambda: _clamp_net(nn.Hardtanh(-0.5, 0.5)),
}


def _sampled_point(x: torch.Tensor, radius: float, l2: bool) -> torch.Tensor:
    """A random point of the ℓ2 ball (or, without ``l2``, of a box corner's direction) of radius at most
    ``radius`` around each sample of ``x``, clipped to [0, 1]."""
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if l2 else delta.sign()
    return (x + radius * torch.rand(len(x), 1, 1, 1, dtype=x.dtype) * delta).clamp(0, 1)


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − z_j for every class j."""
    return logits.gather(1, y[:, None]) - logits


def _others(y: torch.Tensor, classes: int) -> torch.Tensor:
    """The mask of the classes j ≠ y (where a margin bound says something)."""
    return torch.ones(len(y), classes, dtype=torch.bool).scatter_(1, y[:, None], False)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_enclosure_and_error_contain_sampled_points(name: str, l2: bool) -> None:
    torch.manual_seed(0)
    model = _trained_like(ARCHITECTURES[name]())
    exact = copy.deepcopy(model).double()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
        radius = 0.05
        bounds = margin_bounds(model, input_region(x, radius, l2=l2), y)
        others = _others(y, bounds.error.shape[1])
        for _ in range(20):
            point = _sampled_point(x, radius, l2)
            reference = exact(point.double())
            margin, float_margin = _margins(reference, y), _margins(model(point).double(), y)
            assert (margin[others] >= bounds.lower[others]).all()
            assert ((float_margin - margin).abs()[others] <= bounds.error[others]).all()
    # the bounds are not vacuous: the error is tiny against the margins' size
    assert float(bounds.error.max()) < 1e-3 * float(reference.abs().max())


@pytest.mark.parametrize(
    "clamp", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5)], ids=lambda m: type(m).__name__
)
def test_saturated_clamp_units_carry_no_error(clamp: nn.Module) -> None:
    """A unit whose every float input lies beyond a clamp value outputs that value exactly: its error
    is zero, the other units keep theirs, and the next layer's error shrinks accordingly."""
    torch.manual_seed(2)
    model = _clamp_net(clamp).eval()
    region = walk(model[:2], input_region(torch.rand(4, 1, 8, 8), 0.01), 2.0**-24)
    low, high = (0.0, math.inf) if type(clamp) is nn.ReLU else (clamp.min_val, clamp.max_val)
    saturated = (region.hi + region.err < low) | (region.lo - region.err > high)
    assert 0 < int(saturated.sum()) < saturated.numel()
    after = walk(model[2:3], region, 2.0**-24)
    assert (after.err[saturated] == 0).all() and (after.err[~saturated] == region.err[~saturated]).all()
    passed_through = Region(after.lo, after.hi, region.err)
    assert (walk(model[3:4], after, 2.0**-24).err < walk(model[3:4], passed_through, 2.0**-24).err).all()


def test_error_bound_covers_cancellation() -> None:
    """Large terms of both signs that nearly cancel: the float32 error is large against the output,
    and the proven bound must still cover it (the heuristic τ scaled with the outputs and missed it)."""
    torch.manual_seed(1)
    layer = nn.Linear(64, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1e4, -1e4]).repeat(32).repeat(2, 1) * (1 + 1e-3 * torch.rand(2, 64)))
        x = torch.rand(1, 64)
        layer.bias.copy_(-layer(x)[0].double().float())
        model = nn.Sequential(layer).eval()
        y = torch.tensor([0])
        bounds = margin_bounds(model, input_region(x), y)
        exact = layer.weight.double() @ x.double()[0] + layer.bias.double()
        computed = model(x)[0].double()
        assert (computed - exact).abs().max() > 1e-4  # the rounding is large here
        error = float(bounds.error[0, 1])
        assert abs((computed[0] - computed[1]) - (exact[0] - exact[1])) <= error


def test_affine_error_rules_cover_their_worst_inherited_errors() -> None:
    """An incoming error δ with |δ| ≤ e and ‖δ‖₂ ≤ E (a region that states both): the affine rules
    must cover the worst δ for each of their bounds, δ = E·w_i/‖w_i‖₂ for unit i (Cauchy–Schwarz is
    tight there) and δ = E·v for the top right singular vector v (‖W δ‖₂ = ‖W‖₂·E)."""
    torch.manual_seed(6)
    layer = nn.Linear(12, 7)
    w = layer.weight.detach().double()
    lo, hi = torch.zeros(1, 12, dtype=torch.float64), torch.ones(1, 12, dtype=torch.float64)
    big, norm = torch.full((1, 12), 10.0, dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    out = walk(nn.Sequential(layer), Region(lo, hi, big, err_norm=norm), 2.0**-24)
    for i in range(7):
        delta = 0.3 * w[i] / w[i].norm()
        assert float((w[i] @ delta).abs()) <= float(out.err[0, i])
    top = torch.linalg.svd(w).Vh[0]
    assert float((w @ (0.3 * top)).norm()) <= float(out.error_norm()[0])
    assert float(out.error_norm()[0]) <= 1.01 * 0.3 * float(torch.linalg.matrix_norm(w, ord=2)) + 1e-5
    # the layer as the last one, folded into the margins: δ along w_y − w_j moves margin j the most
    bounds = margin_bounds(nn.Sequential(layer), Region(lo, hi, big, err_norm=norm), torch.tensor([0]))
    for j in range(1, 7):
        row = w[0] - w[j]
        assert float(row @ (0.3 * row / row.norm())) <= float(bounds.error[0, j])


def test_error_norm_covers_cancellation_through_two_layers() -> None:
    """The cancellation layer's rounding error, carried into a second layer that amplifies the
    difference of its two outputs: the ℓ2 bound of the first layer's error must include that
    rounding (‖ρ̄‖₂), or the margin's bound (‖w_y − w_j‖₂·E + ρ̄_y + ρ̄_j) would miss the carried error;
    the per-layer ℓ2 bound itself covers the float error vector."""
    torch.manual_seed(1)
    first, second = nn.Linear(64, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([1e4, -1e4]).repeat(32).repeat(2, 1) * (1 + 1e-3 * torch.rand(2, 64)))
        x = torch.rand(1, 64)
        first.bias.copy_(-first(x)[0].double().float())
        second.weight.copy_(torch.tensor([[10.0, -10.0], [-10.0, 10.0]]))
        second.bias.zero_()
        model = nn.Sequential(first, second).eval()
        exact_hidden = first.weight.double() @ x.double()[0] + first.bias.double()
        float_hidden = first(x)[0].double()
        hidden = walk(nn.Sequential(first), input_region(x), 2.0**-24)
        assert float((float_hidden - exact_hidden).norm()) <= float(hidden.error_norm()[0])
        y = model(x).argmax(1)
        bounds = margin_bounds(model, input_region(x), y)
        exact = second.weight.double() @ exact_hidden
        computed = model(x)[0].double()
        j = 1 - int(y)
        moved = abs((computed[int(y)] - computed[j]) - (exact[int(y)] - exact[j]))
        assert moved > 1e-3  # the carried rounding is large here
        assert moved <= float(bounds.error[0, j])


@pytest.mark.parametrize(
    "module",
    [
        nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"),
        nn.LeakyReLU(-0.5),
        nn.ELU(alpha=-1.0),
        nn.GELU(),
        type("ScaledReLU", (nn.ReLU,), {"forward": lambda self, x: 10 * x.relu()})(),
    ],
)
def test_layers_without_a_rule_are_refused(module: nn.Module) -> None:
    with pytest.raises(RoundingUnsupported):
        check(nn.Sequential(module))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("uniform", "tight"), [(True, True), (False, True), (False, False)])
def test_linf_distance_box_contains_the_coordinatewise_bounds(
    uniform: bool, tight: bool, dtype: torch.dtype
) -> None:
    """Both enclosures of an ℓ∞-dist layer (one distance, for a box of one half-width or where only
    the error is needed; four for any box) contain the exact coordinate-wise bounds; the tight ones
    equal them up to rounding, the loose one on an uneven box does not. Float32 weights take the
    layer's float32 kernel (where it is built): box corners that float32 cannot represent, at a scale
    where its rounding is 10⁻³, must still be enclosed."""
    generator = torch.Generator().manual_seed(0)
    scale = 1.0 if dtype == torch.float64 else 1e4
    centre = (torch.rand(37, 29, generator=generator, dtype=torch.float64) * 4 - 2) * scale
    half = (
        torch.full_like(centre, 0.3 * scale)
        if uniform
        else torch.rand(37, 29, generator=generator, dtype=torch.float64) * scale
    )
    weight = (torch.randn(23, 29, generator=generator, dtype=torch.float64) * 3 * scale).to(dtype)
    lo, hi = centre - half, centre + half
    exact_lo, exact_hi = lp_distance_bounds(lo, hi, weight.double(), math.inf)
    lower, upper, rounding = _linf_distance_box(lo, hi, weight, tight)
    assert bool((lower - rounding <= exact_lo).all()) and bool((upper + rounding >= exact_hi).all())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5 * scale
    tight_enough = torch.allclose(lower, exact_lo, atol=tolerance) and torch.allclose(
        upper, exact_hi, atol=tolerance
    )
    assert tight_enough == (uniform or tight)


def _mixed_sign_mlp(width: int = 96, depth: int = 4) -> nn.Module:
    """Orthogonal hidden weights (‖W‖₂ = 1): rows of mixed signs, whose |W| products grow by about
    √width per layer while the operator norms stay 1, the case the ℓ2 error bound is for."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width), nn.ReLU()]
    for _ in range(depth - 1):
        layer = nn.Linear(width, width)
        nn.init.orthogonal_(layer.weight)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 5)).eval()


def test_l2_error_bound_is_tighter_and_still_covers_sampled_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through layers of mixed signs the ℓ2 error bound (‖A‖₂·‖δ‖₂ + ‖ρ̄‖₂, and ‖w_y − w_j‖₂·‖δ‖₂ at
    the margin) beats the componentwise one (|A|·e), and the float32 margins at sampled points of the
    ball stay within it; the ball carried through every layer tightens the hidden enclosures too."""
    from certbench.bounds import rounding

    torch.manual_seed(3)
    model = _mixed_sign_mlp()
    exact = copy.deepcopy(model).double()
    x, radius = torch.rand(8, 1, 8, 8), 0.05
    with torch.no_grad():
        y = model(x).argmax(1)
        bounds = margin_bounds(model, input_region(x, radius, l2=True), y)
        hidden_box = walk(model[:-1], input_region(x, radius), 2.0**-24)
        hidden_ball = walk(model[:-1], input_region(x, radius, l2=True), 2.0**-24)
        with monkeypatch.context() as patch:  # no operator norms: the componentwise bound alone
            patch.setattr(rounding, "_operator_norm", lambda m, shape: 1e30)
            componentwise = margin_bounds(model, input_region(x, radius, l2=True), y)
        others = _others(y, bounds.error.shape[1])
        assert (bounds.error[others] <= componentwise.error[others]).all()
        assert float(bounds.error[others].max()) < 0.5 * float(componentwise.error[others].max())
        assert (hidden_ball.hi - hidden_ball.lo).mean() < 0.5 * (hidden_box.hi - hidden_box.lo).mean()
        for _ in range(30):
            point = _sampled_point(x, radius, l2=True)
            hidden = exact[:-1](point.double())
            assert (hidden >= hidden_ball.lo).all() and (hidden <= hidden_ball.hi).all()
            margin, float_margin = _margins(exact(point.double()), y), _margins(model(point).double(), y)
            assert ((float_margin - margin).abs()[others] <= bounds.error[others]).all()
            assert (margin[others] >= bounds.lower[others]).all()


def test_operator_norm_bounds_follow_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached operator norms are the layers' spectral norms (convolutions on their input size), are
    recomputed when a weight changes in place, and a wide Linear's Hölder bound is above its norm."""
    from certbench.bounds import rounding

    torch.manual_seed(4)
    layer = nn.Linear(20, 30)
    true = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    assert true <= rounding._operator_norm(layer, (20,)) <= true * (1 + 1e-5)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert 2 * true <= rounding._operator_norm(layer, (20,)) <= 2 * true * (1 + 1e-5)
    monkeypatch.setattr(rounding, "GRAM_SIDE", 10)
    wide = nn.Linear(20, 30)
    assert rounding._operator_norm(wide, (20,)) >= float(
        torch.linalg.matrix_norm(wide.weight.double(), ord=2)
    )
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    basis = torch.eye(2 * 36, dtype=torch.float64).view(-1, 2, 6, 6)
    matrix = torch.nn.functional.conv2d(basis, conv.weight.double(), None, 2, 1).flatten(1)
    norm = float(torch.linalg.matrix_norm(matrix, ord=2))
    assert norm <= rounding._operator_norm(conv, (2, 6, 6)) <= norm * (1 + 1e-5)


_MANTISSA = 8  # bits of the emulated arithmetic below: unit roundoff 2⁻⁸, errors far above float64's


def _coarse(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values to nearest with a ``_MANTISSA``-bit significand."""
    significand, exponent = torch.frexp(v)
    return torch.ldexp(torch.round(significand * 2**_MANTISSA) / 2**_MANTISSA, exponent)


def _coarse_forward(model: nn.Sequential, x: torch.Tensor, permute: bool) -> torch.Tensor:
    """A forward pass of a Linear/ReLU net in the coarse arithmetic, every product and partial sum
    rounded, the terms summed in a random order where ``permute``."""
    a = x.flatten(1)
    for m in model:
        if type(m) is nn.ReLU:
            a = a.clamp_min(0)
        elif type(m) is nn.Linear:
            w, acc = m.weight.detach(), torch.zeros(len(a), m.out_features, dtype=torch.float64)
            for j in torch.randperm(m.in_features).tolist() if permute else range(m.in_features):
                acc = _coarse(acc + _coarse(a[:, j : j + 1] * w[:, j][None]))
            a = _coarse(acc + m.bias.detach()[None])
    return a


@pytest.mark.parametrize("l2", [False, True])
def test_error_bound_covers_coarse_arithmetic_in_any_order(l2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error bound is a theorem about any arithmetic that rounds to nearest, with unit roundoff u,
    in any summation order: with u = 2⁻⁸ emulated (errors 10¹³ times float64's, so a missing term
    would show), ReLU nets of mixed-sign, orthogonal and large weights keep every sampled margin of
    the ball or box within the proven error, in the natural and in random orders."""
    from certbench.bounds import rounding

    monkeypatch.setattr(rounding, "model_roundoff", lambda model: 2.0**-_MANTISSA)
    torch.manual_seed(5)
    for trial in range(12):
        width = int(torch.randint(4, 15, ()))
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(16, width), nn.ReLU()]
        for _ in range(int(torch.randint(1, 5, ()))):
            layer = nn.Linear(width, width)
            if trial % 3 == 0:
                nn.init.orthogonal_(layer.weight)
            elif trial % 3 == 1:
                layer.weight.data.mul_(float(torch.randn(()).exp() * 3))
            layers += [layer, nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(width, 4)).eval().double()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(_coarse(parameter))  # weights the coarse arithmetic can hold
            x = _coarse(torch.rand(8, 1, 4, 4, dtype=torch.float64))
            radius = float(torch.rand(()) * 0.1)
            y = model(x).argmax(1)
            bounds = margin_bounds(model, input_region(x, radius, l2=l2), y)
            others = _others(y, bounds.error.shape[1])
            for k in range(6):
                point = _coarse(_sampled_point(x, radius, l2))
                margin = _margins(model(point), y)
                coarse_margin = _margins(_coarse_forward(model, point, permute=k % 2 == 1), y)
                assert ((coarse_margin - margin).abs()[others] <= bounds.error[others]).all()
