"""SortNet (Zhang et al., NeurIPS 2022): the layer against a sorting reference and against the
ℓ∞-dist layer (its e_1 case), the sampled training form's expectation, exact box bounds, the
network's ℓ∞ Lipschitz constant, the float rounding rule, the ``linf-dist`` certificate against
many-step PGD on a briefly trained net, exact-type applicability, and the method's schedule."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from linf_pgd import pgd_flips
from torch import nn

from certbench import config as cfg
from certbench import models
from certbench.bounds.linf_dist import interval_bounds, lipschitz_linf, split_trunk
from certbench.bounds.rounding import input_region, model_roundoff, walk
from certbench.catalogue import params_schema
from certbench.certificates import CERTIFICATES, margins
from certbench.config import ConfigError
from certbench.data.loaders import load_split
from certbench.data.specs import DATASETS
from certbench.method import RunContext, get_method
from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate, lp_distance
from certbench.nn.sortnet import (
    SortDist,
    geometric_coefficients,
    sampled_distance,
    sorted_distance,
    sorted_distance_bounds,
)

INF = math.inf
DIGITS = DATASETS.get("digits")


def reference(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ_k c_k·|x − w_j|_(k) by a full sort."""
    a = (x[:, None, :] - w[None]).abs().sort(dim=-1, descending=True).values
    return a[..., : c.numel()] @ c.to(x.dtype)


# --- the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "n_in", "n_out", "terms"), [(5, 13, 7, 4), (1, 3, 2, 3), (9, 40, 11, 10)])
def test_forward_and_gradients_match_a_full_sort(b: int, n_in: int, n_out: int, terms: int) -> None:
    x = torch.randn(b, n_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
    c = geometric_coefficients(0.3, terms, torch.float64)
    assert torch.allclose(sorted_distance(x, w, c), reference(x, w, c), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: sorted_distance(x, w, c), (x, w))
    with torch.no_grad():  # the path without saved indices gives the same values
        assert torch.equal(sorted_distance(x, w, c), sorted_distance(x.detach(), w.detach(), c))


def test_geometric_coefficients_sum_to_at_most_one_and_e1_at_rho_zero() -> None:
    for rho, terms in [(0.3, 10), (0.25, 10), (0.15, 10), (0.9, 50), (0.5, 1)]:
        c = geometric_coefficients(rho, terms)
        assert (c >= 0).all() and (c[1:] <= c[:-1]).all()
        assert math.fsum(c.double().tolist()) <= 1.0
        assert math.fsum(c.double().tolist()) == pytest.approx(1.0, abs=1e-6)
    assert geometric_coefficients(0.0, 10).tolist() == [1.0] + [0.0] * 9
    with pytest.raises(ValueError, match="rho"):
        geometric_coefficients(1.0, 10)


def test_with_coefficients_e1_the_layer_is_the_linf_dist_layer_exactly() -> None:
    linf = LinfDist(37, 21, bias=True)
    with torch.no_grad():
        linf.bias.normal_()
    sort = SortDist(37, 21, bias=True, rho=0.0)
    sort.load_state_dict(
        {**linf.state_dict(), "coefficients": sort.coefficients, "_extra_state": {"p": INF, "rho": 0.0}}
    )
    x = torch.randn(64, 37, requires_grad=True)
    assert torch.equal(sort(x), linf(x))
    g = torch.randn(64, 21)
    # the same sub-gradient (in float64, where no two differences tie: at a tie each layer may pick
    # another of the largest coordinates, both valid sub-gradients)
    x64 = x.detach().double().requires_grad_()
    ours = torch.autograd.grad(sort.double()(x64), x64, g.double())[0]
    theirs = torch.autograd.grad(linf.double()(x64), x64, g.double())[0]
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    assert sort.lipschitz_linf() == 1.0 == linf.lipschitz_linf()


def test_sampled_form_estimates_the_geometric_unit_without_bias() -> None:
    """E over Bernoulli(1 − ρ) masks of the max over the kept coordinates is Σ_k (1 − ρ)ρ^(k−1)·a_(k)."""
    torch.manual_seed(1)
    layer = SortDist(13, 5, rho=0.3, terms=13).train()
    layer.sampling, layer.sample_group = True, 1
    x = torch.randn(1, 13)
    with torch.no_grad():
        samples = layer(x.expand(100_000, 13).contiguous())
        exact = layer.eval()(x)[0]
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert ((mean - exact).abs() < 5 * error + 1e-6).all()
    # at keep probability 1 the sampled form is the ℓp distance itself
    w = torch.randn(5, 13)
    assert torch.equal(sampled_distance(x, w, 8.0, 1.0, 32), lp_distance(x, w, 8.0))


def test_sampled_form_shares_one_mask_per_group_and_is_differentiable() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 30).expand(8, 30).contiguous().requires_grad_()
    x_same = x.detach()[:1].expand(8, 30).contiguous().requires_grad_()
    w = torch.randn(6, 30, requires_grad=True)
    y = sampled_distance(x_same, w, INF, 0.5, 4)
    assert torch.equal(y[0], y[3]) and torch.equal(y[4], y[7])  # one mask per group of 4
    y.sum().backward()
    assert x_same.grad is not None and w.grad is not None and w.grad.abs().sum() > 0


def test_exact_form_ignores_p_and_state_dict_keeps_p_rho_and_coefficients() -> None:
    layer = SortDist(10, 4, rho=0.25, terms=6).eval()
    x = torch.randn(3, 10)
    before = layer(x)
    layer.p = 8.0
    assert torch.equal(layer(x), before)  # the certified function does not depend on p
    copy = SortDist(10, 4, rho=0.5, terms=6)
    copy.load_state_dict(layer.state_dict())
    assert copy.p == 8.0 and copy.rho == 0.25 and torch.equal(copy.coefficients, layer.coefficients)
    with pytest.raises(ValueError, match="p must be"):
        layer.p = 0.5


def test_box_bounds_are_exact_and_attained() -> None:
    torch.manual_seed(3)
    lower = torch.rand(6, 12, dtype=torch.float64) - 0.5
    upper = lower + torch.rand(6, 12, dtype=torch.float64) * 0.6
    w = torch.randn(5, 12, dtype=torch.float64) * 0.5
    c = geometric_coefficients(0.3, 7, torch.float64)
    lo, hi, largest = sorted_distance_bounds(lower, upper, w, c)
    points = lower + torch.rand(4000, *lower.shape, dtype=torch.float64) * (upper - lower)
    values = reference(points.flatten(0, 1), w, c).view(4000, 6, 5)
    assert (values >= lo - 1e-12).all() and (values <= hi + 1e-12).all()
    assert ((points[..., None, :] - w).abs().amax(-1) <= largest + 1e-12).all()
    for b in range(6):  # attained at the coordinate-wise extremes
        for j in range(5):
            far = torch.where((lower[b] - w[j]).abs() > (upper[b] - w[j]).abs(), lower[b], upper[b])
            near = w[j].clamp(lower[b], upper[b])
            assert reference(far[None], w[j : j + 1], c).item() == pytest.approx(hi[b, j].item(), abs=1e-12)
            assert reference(near[None], w[j : j + 1], c).item() == pytest.approx(lo[b, j].item(), abs=1e-12)


def trained_like(arch_params: dict, seed: int = 0) -> nn.Sequential:
    """A ``sortnet-mlp`` for digits with random weights and random MeanShift running means, in eval mode."""
    torch.manual_seed(seed)
    model = models.build("sortnet-mlp", DIGITS, **arch_params)
    for m in model.modules():
        if isinstance(m, MeanShift):
            m.running_mean.normal_(0, 2)
        if isinstance(m, (SortDist, LinfDist)) and m.bias is not None:
            with torch.no_grad():
                m.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("identity_value", [10.0, None])
def test_network_is_one_lipschitz_in_linf_in_normalised_units(identity_value: float | None) -> None:
    """|f(x) − f(x')|∞ ≤ |x − x'|∞ / min(std) on random pairs, far and near, in float64."""
    model = trained_like({"depth": 4, "width": 48, "identity_value": identity_value}).double()
    bound = lipschitz_linf(model)
    assert bound == pytest.approx(1 / DIGITS.std[0])
    torch.manual_seed(1)
    x = torch.rand(512, *DIGITS.shape, dtype=torch.float64)
    for scale in (1.0, 0.1, 1e-3, 1e-6):
        x2 = (x + scale * (torch.rand_like(x) * 2 - 1)).clamp(0, 1)
        with torch.no_grad():
            moved = (model(x) - model(x2)).abs().amax(1)
        distance = (x - x2).flatten(1).abs().amax(1)
        assert (moved <= bound * distance * (1 + 1e-9) + 1e-12).all()
        if scale == 1.0:  # not vacuous: some pairs move a good part of the bound
            assert (moved / (bound * distance)).max() > 0.3


def test_interval_bounds_contain_outputs_and_rounding_enclosure_holds() -> None:
    """The chain's interval bounds hold the float64 outputs; the rounding walk's enclosure holds
    them too and its error bound covers the float32 forward pass at every sampled point."""
    model32 = trained_like({"depth": 4, "width": 32})
    model64 = copy.deepcopy(model32).double()
    torch.manual_seed(2)
    x = torch.rand(8, *DIGITS.shape)
    eps = 0.05
    lower, upper = interval_bounds(model64, (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1))
    body = nn.Sequential(*list(model32)[:-1])  # walk up to the distances (Negate is exact)
    region = walk(body, input_region(x, eps), model_roundoff(model32))
    inside = 0.999 * eps
    points = (x + inside * (torch.rand(300, *x.shape) * 2 - 1)).clamp(0, 1)
    points[:100] = (x + inside * torch.sign(torch.randn(100, *x.shape))).clamp(0, 1)
    with torch.no_grad():
        exact = torch.stack([model64(p.double()) for p in points])  # float64 stands in for exact
        float32 = torch.stack([body(p) for p in points]).double()
    assert (exact >= lower - 1e-9).all() and (exact <= upper + 1e-9).all()
    assert (-exact >= region.lo - 1e-9).all() and (-exact <= region.hi + 1e-9).all()
    assert ((float32 + exact).abs() <= region.err + 1e-9).all()
    assert (region.err > 0).all() and float(region.err.max()) < 1e-3


# --- the certificate ---------------------------------------------------------------------------


def make_method(params: dict, epochs: int = 1, eps: tuple[float, ...] = (0.1,)):
    context = RunContext(DIGITS, epochs, eps, (0.5,), torch.device("cpu"))
    method = get_method("sortnet")(cfg.validate_against(params_schema("sortnet"), params, "params."), context)
    method.check()
    return method


@pytest.fixture(scope="module")
def briefly_trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A depth-3 SortNet trained on digits for 60 steps (p schedule, sampled form, then the exact
    form and its MeanShift averaging), and the first 200 test points."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _, (train, test) = load_split("digits")
    method = make_method({"loss": "v1", "eps_train": 0.15, "exact_epochs": 0.2})
    model = method.build_model("sortnet-mlp", {"depth": 3, "width": 64, "identity_value": None})
    method.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.9, 0.99), eps=1e-10)
    x_train, y_train = train.tensors
    steps = 60
    for step in range(steps):
        idx = torch.randint(0, len(x_train), (128,))
        out = method.loss(model, x_train[idx], y_train[idx], step / steps)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    method.finish(model)
    torch.set_num_threads(threads)
    x, y = test.tensors
    return model.eval(), x[:200], y[:200]


def test_certificate_is_sound_against_many_step_pgd(briefly_trained, one_thread) -> None:
    model, x, y = briefly_trained
    certificate = CERTIFICATES.get("linf-dist")()
    assert certificate.refusal(model) is None
    result = certificate.certify(model, x, y, [0.05, 0.1])
    assert result.extra["lipschitz_bound"] == pytest.approx(1 / DIGITS.std[0], rel=1e-6)
    radius = torch.as_tensor(result.radius, dtype=torch.float32)
    ours = radius > 0
    assert ours.float().mean() > 0.3, "too few certified points: the check below would be weak"
    # the radius is margin / 2 in normalised units, less the rounding allowance
    with torch.no_grad():
        margin = margins(model(x), y).double()
    expected = np.where(margin > 0, margin * DIGITS.std[0] / 2, 0.0)
    assert np.all(result.radius <= expected * (1 + 1e-6))
    assert np.allclose(result.radius, expected, rtol=1e-4, atol=2e-5)
    assert not pgd_flips(
        model, x[ours], y[ours], 0.999 * radius[ours], steps=100, restarts=6, anneal=True
    ).any()
    # the attack has teeth: three times the radius is beaten somewhere
    assert pgd_flips(model, x[ours], y[ours], 3 * radius[ours], steps=40, restarts=2, anneal=True).any()
    # linf-dist-l2 reports the same radius in ℓ2
    l2 = CERTIFICATES.get("linf-dist-l2")().certify(model, x, y, [0.5])
    assert np.array_equal(l2.radius, result.radius)


def test_rho_zero_sortnet_certifies_as_the_linf_dist_net() -> None:
    """``sortnet-mlp`` with ρ = 0 computes the ``linf-dist-mlp`` function; its radii agree up to the
    rounding allowances of the two layer rules."""
    torch.manual_seed(4)
    linf = models.build("linf-dist-mlp", DIGITS, depth=3, width=32)
    sort = models.build("sortnet-mlp", DIGITS, depth=3, width=32, rho=0.0)
    state = sort.state_dict()
    state.update({k: v for k, v in linf.state_dict().items() if not k.endswith("_extra_state")})
    sort.load_state_dict(state)
    for m in (linf, sort):
        for module in m.modules():
            if isinstance(module, MeanShift):
                module.running_mean.fill_(3.0)
    linf.eval(), sort.eval()
    x, y = torch.rand(64, *DIGITS.shape), torch.randint(0, 10, (64,))
    assert torch.equal(linf(x), sort(x))
    certificate = CERTIFICATES.get("linf-dist")()
    a, b = certificate.certify(linf, x, y, [0.01]).radius, certificate.certify(sort, x, y, [0.01]).radius
    assert np.all(b <= a + 1e-12) and np.allclose(a, b, atol=1e-5)


class ScaledSortDist(SortDist):
    """A SortDist subclass that scales its output by 10: 10-Lipschitz, not 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


@pytest.mark.parametrize("name", ["linf-dist", "linf-dist-l2"])
def test_subclass_of_the_layer_is_refused(name: str) -> None:
    model = trained_like({"depth": 3, "width": 16})
    scaled = ScaledSortDist(16, 10, bias=True)
    scaled.load_state_dict(model[6].state_dict())
    model[6] = scaled
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and "ScaledSortDist" in refusal
    with pytest.raises(TypeError, match="ScaledSortDist"):
        lipschitz_linf(model)
    x = torch.rand(1, *DIGITS.shape) * 0.8 + 0.1
    with torch.no_grad():
        moved = float((model(x + 0.05) - model(x)).abs().max())
    assert moved > 0.05 / DIGITS.std[0] * (1 + 1e-3)  # the plain rule would be wrong for it


def test_hooks_and_bad_coefficients_are_refused() -> None:
    model = trained_like({"depth": 3, "width": 16})
    certificate = CERTIFICATES.get("linf-dist")()
    assert certificate.refusal(model) is None
    handle = model[4].register_forward_hook(lambda module, inputs, output: 10 * output)
    refusal = certificate.refusal(model)
    assert refusal is not None and "forward hook" in refusal and "'4'" in refusal
    handle.remove()
    assert certificate.refusal(model) is None
    for bad in (-0.1, math.nan):
        broken = trained_like({"depth": 3, "width": 16})
        broken[4].coefficients[1] = bad
        refusal = certificate.refusal(broken)
        assert refusal is not None and "coefficients" in refusal


def test_other_certificates_refuse_the_layer_with_a_reason() -> None:
    """auto_LiRPA has no bound for the sorted sum and the ℓ2 certificates no rule: each says so."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Flatten(), SortDist(64, 10, bias=True), Negate()
    ).eval()
    for name in CERTIFICATES.names():
        refusal = CERTIFICATES.get(name)().refusal(model)
        if name.startswith("linf-dist"):
            assert refusal is None
        else:
            assert refusal is not None and "SortDist" in refusal, (name, refusal)


def test_split_trunk_and_interval_bounds_take_the_sort_layer() -> None:
    model = trained_like({"depth": 3, "width": 16})
    trunk, head = split_trunk(model)
    assert len(head) == 1 and type(head[0]) is Negate and type(trunk[-1]) is SortDist


# --- the architecture and the method -------------------------------------------------------------


def test_architecture_layers() -> None:
    model = models.build("sortnet-mlp", DIGITS, depth=4, width=24, rho=0.25, terms=5)
    kinds = [type(m) for m in model]
    assert kinds == [
        Normalize,
        nn.Flatten,
        LinfDist,
        MeanShift,
        SortDist,
        MeanShift,
        SortDist,
        MeanShift,
        SortDist,
        Negate,
    ]
    assert all(m.terms == 5 and m.rho == 0.25 for m in model if isinstance(m, SortDist))
    assert model[-2].bias is not None and model[4].bias is None
    with pytest.raises(ConfigError, match="depth"):
        models.build("sortnet-mlp", DIGITS, depth=1)


def test_schedule_sampling_phases_and_mean_shift_averaging() -> None:
    method = make_method({"epochs": [0, 0, 2, 6], "exact_epochs": 2}, epochs=10)
    model = method.build_model("sortnet-mlp", {"depth": 3, "width": 16})
    method.prepare(model)
    model.train()
    layers = [m for m in model if isinstance(m, SortDist)]
    shifts = [m for m in model if isinstance(m, MeanShift)]
    method.set_schedule(model, 0.05)
    assert all(m.p == 8.0 and m.sampling for m in layers) and model[2].p == 8.0
    method.set_schedule(model, 0.7)
    assert all(m.p == INF and m.sampling for m in layers)
    for step in range(1, 4):  # the exact phase: no sampling, MeanShift averages its batch means
        method.set_schedule(model, 0.8 + step / 100)
        assert all(not m.sampling for m in layers) and all(m.momentum == 1 / step for m in shifts)
    state = method.state_dict()
    resumed = make_method({"epochs": [0, 0, 2, 6], "exact_epochs": 2}, epochs=10)
    resumed.load_state_dict(state)
    resumed.set_schedule(model, 0.95)
    assert all(m.momentum == 1 / 4 for m in shifts)
    method.finish(model)
    assert all(not m.sampling for m in layers) and all(m.momentum == 0.1 for m in shifts)
    with pytest.raises(ConfigError, match="exact_epochs"):
        make_method({"exact_epochs": 20}, epochs=10)
    with pytest.raises(ConfigError, match="sortnet"):
        method.prepare(method.build_model("linf-dist-mlp", {"depth": 2, "width": 8}))


def test_weight_decay_reaches_only_the_ce_scale() -> None:
    """The authors' AdamW groups: no decay on the distance layers, the training's on the rest."""
    method = make_method({})
    model = method.build_model("sortnet-mlp", {"depth": 3, "width": 8})
    distance, others = method.parameter_groups(model)
    assert distance["weight_decay"] == 0.0 and "weight_decay" not in others
    assert others["params"] == [model.ce_scale]
    assert len(distance["params"]) + 1 == len(list(model.parameters()))


def test_default_schedule_and_eps_follow_the_authors_mnist_command() -> None:
    method = make_method({}, epochs=1500, eps=(0.1,))
    assert method._epochs() == pytest.approx((0, 0, 100, 1450))
    assert method.eps_train == pytest.approx(0.3)
    assert (method.params["lam_start"], method.params["lam_end"]) == (0.1, 0.001)


def test_interrupted_training_resumes_to_the_same_model(tmp_path, smoke_config, monkeypatch) -> None:
    """Killed inside the exact phase (after 3 of 4 epochs, the last 2 exact), training resumes from
    its checkpoint to the weights and MeanShift means of an uninterrupted run: the masks come from
    the checkpointed generator and the averaging's step count is method state."""
    import certbench.train as training
    from certbench.catalogue import check_config
    from certbench.records import load_tensors

    smoke_config["experiments"] = [
        {
            "method": "sortnet",
            "arch": "sortnet-mlp",
            "arch_params": {"depth": 3, "width": 16},
            "params": {"exact_epochs": 2},
        }
    ]
    smoke_config["training"]["epochs"] = 4
    checked = check_config(smoke_config)
    config = cfg.resolve_run(checked, cfg.runs(checked)[0])
    training.train(config, tmp_path / "reference")
    saves, real_save = [], training.save_tensors

    def save_then_die(path, payload):
        real_save(path, payload)
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_tensors", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "killed")
    monkeypatch.setattr(training, "save_tensors", real_save)
    record = training.train(config, tmp_path / "killed")
    assert record["resumed_from_epoch"] == 3
    a, b = (load_tensors(tmp_path / d / "model.pt") for d in ("killed", "reference"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(33, 70), torch.randn(45, 70)
    c = geometric_coefficients(0.3, 10)
    cpu = sorted_distance(x, w, c)
    xg, wg = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    gpu = sorted_distance(xg, wg, c.cuda())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-5)
    gpu.sum().backward()
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    sorted_distance(xc, wc, c).sum().backward()
    assert torch.allclose(xg.grad.cpu(), xc.grad, atol=1e-5) and torch.allclose(
        wg.grad.cpu(), wc.grad, atol=1e-5
    )
