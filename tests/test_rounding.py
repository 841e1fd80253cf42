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
        for _ in range(20):
            delta = torch.randn_like(x)
            delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if l2 else delta.sign()
            point = (x + radius * torch.rand(len(x), 1, 1, 1) * delta).clamp(0, 1)
            reference = exact(point.double())
            single = model(point).double()
            margin = reference.gather(1, y[:, None]) - reference
            float_margin = single.gather(1, y[:, None]) - single
            others = torch.ones_like(margin, dtype=torch.bool).scatter_(1, y[:, None], False)
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
