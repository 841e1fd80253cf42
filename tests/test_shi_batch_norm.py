"""BatchNorm in bound-propagation training, the third ingredient of Shi et al. (NeurIPS 2021, "Fast
certified robust training with short warmup", their second improvement): the ``batch_norm`` option of
the CNNs, bounds that in training normalise with the clean batch's statistics, running statistics
updated once per step, and sound eval-mode certificates of a trained BatchNorm CNN."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from bound_methods import bound_method
from linf_pgd import pgd_flips
from torch import nn

from certbench import config as cfg
from certbench.bounds.lirpa import Bounder, specification_matrix, unsupported_reason
from certbench.catalogue import check_config
from certbench.certificates import CERTIFICATES, CERTIFIED, margins
from certbench.data.loaders import load_split
from certbench.data.specs import DATASETS
from certbench.models import build
from certbench.nn import Normalize
from methods._bound_propagation import BoundPropagationMethod, batch_statistics, normalised_by

SPEC = DATASETS.get("digits")  # 1×8×8: cnn-small is tiny on it
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def method(name: str, epochs: int = 4, **params: object) -> BoundPropagationMethod:
    return bound_method(name, SPEC, epochs, **params)


def bn_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``cnn-small`` with BatchNorm, statistics and affine maps away from the identity, in training mode."""
    torch.manual_seed(seed)
    model = build("cnn-small", SPEC, batch_norm=True).to(dtype)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, NORMS):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.normal_()
                norm.bias.normal_(0.0, 0.5)
    return model.train()


def batch(
    n: int = 24, seed: int = 1, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SPEC.shape, generator=generator, dtype=dtype)
    return x, torch.randint(0, SPEC.num_classes, (n,), generator=generator)


def running(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone() for m in model.modules() if isinstance(m, NORMS) for t in (m.running_mean, m.running_var)
    ]


def clean_statistics(model: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The test's own: each BatchNorm's input mean and biased variance over the clean batch."""
    stats, h = [], x
    for layer in model:
        if isinstance(layer, NORMS):
            dims = [0, *range(2, h.dim())]
            stats.append((h.mean(dims), h.var(dims, unbiased=False)))
        h = apply(layer, h, stats[-1] if isinstance(layer, NORMS) else None)
    return stats


def apply(layer: nn.Module, h: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if stats is None:
        return layer(h)
    return F.batch_norm(h, stats[0], stats[1], layer.weight, layer.bias, training=False, eps=layer.eps)


def with_statistics(model: nn.Sequential, stats: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor):
    """The network with ``stats`` as constants in its BatchNorms (functional batch_norm)."""
    found, h = iter(stats), x
    for layer in model:
        h = apply(layer, h, next(found) if isinstance(layer, NORMS) else None)
    return h


def margin_rows(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − z_j, j ≠ y, (B, K−1), in the order of :func:`specification_matrix`."""
    spec = specification_matrix(y, logits.shape[1]).to(logits.dtype)
    return torch.einsum("bjk,bk->bj", spec, logits)


def box_points(x: torch.Tensor, eps: float, count: int, seed: int = 2) -> torch.Tensor:
    """``count`` points per sample of [x − ε, x + ε] ∩ [0, 1], corners among them: (count, B, ...)."""
    generator = torch.Generator().manual_seed(seed)
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    u = torch.rand(count, *x.shape, generator=generator, dtype=x.dtype)
    u[: count // 2] = u[: count // 2].round()  # vertices, where IBP's bounds are closest to tight
    return lower + u * (upper - lower)


# --- the architecture option ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cnn-small", "cnn-large"])
def test_batch_norm_option_puts_one_norm_before_every_hidden_relu(arch: str) -> None:
    """BatchNorm2d after each conv, BatchNorm1d after the hidden fc, none after the classifier; the
    default builds exactly the modules of before (state-dict keys and shapes, so stored models load)."""
    plain, normed = build(arch, SPEC), build(arch, SPEC, batch_norm=True)
    assert not any(isinstance(m, NORMS) for m in plain.modules())
    assert normed.training and all(m.training for m in normed.modules())
    layers = list(normed)
    affine = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i in affine[:-1]:
        expected = nn.BatchNorm2d if isinstance(layers[i], nn.Conv2d) else nn.BatchNorm1d
        assert type(layers[i + 1]) is expected and isinstance(layers[i + 2], nn.ReLU)
    assert affine[-1] == len(layers) - 1  # the classifier is last, unnormalised
    assert sum(isinstance(m, NORMS) for m in layers) == len(affine) - 1
    stripped = nn.Sequential(*[m for m in layers if not isinstance(m, NORMS)])
    assert [v.shape for v in stripped.state_dict().values()] == [v.shape for v in plain.state_dict().values()]
    assert list(plain.state_dict()) == list(nn.Sequential(*plain).state_dict())


def test_an_unset_batch_norm_leaves_the_run_hash_alone(smoke_config: dict) -> None:
    """Only method parameters are filled into a run's config (and its hash): a cnn run without
    ``arch_params`` resolves to ``{}`` as before the option existed; ``batch_norm: true`` is a new run."""
    smoke_config["experiments"] = [
        {"method": "ibp", "arch": "cnn-small"},
        {"method": "ibp", "name": "ibp-bn", "arch": "cnn-small", "arch_params": {"batch_norm": True}},
    ]
    checked = check_config(smoke_config)
    resolved = {run.name: cfg.resolve_run(checked, run) for run in cfg.runs(checked)}
    assert resolved["ibp"]["arch_params"] == {}
    assert resolved["ibp-bn"]["arch_params"] == {"batch_norm": True}


# --- (a), (b): the bounds in training mode use the clean batch's statistics -----------------------


BOUNDS = [("IBP", False), ("CROWN-IBP", False), ("IBP", True), ("CROWN-IBP", True)]


@pytest.mark.parametrize(("bound", "fused"), BOUNDS, ids=[f"{b}{'-fused' * f}" for b, f in BOUNDS])
def test_training_bounds_at_eps_zero_equal_the_batch_statistics_output(bound: str, fused: bool) -> None:
    """(a) In training mode, the bounds at ε = 0 of a BatchNorm CNN are its batch-statistics output on
    the batch bounded, for two batches in turn with one Bounder, and the model's running statistics are
    left alone. Failed before, for all four (Bounder without the clean forward pass): the BatchNorm
    nodes normalised with the statistics of an earlier pass (those of the module's construction, in
    eval mode), far beyond rounding."""
    model, bounder = bn_cnn(), Bounder()
    before = running(model)
    for seed in (1, 2):
        x, y = batch(seed=seed)
        if fused:
            bound_value = bounder.fused_cross_entropy_upper_bounds(model, x, y, 0.0, [bound])[bound]
        else:
            bound_value = bounder.margin_lower_bounds(model, x, y, 0.0, [bound])[bound]
        assert all(torch.equal(a, b) for a, b in zip(running(model), before, strict=True))
        with torch.no_grad():
            logits = copy.deepcopy(model)(x)  # a copy: its running statistics move, the model's do not
        exact = F.cross_entropy(logits, y, reduction="none") if fused else margin_rows(logits, y)
        assert torch.allclose(bound_value, exact, atol=2e-5, rtol=1e-5), (bound_value - exact).abs().max()


@pytest.mark.parametrize("region", ["eps-box", "sabr-box", "fused"])
def test_clean_statistics_network_lies_inside_training_bounds(region: str) -> None:
    """(b) In training mode, for random points and vertices of the ε-box (or of a box inside it, as
    SABR's), the network with the clean batch's statistics as constants (functional batch_norm) has
    margins above the IBP and CROWN-IBP lower bounds, and a cross-entropy below the loss-fusion upper
    bounds. float64, so the comparison has no rounding slack to hide in, but for loss fusion
    (auto_LiRPA 0.3's fused CROWN-IBP fails in float64: a scatter of mixed dtypes). Failed before for
    all three regions (the bounds were those of a network normalised by other statistics)."""
    dtype = torch.float32 if region == "fused" else torch.float64
    slack = 1e-4 if region == "fused" else 1e-9
    model = bn_cnn(dtype=dtype)
    x, y = batch(dtype=dtype)
    eps, bounder = 0.03, Bounder()
    with torch.no_grad():
        stats = clean_statistics(model, x)
    points = box_points(x, eps, 64)
    if region == "sabr-box":
        centre = box_points(x, eps, 1, seed=5)[0]
        outer = ((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
        box = (torch.maximum(centre - eps / 4, outer[0]), torch.minimum(centre + eps / 4, outer[1]))
        u = torch.rand(64, *x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
        u[:32] = u[:32].round()
        points = box[0] + u * (box[1] - box[0])
        bounds = bounder.margin_lower_bounds(model, x, y, eps, ["IBP"], box=box)
    elif region == "eps-box":
        bounds = bounder.margin_lower_bounds(model, x, y, eps, ["IBP", "CROWN-IBP"])
    else:
        bounds = bounder.fused_cross_entropy_upper_bounds(model, x, y, eps, ["IBP", "CROWN-IBP"])
    with torch.no_grad():
        logits = torch.stack([with_statistics(model, stats, p) for p in points])
    for name, bound in bounds.items():
        bound = bound.detach()
        if region == "fused":
            worst_ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits]).amax(0)
            assert bool((worst_ce <= bound + slack).all()), (name, (worst_ce - bound).max())
            assert float((bound - worst_ce).mean()) < 1e3  # finite, not +∞
        else:
            worst = torch.stack([margin_rows(z, y) for z in logits]).amin(0)
            assert bool((bound <= worst + slack).all()), (name, (bound - worst).max())
            assert float((worst - bound).mean()) < 1e3  # bounds, not −∞


def test_cached_bounder_follows_the_running_statistics_in_eval_mode() -> None:
    """In eval mode the bounds at ε = 0 equal the running-statistics output, also after the running
    statistics moved since the BoundedModule was built. Failed before: auto_LiRPA clones the buffers
    when it builds the module, so a cached Bounder kept bounding with the statistics of that moment."""
    model, bounder = bn_cnn().eval(), Bounder()
    x, y = batch()
    bounder.margin_lower_bounds(model, x, y, 0.0, ["IBP"])
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, NORMS):
                norm.running_mean.add_(0.5)
                norm.running_var.mul_(1.5)
    lower = bounder.margin_lower_bounds(model, x, y, 0.0, ["IBP", "CROWN-IBP"])
    with torch.no_grad():
        exact = margin_rows(model(x), y)
    for bound in lower.values():
        assert torch.allclose(bound, exact, atol=2e-5, rtol=1e-5)


def test_batch_statistics_are_those_of_a_training_forward_and_update_nothing() -> None:
    """:func:`batch_statistics` / :func:`normalised_by` give the training-mode output and statistics
    without moving the running statistics or the batch counter; eval mode is restored as it was."""
    model = bn_cnn()
    x, _ = batch()
    before = copy.deepcopy(model.state_dict())
    stats = batch_statistics(model, x)
    with normalised_by(model, stats):
        fixed = model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    reference = copy.deepcopy(model)
    assert torch.allclose(fixed, reference(x), atol=1e-5)
    with torch.no_grad():
        expected = clean_statistics(model, x)
    assert all(
        torch.allclose(m, m2, atol=1e-6) and torch.allclose(v, v2, atol=1e-5)
        for (m, v), (m2, v2) in zip(stats.values(), expected, strict=True)
    )
    assert all("forward" not in vars(m) for m in model.modules())  # the layers' own forward is back


# --- (c) one running-statistics update per optimiser step ------------------------------------------

STEPS = [
    ("ibp", {}),
    ("ibp", {"init": "ibp", "warmup_reg": 0.5}),
    ("crown-ibp", {"warmup_reg": 0.5}),
    ("crown-ibp", {"loss_fusion": True}),
    ("sabr", {}),
    ("mtl-ibp", {}),
]


@pytest.mark.parametrize(
    ("name", "params"), STEPS, ids=[f"{n}{'-' * bool(p)}{'-'.join(p)}" for n, p in STEPS]
)
@pytest.mark.parametrize("progress", [0.05, 0.4])  # ε = 0 (warm-up regularisers' own pass), mid-ramp
def test_one_step_updates_the_running_statistics_once_with_the_clean_batch(
    name: str, params: dict, progress: float
) -> None:
    """(c) After one optimiser step on a BatchNorm CNN, the running statistics (and the batch counter)
    are those of one plain training-mode forward pass on the clean batch: the bound pass, the PGD
    search and MTL-IBP's adversarial forward pass move none of them. Failed before for ``mtl-ibp``
    mid-ramp (its adversarial forward pass in training mode updated them a second time, with the
    adversarial batch's statistics); the others held already (auto_LiRPA updates only its copies)."""
    trainer = method(name, **params)
    model = bn_cnn()
    trainer.prepare(model)
    x, y = batch()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step itself changes no weight
    out = trainer.loss(model, x, y, progress)
    assert trainer.epsilon(progress) > 0 or progress < 0.1
    optimiser.zero_grad()
    out.loss.backward()
    optimiser.step()
    assert math.isfinite(out.loss.item()) and model.training
    for (key, value), expected in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.allclose(value.float(), expected.float(), atol=1e-6), key


# --- (d) eval-mode certificates of a trained BatchNorm CNN -----------------------------------------

LIRPA_CERTIFICATES = ("ibp", "crown", "crown-ibp", "cascade")


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``cnn-small`` with BatchNorm, IBP-trained with the Shi recipe on digits for 6 epochs (a few
    seconds on one core), in eval mode; 80 test points."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trainer = method(
        "ibp", epochs=6, eps_train=0.1, schedule_start=1, schedule_length=3, init="ibp", warmup_reg=0.5
    )
    model = trainer.build_model("cnn-small", {"batch_norm": True})
    trainer.prepare(model)
    (_, (train_set, test_set)) = load_split("digits")
    x_train, y_train = train_set.tensors
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    batches = math.ceil(len(x_train) / 128)
    for epoch in range(6):
        order = torch.randperm(len(x_train))
        for index in range(batches):
            chosen = order[index * 128 : (index + 1) * 128]
            out = trainer.loss(model, x_train[chosen], y_train[chosen], (epoch + index / batches) / 6)
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
    x_test, y_test = test_set.tensors
    return model.eval(), x_test[:80], y_test[:80]


def pgd_l2_flips(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int = 40):
    """Which points a margin-loss PGD-ℓ2 (a zero and a random start, step ε/4, projected onto the ball
    ∩ [0, 1]) misclassifies within the ℓ2 radius ``eps`` (per sample)."""
    radius = eps.view(-1, 1, 1, 1)
    found = torch.zeros(len(x), dtype=torch.bool)
    for start in range(2):
        delta = torch.zeros_like(x) if start == 0 else torch.randn_like(x) * radius / math.sqrt(x[0].numel())
        for _ in range(steps):
            adv = (x + delta).clamp(0, 1).requires_grad_()
            (grad,) = torch.autograd.grad(-margins(model(adv), y).sum(), adv)
            norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
            delta = (x + delta + radius / 4 * grad / norm).clamp(0, 1) - x
            length = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.minimum(torch.ones_like(length), radius / length.clamp(min=1e-12))
            with torch.no_grad():
                found |= model((x + delta).clamp(0, 1)).argmax(1) != y
    return found


def test_certificates_of_a_trained_batch_norm_cnn_are_sound_against_pgd(trained) -> None:
    """(d) In eval mode, ``ibp``, ``crown``, ``crown-ibp`` and ``cascade`` (its α-CROWN stage cut to 2
    iterations) at ℓ∞ ε = 0.1 certify points of the BatchNorm CNN (non-trivially) and none that PGD
    flips, while PGD flips points at ε = 0.2 (the attack has teeth); ``lipschitz-l2``'s radius is never
    beaten by PGD-ℓ2 at 0.999 of it, and is by PGD-ℓ2 at 3 times the margin over the input's scale."""
    model, x, y = trained
    assert not model.training
    certificates = {
        "ibp": CERTIFICATES.get("ibp")(),
        "crown": CERTIFICATES.get("crown")(),
        "crown-ibp": CERTIFICATES.get("crown-ibp")(),
        "cascade": CERTIFICATES.get("cascade")(alpha_iterations=2),
        "lipschitz-l2": CERTIFICATES.get("lipschitz-l2")(),
    }
    for name, certificate in certificates.items():
        assert certificate.refusal(model) is None, name
    flipped = pgd_flips(model, x, y, torch.full((len(x),), 0.1))
    certified = {}
    for name in LIRPA_CERTIFICATES:
        result = certificates[name].certify(model, x, y, [0.1])
        certified[name] = torch.as_tensor(result.status[0.1] == CERTIFIED)
        assert not (certified[name] & flipped).any(), name
    assert certified["ibp"].sum() >= 5 and certified["crown"].sum() > certified["ibp"].sum()
    assert (certified["cascade"] >= certified["crown"]).all()
    assert pgd_flips(model, x, y, torch.full((len(x),), 0.2)).any()
    radius = torch.as_tensor(certificates["lipschitz-l2"].certify(model, x, y, [0.5]).radius, dtype=x.dtype)
    ours = radius > 0
    assert ours.sum() >= 5
    assert not pgd_l2_flips(model, x[ours], y[ours], 0.999 * radius[ours]).any()
    assert pgd_l2_flips(model, x[ours], y[ours], 3 * radius[ours] + 0.5).any()


def test_batch_norm_without_running_statistics_is_still_refused() -> None:
    """The applicability rule for BatchNorm holds on the BatchNorm CNN: without running statistics
    (it normalises by the batch at test time too) every certificate and the training methods refuse it."""
    model = build("cnn-small", SPEC, batch_norm=True)
    for index, layer in enumerate(model):
        if isinstance(layer, NORMS):
            model[index] = type(layer)(layer.num_features, track_running_stats=False)
    model.eval()
    assert "track_running_stats" in unsupported_reason(model)
    for name in (*LIRPA_CERTIFICATES, "lipschitz-l2"):
        refusal = CERTIFICATES.get(name)().refusal(model)
        assert refusal is not None and ("running stat" in refusal or "running_stats" in refusal), refusal
    with pytest.raises(Exception, match="track_running_stats"):
        method("ibp").prepare(model)
    assert isinstance(model[0], Normalize)
