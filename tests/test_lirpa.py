"""auto_LiRPA compat shims, bound helpers, the ibp/crown/crown-ibp/alpha-crown certificates and the
ibp/crown-ibp methods: soundness against sampling and PGD, determinism, training progress."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import certbench.bounds.lirpa as lirpa
from certbench.bounds import lirpa_compat
from certbench.bounds.lirpa import (
    AlphaCROWN,
    BoundedModule,
    BoundedTensor,
    Bounder,
    PerturbationLpNorm,
    input_box,
    robust_cross_entropy,
    specification_matrix,
    supports,
)
from certbench.certificates import CERTIFICATES, CERTIFIED, ERROR, NOT_CERTIFIED
from certbench.config import ConfigError, validate_against
from certbench.data.specs import DATASETS
from certbench.method import RunContext
from certbench.nn import Normalize, Residual
from methods._bound_propagation import ramp
from methods.crown_ibp import CROWNIBP
from methods.ibp import IBP

REPO = Path(__file__).resolve().parents[1]
METHODS = ("IBP", "CROWN", "CROWN-IBP")


def small_mlp(seed: int, channels: int = 2, side: int = 4, classes: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5, 0.3][:channels], [0.25, 0.4][:channels]),
        nn.Flatten(),
        nn.Linear(channels * side * side, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, classes),
    ).eval()


def small_cnn(seed: int, channels: int = 2, side: int = 8, classes: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5, 0.3][:channels], [0.25, 0.4][:channels]),
        nn.Conv2d(channels, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * (side // 2) ** 2, 16),
        nn.ReLU(),
        nn.Linear(16, classes),
    ).eval()


def randomise_batch_norms(model: nn.Module) -> None:
    for norm in model.modules():
        if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.normal_()
            norm.bias.data.normal_()


def small_bn_cnn(seed: int, channels: int = 2, side: int = 8, classes: int = 5) -> nn.Sequential:
    """Conv → BatchNorm → ReLU → AvgPool → Linear → BatchNorm1d, with non-trivial statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.5, 0.3][:channels], [0.25, 0.4][:channels]),
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * (side // 2) ** 2, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, classes),
    )
    randomise_batch_norms(model)
    return model.eval()


def small_resnet(seed: int, channels: int = 2, side: int = 8, classes: int = 5) -> nn.Sequential:
    """WRN-style: an identity and a 1×1-conv shortcut (scales 0.7, 0.4), BatchNorm, dropout, global
    pooling."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        Normalize([0.5, 0.3][:channels], [0.25, 0.4][:channels]),
        nn.Conv2d(channels, 4, 3, padding=1),
        Residual(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Residual(
            nn.Sequential(
                nn.Conv2d(4, 6, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Dropout(0.3),
                nn.Conv2d(6, 6, 3, padding=1),
            ),
            nn.Conv2d(4, 6, 1, stride=2),
            (0.7, 0.4),
        ),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, classes),
    )
    randomise_batch_norms(model)
    return model.eval()


ARCHS = {
    "mlp": (small_mlp, 4),
    "cnn": (small_cnn, 8),
    "bn-cnn": (small_bn_cnn, 8),
    "resnet": (small_resnet, 8),
}


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact margins z_y − z_j, j ≠ y: (B, K−1)."""
    logits = model(x)
    return torch.einsum("bkc,bc->bk", specification_matrix(y, logits.shape[1]), logits)


def pgd_margin_iterates(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20, norm: str = "linf"
) -> list[torch.Tensor]:
    """PGD minimising each margin separately (random start); the margins of every iterate."""
    batch, others = len(x), margins(model, x[:1], y[:1]).shape[1]
    xs, ys = x.repeat_interleave(others, 0), y.repeat_interleave(others, 0)
    pick = torch.arange(others).repeat(batch)
    box = input_box(xs, eps) if norm == "linf" else None
    step = eps / 4

    def project(z: torch.Tensor) -> torch.Tensor:
        if box is not None:
            return torch.max(torch.min(z, box[1]), box[0])
        delta = (z - xs).flatten(1)
        scale = (eps / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        return xs + (delta * scale[:, None]).view_as(z)

    z = project(xs + (torch.rand_like(xs) * 2 - 1) * eps)
    iterates = []
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        m = margins(model, z, ys)
        iterates.append(m.detach().view(batch, others, others))
        (grad,) = torch.autograd.grad(m.gather(1, pick[:, None]).sum(), z)
        if box is not None:
            z = project(z - step * grad.sign())
        else:
            g = grad.flatten(1)
            z = project(z - step * (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(z))
    # per iterate: (sample, margin j), the least margin j over all K−1 attacked points
    return [it.amin(1) for it in iterates]


def box_samples(x: torch.Tensor, eps: float, count: int = 64) -> torch.Tensor:
    """(count, *x.shape) points of the clipped ε-box around x: 8 random corners, the rest uniform."""
    lower_x, upper_x = input_box(x, eps)
    samples = lower_x + (upper_x - lower_x) * torch.rand(count, *x.shape)
    samples[:8] = torch.where(torch.rand(8, *x.shape) < 0.5, lower_x, upper_x)
    return samples


def assert_never_below(lower: torch.Tensor, observed: torch.Tensor) -> None:
    assert (observed >= lower - 1e-4).all(), (
        f"a point inside the ball beat the bound by {(lower - observed).max():.3g}"
    )


# --- compat shims: each test fails without its shim -------------------------------------


def test_shim_numpy_arraysetops() -> None:
    from numpy.lib.arraysetops import isin

    assert isin(np.array([1, 2, 3]), [2]).tolist() == [False, True, False]


def test_shim_set_opset_version() -> None:
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    from torch.onnx.symbolic_helper import _set_opset_version

    previous = GLOBALS.export_onnx_opset_version
    try:
        _set_opset_version(12)
        assert GLOBALS.export_onnx_opset_version == 12
    finally:
        GLOBALS.export_onnx_opset_version = previous


def test_shim_node_getitem_reads_attributes() -> None:
    graph = torch._C.Graph()
    node = graph.create("prim::Constant")
    node.f_("value", 2.5)
    node.i_("axis", 3)
    assert node["value"] == 2.5 and node["axis"] == 3
    # auto_LiRPA reads conv strides and paddings this way: the parsed net computes the same function
    model, x = small_cnn(0), torch.rand(3, 2, 8, 8)
    assert torch.allclose(BoundedModule(model, x)(x), model(x), atol=1e-6)


class FlattenBySize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def test_shim_dynamic_batch_for_view_by_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), FlattenBySize(), nn.Linear(48, 4)).eval()
    bounded = BoundedModule(model, torch.rand(2, 1, 4, 4))
    for batch in (5, 1):
        x = torch.rand(batch, 1, 4, 4)
        assert torch.allclose(bounded(x), model(x), atol=1e-6)
        ptb = PerturbationLpNorm(norm=np.inf, eps=0.1)
        lower, upper = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP")
        assert lower.shape == (batch, 4) and (lower <= model(x)).all() and (model(x) <= upper).all()


def test_shim_named_members_accepts_remove_duplicate() -> None:
    model = small_mlp(0)
    bounded = BoundedModule(model, torch.rand(2, 2, 4, 4))
    names = dict(bounded.named_parameters())
    assert set(names) == set(dict(model.named_parameters()))
    assert all(names[k] is v for k, v in model.named_parameters())  # shared, so training reaches the model


def test_shim_crown_through_normalize_at_batch_above_one() -> None:
    """CROWN on a CNN that starts with Normalize equals CROWN on the same CNN without it,
    fed the normalised box (an exact change of variables for ℓ∞ boxes)."""
    model, x, eps = small_cnn(1), torch.rand(3, 2, 8, 8), 0.05
    lower_x, upper_x = input_box(x, eps)
    full = BoundedModule(model, x).compute_bounds(
        x=(BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=eps, x_L=lower_x, x_U=upper_x)),),
        method="backward",
    )
    normalize, body = model[0], model[1:]
    z = normalize(x)
    folded = BoundedModule(body, z).compute_bounds(
        x=(
            BoundedTensor(
                z, PerturbationLpNorm(norm=np.inf, eps=eps, x_L=normalize(lower_x), x_U=normalize(upper_x))
            ),
        ),
        method="backward",
    )
    assert torch.allclose(full[0], folded[0], atol=1e-4) and torch.allclose(full[1], folded[1], atol=1e-4)


def test_shim_register_opset_symbolics_parses_gather() -> None:
    """Loss fusion's ``torch.gather`` parses to GatherElements (opset 9's symbolic uses OneHot,
    which auto_LiRPA cannot bound)."""
    model, x, y = small_mlp(0), torch.rand(3, 2, 4, 4), torch.tensor([0, 3, 1])
    bounded = BoundedModule(lirpa.CrossEntropyWrapper(model), (x, y))
    expected = torch.exp(model(x) - model(x).gather(1, y[:, None])).sum(1, keepdim=True)
    assert torch.allclose(bounded(x, y), expected, atol=1e-5)


def unstable_mlp(seed: int) -> nn.Sequential:
    """A float64 random ReLU MLP (16-32-32-5) whose hidden neurons are mostly unstable at ε = 0.1."""
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)]
    return nn.Sequential(*layers).double().eval()


def test_shim_relu_alpha_gradient_makes_alpha_crown_tighter_than_crown() -> None:
    """Shims 8–10: α-CROWN's bound on a float64 net with many unstable ReLUs is float64, never below
    CROWN's and above it on most margins (without shim 8 every α has a zero gradient and the two
    are equal; without 9 the bound is float32 or the call fails; without 10 it fails on a layer
    with more than 90 % unstable neurons)."""
    model = unstable_mlp(0)
    torch.manual_seed(1)
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    y = model(x).argmax(1)
    bounds = Bounder().margin_lower_bounds(
        model, x, y, 0.1, ["CROWN", "alpha-CROWN"], alpha=AlphaCROWN(iterations=10, lr=0.1)
    )
    crown, alpha = bounds["CROWN"], bounds["alpha-CROWN"]
    assert alpha.dtype == torch.float64 and alpha.shape == crown.shape == (8, 4)
    assert (alpha >= crown - 1e-9).all()
    tighter = alpha > crown + 1e-6 * crown.abs().clamp_min(1.0)
    assert tighter.float().mean() > 0.5, f"tighter on {tighter.float().mean():.0%} of the margins only"
    with torch.no_grad():
        points = box_samples(x.float(), 0.1).flatten(0, 1)
        sampled = margins(copy.deepcopy(model).float(), points, y.repeat(64)).view(64, 8, -1).amin(0)
    assert_never_below(alpha.float(), sampled)


def test_shim_full_alpha_indices_on_a_mostly_unstable_layer() -> None:
    """Shim 10: α-CROWN on a net whose 12-unit layer has more than 90 % unstable neurons (0.3 then
    keeps a full α with the sparse one's indices, and its backward pass failed)."""
    model = small_mlp(5).double()
    torch.manual_seed(5)
    x = torch.rand(16, 2, 4, 4).double()
    y = model(x).argmax(1)
    bounds = Bounder().margin_lower_bounds(
        model, x, y, 0.03, ["CROWN", "alpha-CROWN"], alpha=AlphaCROWN(iterations=2)
    )
    assert (bounds["alpha-CROWN"] >= bounds["CROWN"] - 1e-9).all()


def ibp_trained_digits_cnn(steps: int = 40) -> nn.Module:
    """cnn-small after ``steps`` IBP steps on sklearn digits (ε ramping to 0.1): a few seconds, and
    enough for IBP to prove neurons stable that CROWN's intervals leave unstable."""
    from certbench.data.digits import load as load_digits_split

    torch.manual_seed(0)
    train, _ = load_digits_split(Path("."), False)
    x, y = train.tensors
    method = make_method(IBP, epochs=1, eps_train=0.1, schedule="linear", schedule_start=0, schedule_length=1)
    model = method.build_model("cnn-small", {})
    method.prepare(model)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        index = torch.randint(0, len(x), (64,))
        out = method.loss(model, x[index], y[index], min(1.0, 2 * step / steps))
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    return model.eval()


def test_shim_per_sample_sparse_bounds_batched_crown_equals_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shim 11: CROWN's margin bounds of a batch equal those of each sample alone (0.3 merged the
    batch's unstable neurons: its bounds moved by up to 0.08 here), and so do the certified sets."""
    import auto_LiRPA.backward_bound as backward_bound

    from certbench.data.digits import load as load_digits_split

    model = ibp_trained_digits_cnn()
    _, test = load_digits_split(Path("."), False)
    x, y = test.tensors[0][:48], test.tensors[1][:48]
    model64 = copy.deepcopy(model).double().requires_grad_(False)

    def batched_and_single(eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        bounder = Bounder()
        batched = bounder.margin_lower_bounds(model64, x.double(), y, eps, ["CROWN"])["CROWN"]
        single = [
            bounder.margin_lower_bounds(model64, x[i : i + 1].double(), y[i : i + 1], eps, ["CROWN"])["CROWN"]
            for i in range(len(x))
        ]
        return batched, torch.cat(single)

    for eps in (0.05, 0.1):
        batched, single = batched_and_single(eps)
        assert torch.allclose(batched, single, rtol=0, atol=1e-10)
    crown = CERTIFICATES.get("crown")
    for eps in (0.05, 0.1):
        together = crown(batch_size=len(x)).certify(model, x, y, [eps]).status[eps]
        alone = crown(batch_size=1).certify(model, x, y, [eps]).status[eps]
        assert np.array_equal(together, alone) and (together == CERTIFIED).any()
    # without the shim the batch changes the bounds
    monkeypatch.setattr(BoundedModule, "restore_sparse_bounds", backward_bound.restore_sparse_bounds)
    monkeypatch.setattr(BoundedModule, "get_sparse_C", backward_bound.get_sparse_C)
    batched, single = batched_and_single(0.1)
    assert (batched - single).abs().max() > 1e-3


def test_alpha_crown_time_limit_raises_and_the_bounder_recovers() -> None:
    model, x, y = small_mlp(0), torch.rand(4, 2, 4, 4), torch.arange(4)
    bounder = Bounder()
    with pytest.raises(lirpa.BoundTimeLimitExceeded, match="time limit of 1e-06 s"):
        bounder.margin_lower_bounds(model, x, y, 0.05, ["alpha-CROWN"], alpha=AlphaCROWN(time_limit=1e-6))
    assert bounder._bounded is None and torch.get_default_dtype() == torch.float32
    lower = bounder.margin_lower_bounds(model, x, y, 0.05, ["alpha-CROWN"], alpha=AlphaCROWN(iterations=3))
    assert lower["alpha-CROWN"].shape == (4, 4)


def test_bounder_rebuilds_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = small_cnn(2), torch.rand(4, 2, 8, 8), torch.arange(4)
    bounder = Bounder()
    expected = bounder.margin_lower_bounds(model, x, y, 0.02, ["CROWN"])["CROWN"]
    first = bounder._bounded

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(first, "compute_bounds", fail)
    with pytest.raises(RuntimeError, match="injected"):
        bounder.margin_lower_bounds(model, x, y, 0.02, ["CROWN"])
    again = bounder.margin_lower_bounds(model, x, y, 0.02, ["CROWN"])["CROWN"]
    assert bounder._bounded is not first
    assert torch.equal(again, expected)


def test_version_refusal() -> None:
    lirpa_compat.check_version("0.3")
    with pytest.raises(lirpa_compat.LiRPAVersionError, match="tested with auto_LiRPA 0.3 only, found 0.4"):
        lirpa_compat.check_version("0.4")
    code = "import importlib.metadata as m; m.version = lambda name: '0.2'\nimport certbench.bounds.lirpa"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode != 0 and "LiRPAVersionError" in result.stderr and "found 0.2" in result.stderr


# --- bound helpers ------------------------------------------------------------------------


def test_specification_and_robust_cross_entropy() -> None:
    y = torch.tensor([0, 2])
    spec = specification_matrix(y, 3)
    assert spec.tolist() == [[[1, -1, 0], [1, 0, -1]], [[-1, 0, 1], [0, -1, 1]]]
    logits = torch.randn(2, 3)
    # with the exact margins as "bounds" the robust CE is the natural CE
    exact = torch.einsum("bkc,bc->bk", spec, logits)
    assert torch.allclose(robust_cross_entropy(exact), F.cross_entropy(logits, y), atol=1e-6)


def test_supports() -> None:
    assert supports(small_mlp(0)) and supports(small_cnn(0))
    assert not supports(nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 2), nn.Tanh()))
    assert not supports(nn.Sequential(nn.Flatten(), FlattenBySize()))
    assert supports(small_resnet(0)) and not supports(nn.Sequential(nn.AdaptiveAvgPool2d(2)))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_bounds_contain_sampled_points_and_pgd_iterates(arch: str, seed: int, eps: float) -> None:
    build, side = ARCHS[arch]
    model = build(seed)
    torch.manual_seed(seed + 1)
    x, y = torch.rand(3, 2, side, side), torch.randint(0, 5, (3,))
    bounds = Bounder().margin_lower_bounds(model, x, y, eps, METHODS)
    bounds |= Bounder().margin_lower_bounds(
        model, x, y, eps, ["alpha-CROWN"], alpha=AlphaCROWN(iterations=5, lr=0.2)
    )
    with torch.no_grad():
        sampled = margins(model, box_samples(x, eps).flatten(0, 1), y.repeat(64)).view(64, 3, -1).amin(0)
    attacked = torch.stack(pgd_margin_iterates(model, x, y, eps)).amin(0)
    assert (bounds["alpha-CROWN"] >= bounds["CROWN"] - 1e-5).all()
    for method in [*METHODS, "alpha-CROWN"]:
        assert_never_below(bounds[method], sampled)
        assert_never_below(bounds[method], attacked)


def pgd_cross_entropy_iterates(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20
) -> torch.Tensor:
    """PGD-ℓ∞ maximising the cross-entropy (random start): the largest CE seen per sample."""
    lower_x, upper_x = input_box(x, eps)
    z, worst = lower_x + (upper_x - lower_x) * torch.rand_like(x), torch.full((len(x),), -np.inf)
    for _ in range(steps):
        z = z.detach().requires_grad_(True)
        loss = F.cross_entropy(model(z), y, reduction="none")
        worst = torch.maximum(worst, loss.detach())
        (grad,) = torch.autograd.grad(loss.sum(), z)
        z = torch.max(torch.min(z + eps / 4 * grad.sign(), upper_x), lower_x)
    return worst


@pytest.mark.parametrize("arch", sorted(ARCHS))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_fused_cross_entropy_bounds_contain_sampled_points_and_pgd_iterates(
    arch: str, seed: int, eps: float
) -> None:
    build, side = ARCHS[arch]
    model = build(seed)
    torch.manual_seed(seed + 1)
    x, y = torch.rand(3, 2, side, side), torch.randint(0, 5, (3,))
    bounder = Bounder()  # used on a batch with other labels first, as in training
    bounder.fused_cross_entropy_upper_bounds(model, x, (y + 1) % 5, eps, ["IBP", "CROWN-IBP"])
    bounds = bounder.fused_cross_entropy_upper_bounds(model, x, y, eps, ["IBP", "CROWN-IBP"])
    with torch.no_grad():
        sampled = F.cross_entropy(model(box_samples(x, eps).flatten(0, 1)), y.repeat(64), reduction="none")
        sampled = sampled.view(64, 3).amax(0)
    attacked = pgd_cross_entropy_iterates(model, x, y, eps)
    for upper in bounds.values():
        assert (upper >= torch.maximum(sampled, attacked) - 1e-4).all()


def test_fused_ibp_bound_equals_the_margin_form_with_its_gradients() -> None:
    """Fused IBP = robust CE of IBP margin bounds, in value and in every parameter's gradient,
    whether asked alone or with CROWN-IBP (whose Exp node then keeps a detached shift)."""
    model, x, y, eps = small_cnn(5).train(), torch.rand(6, 2, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0]), 0.05
    params = list(model.parameters())  # (auto_LiRPA records no graph for a model in eval mode)
    margin = robust_cross_entropy(Bounder().margin_lower_bounds(model, x, y, eps, ["IBP"])["IBP"])
    expected = torch.autograd.grad(margin, params)
    for asked in (["IBP"], ["IBP", "CROWN-IBP"]):
        fused = Bounder().fused_cross_entropy_upper_bounds(model, x, y, eps, asked)["IBP"]
        assert fused.shape == (6,) and torch.allclose(fused.mean(), margin, atol=1e-5)
        for got, want in zip(torch.autograd.grad(fused.mean(), params), expected, strict=True):
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bounds_are_exact_at_eps_zero(arch: str) -> None:
    build, side = ARCHS[arch]
    model, x = build(3), torch.rand(4, 2, side, side)
    y = torch.tensor([0, 1, 2, 3])
    for lower in Bounder().margin_lower_bounds(model, x, y, 0.0, METHODS).values():
        assert torch.allclose(lower, margins(model, x, y), atol=1e-4)


def test_l2_crown_matches_folded_network_and_contains_pgd() -> None:
    """ℓ2 CROWN through Normalize equals CROWN on the net with Normalize folded into the first
    Linear layer, and no PGD-ℓ2 iterate leaves it; ℓ2 IBP is refused (auto_LiRPA is unsound there)."""
    model, eps = small_mlp(4), 0.3
    torch.manual_seed(4)
    x, y = torch.rand(3, 2, 4, 4), torch.tensor([0, 1, 2])
    lower = Bounder().margin_lower_bounds(model, x, y, eps, ["CROWN"], norm="l2")["CROWN"]
    normalize, first = model[0], model[2]
    scale = (1 / normalize.std).expand(1, 2, 4, 4).flatten()
    shift = (-normalize.mean / normalize.std).expand(1, 2, 4, 4).flatten()
    folded_first = nn.Linear(32, 16)
    folded_first.weight.data = first.weight.data * scale
    folded_first.bias.data = first.bias.data + first.weight.data @ shift
    folded = nn.Sequential(nn.Flatten(), folded_first, *model[3:]).eval()
    spec = specification_matrix(y, 5)
    reference, _ = BoundedModule(
        folded, x, bound_opts={"sparse_intermediate_bounds_with_ibp": False}
    ).compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=2, eps=eps)),), C=spec, method="backward")
    assert torch.allclose(lower, reference, atol=1e-4)
    attacked = torch.stack(pgd_margin_iterates(model, x, y, eps, norm="l2")).amin(0)
    assert_never_below(lower, attacked)
    with pytest.raises(ValueError, match="only CROWN"):
        Bounder().margin_lower_bounds(model, x, y, eps, ["IBP"], norm="l2")


# --- certificates -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ibp", "crown", "crown-ibp", "alpha-crown"])
def test_certified_samples_resist_pgd_and_certification_is_deterministic(name: str) -> None:
    model = small_cnn(5)
    torch.manual_seed(5)
    x = torch.rand(48, 2, 8, 8)
    y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 5  # some misclassified samples
    params = {"iterations": 5} if name == "alpha-crown" else {}
    certificate = CERTIFICATES.get(name)(batch_size=16, **params)
    assert certificate.applies(model) and certificate.norm == "linf"
    eps = [0.002, 0.01]
    result = certificate.certify(model, x, y, eps)
    again = certificate.certify(model, x, y, eps)
    assert result.radius is None and not result.errors
    for e in eps:
        status = result.status[e]
        assert np.array_equal(status, again.status[e])
        assert set(status[:6]) == {NOT_CERTIFIED}
        certified = status == CERTIFIED
        assert 0 < certified.sum() < len(x)  # neither vacuous nor trivial at these ε
        worst = torch.stack(pgd_margin_iterates(model, x, y, e)).amin(0).amin(1)
        robust = (worst > 0).numpy()
        assert not (certified & ~robust).any()  # certified ⊆ PGD-robust, so cert. acc ≤ PGD acc
    assert (result.status[0.01] == CERTIFIED).sum() <= (result.status[0.002] == CERTIFIED).sum()


def test_certificate_retries_failed_batches_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_mlp(6)
    x = torch.rand(8, 2, 4, 4)
    y = model(x).argmax(1)
    poisoned = x[3].clone()
    original = Bounder.margin_lower_bounds

    def flaky(self: Bounder, model: nn.Module, xb: torch.Tensor, *args: object, **kwargs: object) -> object:
        if len(xb) > 1 or torch.equal(xb[0], poisoned):
            raise RuntimeError("injected failure")
        return original(self, model, xb, *args, **kwargs)

    expected = CERTIFICATES.get("ibp")().certify(model, x, y, [0.01]).status[0.01]
    monkeypatch.setattr(Bounder, "margin_lower_bounds", flaky)
    result = CERTIFICATES.get("ibp")(batch_size=4).certify(model, x, y, [0.01])
    status = result.status[0.01]
    assert status[3] == ERROR and len(result.errors) == 1 and "injected failure" in result.errors[0]
    assert np.array_equal(np.delete(status, 3), np.delete(expected, 3))


def test_alpha_crown_time_limit_gives_error_not_certified() -> None:
    """α-CROWN runs CROWN first: a batch CROWN proves entirely is certified whatever the limit; a batch
    where the optimisation must run and overruns its limit is error, never not_certified."""
    model = small_mlp(6)
    torch.manual_seed(6)
    x = torch.rand(8, 2, 4, 4)
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 5  # misclassified: not_certified whatever the bound
    eps = 0.05  # CROWN proves some of the others, not all
    crown = CERTIFICATES.get("crown")().certify(model, x, y, [eps]).status[eps]
    assert (crown[1:] == CERTIFIED).any() and (crown[1:] == NOT_CERTIFIED).any()
    result = CERTIFICATES.get("alpha-crown")(batch_size=4, time_limit=1e-6).certify(model, x, y, [eps])
    status = result.status[eps]
    assert status[0] == NOT_CERTIFIED and set(status[1:]) == {ERROR}  # both batches had an open sample
    assert len(result.errors) == 7 and all("time limit" in e for e in result.errors)
    one_by_one = CERTIFICATES.get("alpha-crown")(batch_size=1, time_limit=1e-6).certify(model, x, y, [eps])
    assert np.array_equal(one_by_one.status[eps][1:], np.where(crown[1:] == CERTIFIED, CERTIFIED, ERROR))
    # without a binding limit the optimisation certifies beyond CROWN
    alpha = CERTIFICATES.get("alpha-crown")(iterations=20).certify(model, x, y, [eps]).status[eps]
    assert ((alpha == CERTIFIED) >= (crown == CERTIFIED)).all() and (alpha == CERTIFIED).sum() > (
        crown == CERTIFIED
    ).sum()


def test_alpha_crown_certifies_beyond_crown() -> None:
    """On a float32 net with many unstable neurons α-CROWN certifies every sample CROWN does, and more."""
    model = unstable_mlp(2).float()
    torch.manual_seed(3)
    x = torch.rand(16, 1, 4, 4)
    y = model(x).argmax(1)
    eps = [0.1, 0.2]
    crown = CERTIFICATES.get("crown")().certify(model, x, y, eps)
    alpha = CERTIFICATES.get("alpha-crown")(iterations=20, lr=0.1).certify(model, x, y, eps)
    assert not alpha.errors
    gained = 0
    for e in eps:
        by_crown, by_alpha = crown.status[e] == CERTIFIED, alpha.status[e] == CERTIFIED
        assert not (by_crown & ~by_alpha).any()
        gained += int((by_alpha & ~by_crown).sum())
    assert gained > 0


def test_alpha_crown_skips_only_refuted_samples() -> None:
    """The PGD pre-filter refutes some samples, none that α-CROWN certifies without it, and changes
    no status: it only saves the optimisation where no bound could succeed."""
    from certbench.certificates.lirpa import refuted

    model = small_mlp(6)
    torch.manual_seed(6)
    x = torch.rand(16, 2, 4, 4)
    y = model(x).argmax(1)
    eps = [0.05, 0.1]
    plain = CERTIFICATES.get("alpha-crown")(iterations=20, falsify_steps=0).certify(model, x, y, eps)
    filtered = CERTIFICATES.get("alpha-crown")(iterations=20).certify(model, x, y, eps)
    needed = torch.full((16, 4), 1e-6, dtype=torch.float64)
    for e in eps:
        assert np.array_equal(plain.status[e], filtered.status[e])
        hopeless = refuted(copy.deepcopy(model).double(), x.double(), y, e, needed, steps=10).numpy()
        assert hopeless.any() and not (hopeless & (plain.status[e] == CERTIFIED)).any()
    assert (plain.status[0.05] == CERTIFIED).any()


def test_certificates_not_applicable_to_other_layers() -> None:
    model = nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 2), nn.Tanh())
    names = ("ibp", "crown", "crown-ibp", "alpha-crown")
    assert not any(CERTIFICATES.get(n)().applies(model) for n in names)


# --- methods --------------------------------------------------------------------------------


def make_method(cls: type[IBP], epochs: int = 10, **params: object) -> IBP:
    spec = DATASETS.get("digits")
    filled = validate_against({"type": "object", "properties": cls.params_schema}, params)
    return cls(filled, RunContext(spec, epochs, spec.eps_linf, spec.eps_l2, torch.device("cpu")))


def test_schedule_and_mixing() -> None:
    method = make_method(IBP, epochs=10, schedule="linear", schedule_start=2, schedule_length=4)
    assert method.eps_train == max(DATASETS.get("digits").eps_linf)
    assert (
        method.epsilon(0.1) == 0 and method.epsilon(0.4) == pytest.approx(0.05) and method.epsilon(0.7) == 0.1
    )
    assert method.weights(0.1)["kappa"] == pytest.approx(0.5) and method.weights(0.0)["kappa"] == 1.0
    smooth = [ramp(u, "smoothed") for u in np.linspace(0, 1, 101)]
    assert smooth[0] == 0 and smooth[-1] == pytest.approx(1) and np.all(np.diff(smooth) >= 0)
    assert smooth[10] < 0.1 * 0.1  # slower than linear at the start
    crown_ibp = make_method(CROWNIBP, epochs=10, eps_train=0.2, beta_final=0.25)
    assert crown_ibp.weights(0.1)["beta"] == pytest.approx(1 - 0.5 * 0.75)


@pytest.mark.parametrize(
    "params",
    [
        {"eps_train": 1.5},
        {"eps_train": -0.1},
        {"schedule_start": 8, "schedule_length": 5},
        {"kappa_final": 1.2},
        {"kappa_final": -0.5},
        {"beta_final": 2.0},
        {"beta_final": -1.0},
    ],
)
def test_bad_parameters_raise_config_error(params: dict[str, float]) -> None:
    spec = DATASETS.get("digits")
    defaults = validate_against({"type": "object", "properties": CROWNIBP.params_schema}, {})
    method = CROWNIBP(
        {**defaults, **params}, RunContext(spec, 10, spec.eps_linf, spec.eps_l2, torch.device("cpu"))
    )
    with pytest.raises(ConfigError, match=r"^params\.\w+: "):
        method.check()


@pytest.mark.parametrize(
    "cls,arch,fusion", [(IBP, "cnn-small", False), (CROWNIBP, "mlp", False), (CROWNIBP, "cnn-small", True)]
)
def test_training_steps_lower_the_robust_loss(cls: type[IBP], arch: str, fusion: bool) -> None:
    from certbench.data.digits import load as load_digits_split

    torch.manual_seed(0)
    train, _ = load_digits_split(Path("."), False)
    x, y = train.tensors[0][:64], train.tensors[1][:64]
    extra = {"beta_final": 0.5, "loss_fusion": fusion} if cls is CROWNIBP else {}
    method = make_method(cls, epochs=10, eps_train=0.1, **extra)
    method.check()
    params = {"widths": (32, 32)} if arch == "mlp" else {}
    model = method.build_model(arch, params)
    method.prepare(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    robust_losses = []
    for _ in range(16):  # the first step also builds the BoundedModule before backpropagating
        out = method.loss(model, x, y, 1.0)
        robust_losses.append(out.stats["robust_loss"])
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    assert out.stats["eps"] == 0.1 and robust_losses[-1] < 0.8 * robust_losses[0]
    if cls is CROWNIBP:
        assert out.stats["beta"] == pytest.approx(0.5)


def test_method_copies_start_with_an_empty_bounder() -> None:
    method = make_method(IBP)
    model = method.build_model("mlp", {"widths": (8,)})
    method.loss(model, torch.rand(4, 1, 8, 8), torch.arange(4), 1.0)
    copied = copy.deepcopy(method)
    assert method.bounder._bounded is not None and copied.bounder._bounded is None
    assert copied.loss(model, torch.rand(4, 1, 8, 8), torch.arange(4), 1.0).loss.isfinite()


def test_alpha_crown_reuses_crowns_bounds_only_for_the_same_model_and_points() -> None:
    """α-CROWN after ``crown`` starts from CROWN's stored bounds and certifies exactly what it certifies
    from fresh ones; a weight changed in place, another ε or another point is not served a stored bound."""
    from certbench.bounds.fingerprint import fingerprint
    from certbench.certificates.lirpa import CROWN_MEMO

    model = small_cnn(3)
    x = torch.rand(12, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    alpha = CERTIFICATES.get("alpha-crown")(iterations=3)
    CROWN_MEMO.clear()
    fresh = alpha.certify(model, x, y, [0.02])
    CERTIFICATES.get("crown")().certify(model, x, y, [0.02])
    x64 = x.double()
    assert CROWN_MEMO.lookup(fingerprint(model), x64, y, 0.02) is not None
    reused = alpha.certify(model, x, y, [0.02])
    assert np.array_equal(fresh.status[0.02], reused.status[0.02])
    assert CROWN_MEMO.lookup(fingerprint(model), x64, y, 0.03) is None
    assert CROWN_MEMO.lookup(fingerprint(model), x64 + 1e-9, y, 0.02) is None
    with torch.no_grad():
        model[-1].weight[0, 0] += 1.0
    assert CROWN_MEMO.lookup(fingerprint(model), x64, y, 0.02) is None
