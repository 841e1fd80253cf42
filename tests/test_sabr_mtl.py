"""``sabr`` (Müller et al. 2023) and ``mtl-ibp`` (De Palma et al. 2024): the small box stays in the
ε-box, the limits λ = 1 and α ∈ {0, 1} give back IBP's and the adversarial loss, the PGD helper, the
L1 penalty, refused parameters and a resumed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bound_methods import bound_method
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from certbench import config as cfg
from certbench.bounds.lirpa import Bounder, input_box
from certbench.catalogue import check_config
from certbench.config import ConfigError
from certbench.data.specs import DATASETS
from certbench.records import load_tensors
from certbench.train import train
from methods._bound_propagation import AdversarialBoundMethod, BoundPropagationMethod, l1_penalty, pgd_linf
from methods.sabr import small_box

SPEC = DATASETS.get("fashion-mnist")


def method(name: str, epochs: int = 4, **params: object) -> BoundPropagationMethod:
    return bound_method(name, SPEC, epochs, **params)


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with pixels at 0, at 1 and in between, as Fashion-MNIST's are."""
    x = torch.rand(n, 1, 28, 28)
    x[:, :, :6] = 0.0
    x[:, :, -6:] = 1.0
    x[:, :, 6:9] = 0.03  # within ε of 0: the ε-box is cut by [0, 1]
    return x, torch.randint(0, 10, (n,))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return method("ibp").build_model("cnn-small", {})


# --- the small box ------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    eps=st.floats(1e-4, 1.0),
    ratio=st.floats(1e-3, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_small_box_lies_in_the_eps_box_and_in_the_unit_cube(
    seed: int, eps: float, ratio: float, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(64, generator=generator, dtype=dtype)
    x[:8], x[8:16] = 0.0, 1.0
    x[16:24] = torch.rand(8, generator=generator, dtype=dtype) * eps  # within ε of 0
    x[24:32] = 1 - torch.rand(8, generator=generator, dtype=dtype) * eps  # within ε of 1
    lower, upper = input_box(x, eps)
    adversarial = lower + torch.rand(64, generator=generator, dtype=dtype) * (upper - lower)
    adversarial[32:40], adversarial[40:48] = lower[32:40], upper[40:48]  # on the faces
    small_lower, small_upper = small_box(x, adversarial, eps, ratio)
    assert bool((lower <= small_lower).all() and (small_upper <= upper).all())  # exactly, no tolerance
    assert bool((small_lower >= 0).all() and (small_upper <= 1).all() and (small_lower <= small_upper).all())
    tau, rounding = ratio * eps, 4 * torch.finfo(dtype).eps
    assert bool((small_upper - small_lower <= 2 * tau + rounding).all())  # radius at most τ
    # as wide as it may be: 2τ, or all of the ε-box where [0, 1] cuts it narrower than 2τ
    expected = torch.minimum(torch.full_like(x, 2 * tau), upper - lower)
    assert torch.allclose(small_upper - small_lower, expected, atol=rounding)
    # it holds the adversarial point it was placed at
    assert bool(((small_lower <= adversarial + rounding) & (adversarial <= small_upper + rounding)).all())


def test_small_box_is_centred_at_the_adversarial_point_away_from_the_faces() -> None:
    x = torch.full((3,), 0.5)
    adversarial = torch.tensor([0.45, 0.5, 0.56])  # ε = 0.1, τ = 0.02: each at least τ inside
    lower, upper = small_box(x, adversarial, 0.1, 0.2)
    assert torch.allclose(lower, adversarial - 0.02) and torch.allclose(upper, adversarial + 0.02)
    lower, upper = small_box(x, torch.tensor([0.4, 0.6, 0.41]), 0.1, 0.2)  # on or near a face: shifted in
    assert torch.allclose(lower, torch.tensor([0.4, 0.56, 0.4])) and torch.allclose(upper, lower + 0.04)


def test_an_explicit_box_is_bounded_as_the_eps_ball_it_equals(model: nn.Module) -> None:
    x, y = batch(4)
    bounder = Bounder()
    ball = bounder.margin_lower_bounds(model, x, y, 0.1, ["IBP", "CROWN"])
    box = bounder.margin_lower_bounds(model, x, y, 0.1, ["IBP", "CROWN"], box=input_box(x, 0.1))
    assert all(torch.equal(ball[m], box[m]) for m in ball)
    with pytest.raises(ValueError, match="ℓ∞ box of the input's shape"):
        bounder.margin_lower_bounds(model, x, y, 0.1, ["IBP"], box=input_box(x[:2], 0.1))


# --- SABR's loss ----------------------------------------------------------------------------------


def test_sabr_with_ratio_one_is_ibp_over_the_eps_box(model: nn.Module) -> None:
    """λ = 1: the centre is pulled to x, and the small box is the ε-box (up to rounding)."""
    x, y = batch()
    sabr, ibp = method("sabr", subselection_ratio=1.0), method("ibp")
    box = sabr.propagation_region(model, x, y, 0.1)
    reference = input_box(x, 0.1)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(box, reference, strict=True))
    (sabr_loss, sabr_error), (ibp_loss, ibp_error) = (m.robust_loss(model, x, y, 0.1) for m in (sabr, ibp))
    assert sabr_loss.item() == pytest.approx(ibp_loss.item(), rel=1e-5) and sabr_error == ibp_error


def test_sabr_bounds_lie_between_ibps_and_the_margins_inside_the_small_box(model: nn.Module) -> None:
    x, y = batch()
    sabr = method("sabr", subselection_ratio=0.4)
    lower_box, upper_box = sabr.propagation_region(model, x, y, 0.1)
    small = sabr.bounder.margin_lower_bounds(model, x, y, 0.1, ["IBP"], box=(lower_box, upper_box))["IBP"]
    full = method("ibp").bounder.margin_lower_bounds(model, x, y, 0.1, ["IBP"])["IBP"]
    assert bool((small >= full - 1e-5).all()) and bool((small > full + 1e-3).any())  # a sub-box: tighter
    others = torch.ones(len(y), 10, dtype=torch.bool)
    others[torch.arange(len(y)), y] = False
    with torch.no_grad():
        for _ in range(8):  # every point of the small box has margins at least the bounds
            point = lower_box + torch.rand_like(x) * (upper_box - lower_box)
            logits = model(point)
            margins = logits.gather(1, y[:, None]) - logits[others].view(len(y), 9)
            assert bool((margins >= small - 1e-4).all())


def test_sabr_with_a_tiny_ratio_is_the_cross_entropy_at_the_adversarial_centre(model: nn.Module) -> None:
    x, y = batch()
    sabr = method("sabr", subselection_ratio=1e-5)
    torch.manual_seed(1)
    lower, upper = sabr.propagation_region(model, x, y, 0.1)
    torch.manual_seed(1)
    robust, _ = sabr.robust_loss(model, x, y, 0.1)
    with torch.no_grad():
        at_centre = F.cross_entropy(model((lower + upper) / 2), y)
    assert robust.item() == pytest.approx(at_centre.item(), rel=1e-3)
    assert robust.item() > F.cross_entropy(model(x), y).item()  # PGD found a worse point than x


# --- MTL-IBP's loss -------------------------------------------------------------------------------


def test_mtl_ibp_with_alpha_one_is_the_ibp_robust_loss(model: nn.Module) -> None:
    x, y = batch()
    (mtl, mtl_error), (ibp, ibp_error) = (
        m.robust_loss(model, x, y, 0.1) for m in (method("mtl-ibp", alpha=1.0), method("ibp"))
    )
    assert torch.equal(mtl, ibp) and mtl_error == ibp_error


CIFAR_2_255_ATTACK = {"attack_steps": 4, "attack_step_size": 0.25, "attack_eps_factor": 2.1}


@pytest.mark.parametrize("attack", [{}, CIFAR_2_255_ATTACK])
def test_mtl_ibp_with_alpha_zero_is_the_adversarial_cross_entropy(model: nn.Module, attack: dict) -> None:
    """α = 0, after the ramp (κ = 0, no warm-up regulariser): the whole loss is CE at the PGD point."""
    x, y = batch()
    mtl = method("mtl-ibp", alpha=0.0, **attack)
    torch.manual_seed(2)
    out = mtl.loss(model, x, y, 1.0)
    torch.manual_seed(2)
    adversarial = mtl.attack(model, x, y, 0.1)
    radius = min(1.0, 0.1 * attack.get("attack_eps_factor", 1.0))
    lower, upper = input_box(x, radius)
    assert bool((lower <= adversarial).all() and (adversarial <= upper).all())
    expected = F.cross_entropy(model(adversarial), y)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.stats["kappa"] == 0.0 and "reg_weight" not in out.stats
    assert out.stats["adversarial_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_mtl_ibp_mixes_the_two_losses_linearly(model: nn.Module) -> None:
    x, y = batch()
    torch.manual_seed(3)
    out = method("mtl-ibp", alpha=0.3).loss(model, x, y, 1.0)
    expected = 0.7 * out.stats["adversarial_loss"] + 0.3 * out.stats["ibp_loss"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.stats["adversarial_loss"] <= out.stats["ibp_loss"]  # a point of the box vs a bound over it


# --- both -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sabr", "mtl-ibp"])
@pytest.mark.parametrize("progress", [0.05, 0.4, 1.0])
def test_losses_are_finite_and_reach_every_parameter(name: str, progress: float) -> None:
    torch.manual_seed(0)
    instance = method(name, l1=1e-5)
    model = instance.build_model("cnn-small", {})
    x, y = batch()
    out = instance.loss(model, x, y, progress)
    assert torch.isfinite(out.loss) and all(torch.isfinite(torch.tensor(v)) for v in out.stats.values())
    out.loss.backward()
    for name_, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name_
        assert parameter.grad.abs().sum() > 0, name_


@pytest.mark.parametrize("name", ["sabr", "mtl-ibp"])
def test_l1_adds_its_weight_times_the_weights_absolute_sum(model: nn.Module, name: str) -> None:
    x, y = batch()
    torch.manual_seed(4)
    plain = method(name).loss(model, x, y, 1.0)
    torch.manual_seed(4)
    penalised = method(name, l1=1e-3).loss(model, x, y, 1.0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = sum(layer.weight.abs().sum().item() for layer in layers)
    assert l1_penalty(model).item() == pytest.approx(weights, rel=1e-6)
    assert penalised.loss.item() == pytest.approx(plain.loss.item() + 1e-3 * weights, rel=1e-5)
    assert penalised.stats["l1_norm"] == pytest.approx(weights, rel=1e-6)


def test_pgd_stays_in_the_box_touches_no_parameter_and_beats_its_random_start(model: nn.Module) -> None:
    x, y = batch()
    lower, upper = input_box(x, 0.1)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    start = lower + torch.rand_like(lower) * (upper - lower)
    torch.manual_seed(5)
    point = pgd_linf(model, lower, upper, y, steps=8, step_size=0.5, decay_at=(0.5, 0.8, 0.9))
    assert bool((lower <= point).all() and (point <= upper).all()) and not point.requires_grad
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        found, started = (F.cross_entropy(model(p), y, reduction="none") for p in (point, start))
    assert bool((found >= started).all()) and found.mean() > started.mean()


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("sabr", {"subselection_ratio": 0.0}, "subselection_ratio"),
        ("sabr", {"subselection_ratio": 1.5}, "subselection_ratio"),
        ("mtl-ibp", {"alpha": 1.5}, "alpha"),
        ("mtl-ibp", {"attack_eps_factor": 0.0}, "attack_eps_factor"),
        ("sabr", {"attack_steps": 0}, "attack_steps"),
        ("mtl-ibp", {"attack_step_size": 0.0}, "attack_step_size"),
        ("sabr", {"l1": -1e-5}, "l1"),
    ],
)
def test_bad_parameters_are_refused_with_the_key_named(name: str, params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        method(name, **params)


def test_a_sabr_run_resumes_to_the_same_model(tmp_path: Path, smoke_config: dict, monkeypatch) -> None:
    """The attack draws its random start from torch's generator, which the checkpoint keeps: a run
    killed after its first epoch resumes to the weights of an uninterrupted one."""
    smoke_config["experiments"] = [
        {
            "method": "sabr",
            "arch": "mlp",
            "arch_params": {"widths": [32, 32]},
            "params": {"schedule_start": 0.5, "schedule_length": 1, "l1": 1e-5},
        }
    ]
    checked = check_config(smoke_config)
    config = cfg.resolve_run(checked, cfg.runs(checked)[0])
    reference = train(config, tmp_path / "reference")
    assert reference["status"] == "ok" and reference["history"][-1]["tau"] > 0
    original = AdversarialBoundMethod.loss

    def killed_in_the_second_epoch(self, model, x, y, progress):  # type: ignore[no-untyped-def]
        if progress >= 0.5:
            raise KeyboardInterrupt
        return original(self, model, x, y, progress)

    monkeypatch.setattr(AdversarialBoundMethod, "loss", killed_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(AdversarialBoundMethod, "loss", original)
    resumed = train(config, tmp_path / "killed")
    assert resumed["resumed_from_epoch"] == 1
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    a, b = (load_tensors(tmp_path / d / "model.pt") for d in ("killed", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)
