"""Shi et al. (NeurIPS 2021) short-warm-up options of ``ibp`` and ``crown-ibp``: IBP initialisation,
the warm-up regularisers, defaults that change nothing, and resuming a run that uses them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from certbench import config as cfg
from certbench.bounds.lirpa import Bounder
from certbench.catalogue import check_config
from certbench.config import ConfigError
from certbench.data.specs import DATASETS
from certbench.method import RunContext, get_method
from certbench.records import load_tensors
from certbench.storage import read_json
from certbench.train import train
from methods._bound_propagation import BoundPropagationMethod, warmup_regularisers

SHI = {"init": "ibp", "warmup_reg": 0.5, "warmup_tau": 0.5}


def method(name: str = "ibp", epochs: int = 4, **params: object) -> BoundPropagationMethod:
    spec = DATASETS.get("fashion-mnist")
    cls = get_method(name)
    filled = cfg.check_params(cls.params_schema, {"eps_train": 0.1, **params}, f"{name}.")
    instance = cls(filled, RunContext(spec, epochs, spec.eps_linf, spec.eps_l2, torch.device("cpu")))
    instance.check()
    return instance


def affine(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


CNN_SMALL_FAN_INS = [1 * 4 * 4, 16 * 4 * 4, 32 * 7 * 7]  # conv: in_channels·k·k; linear: in_features


@pytest.mark.parametrize(("arch", "fan_ins"), [("cnn-small", CNN_SMALL_FAN_INS), ("mlp", [784, 256])])
def test_ibp_init_draws_each_hidden_layer_with_the_papers_sigma(arch: str, fan_ins: list[int]) -> None:
    torch.manual_seed(0)
    default = method().build_model(arch, {})
    torch.manual_seed(0)
    model = method(init="ibp").build_model(arch, {})
    layers, reference = affine(model), affine(default)
    assert len(layers) == len(fan_ins) + 1
    for layer, fan_in in zip(layers, fan_ins, strict=False):
        sigma = math.sqrt(2 * math.pi) / fan_in  # σ = √(2π)/n_in, conv: n_in = in_channels·k·k
        assert layer.weight.mean().abs() < 4 * sigma / math.sqrt(layer.weight.numel())
        assert layer.weight.std().item() == pytest.approx(sigma, rel=0.1)
    # the classifier and every bias keep PyTorch's initialisation, as in the authors' code
    assert torch.equal(layers[-1].weight, reference[-1].weight)
    assert all(torch.equal(a.bias, b.bias) for a, b in zip(layers, reference, strict=True))


def interval_gains(model: nn.Module, x: torch.Tensor) -> list[float]:
    """E(Δ_i)/E(Δ_0) of every ReLU input of ``model`` over the 0.01-box around ``x`` (IBP)."""
    bounder = Bounder()
    with torch.no_grad():
        bounder.margin_lower_bounds(model, x, torch.zeros(len(x), dtype=torch.long), 0.01, ["IBP"])
        (l0, u0), layers = bounder.preactivation_bounds()
    width0 = (u0 - l0).mean()
    return [float((upper - lower).mean() / width0) for lower, upper in layers]


def test_ibp_init_keeps_interval_widths_where_the_default_lets_them_grow() -> None:
    x = torch.rand(64, 1, 28, 28)
    torch.manual_seed(0)
    default = interval_gains(method().build_model("mlp", {"widths": [512, 512, 512]}), x)
    torch.manual_seed(0)
    ibp = interval_gains(method(init="ibp").build_model("mlp", {"widths": [512, 512, 512]}), x)
    assert all(0.4 < g < 2.5 for g in ibp), ibp
    assert default[-1] > 10 * ibp[-1], (default, ibp)


def test_preactivation_bounds_are_the_ibp_intervals_of_the_relu_inputs() -> None:
    torch.manual_seed(0)
    model = method().build_model("mlp", {"widths": [16, 8]})
    x, eps = torch.rand(5, 1, 28, 28), 0.05
    bounder = Bounder()
    bounder.margin_lower_bounds(model, x, torch.zeros(5, dtype=torch.long), eps, ["IBP"])
    (l0, u0), layers = bounder.preactivation_bounds()
    normalize, _, fc1, _, fc2, _, _ = model
    lower = normalize((x - eps).clamp(0, 1)).flatten(1)
    upper = normalize((x + eps).clamp(0, 1)).flatten(1)
    assert torch.allclose(l0.flatten(1), lower, atol=1e-6) and torch.allclose(u0.flatten(1), upper, atol=1e-6)
    expected = []
    for fc in (fc1, fc2):
        center, radius = (upper + lower) / 2, (upper - lower) / 2
        center, radius = fc(center), radius @ fc.weight.abs().T
        expected.append((center - radius, center + radius))
        lower, upper = expected[-1][0].relu(), expected[-1][1].relu()
    assert len(layers) == 2
    for (lo, up), (elo, eup) in zip(layers, expected, strict=True):
        assert torch.allclose(lo, elo, atol=1e-5) and torch.allclose(up, eup, atol=1e-5)


@pytest.mark.parametrize("name", ["ibp", "crown-ibp"])
def test_defaults_leave_the_loss_unchanged_and_lambda_zero_adds_nothing(name: str) -> None:
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    plain = method(name)
    model = plain.build_model("cnn-small", {})
    off = method(name, warmup_reg=0.0, warmup_tau=0.3)
    for progress in (0.0, 0.3, 0.6, 1.0):
        a, b = plain.loss(model, x, y, progress), off.loss(model, x, y, progress)
        assert torch.equal(a.loss, b.loss) and a.stats == b.stats
        assert not any(key.startswith("reg_") for key in a.stats)


@pytest.mark.parametrize(
    ("name", "options"), [("ibp", {}), ("crown-ibp", {}), ("crown-ibp", {"loss_fusion": True})]
)
def test_regulariser_is_on_during_the_warm_up_and_zero_after_it(name: str, options: dict) -> None:
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    # PyTorch's initialisation, whose bounds grow layer to layer: the regulariser is positive
    shi, plain = method(name, warmup_reg=0.5, **options), method(name, **options)
    model = shi.build_model("cnn-small", {})
    start, length = shi.ramp_epochs()
    before, during, after = 0.5 * start / 4, (start + 0.5 * length) / 4, 1.0
    for progress in (before, during):
        out = shi.loss(model, x, y, progress)
        weight, eps = out.stats["reg_weight"], shi.epsilon(progress)
        assert weight == pytest.approx(0.5 * (1 - eps / 0.1)) and weight > 0
        assert out.stats["reg_tightness"] > 0
        added = weight * (out.stats["reg_tightness"] + out.stats["reg_relu"])
        assert out.loss.item() == pytest.approx(plain.loss(model, x, y, progress).loss.item() + added)
    assert shi.reg_weight(shi.epsilon(after)) == 0.0
    a, b = shi.loss(model, x, y, after), plain.loss(model, x, y, after)
    assert torch.equal(a.loss, b.loss) and "reg_weight" not in a.stats


def toy(scale: float, bias: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    with torch.no_grad():
        for layer in affine(model):
            layer.weight.mul_(scale)
            layer.bias.fill_(bias)
    return model


def regularise(model: nn.Module, steps: int, key: str) -> list[dict[str, float]]:
    """``steps`` Adam steps on the regulariser ``key`` alone; the regularisers before and after."""
    x, y = torch.rand(32, 1, 1, 20), torch.zeros(32, dtype=torch.long)
    bounder, optimiser = Bounder(), torch.optim.Adam(model.parameters(), lr=0.01)
    seen = []
    for _ in range(steps + 1):
        bounder.margin_lower_bounds(model, x, y, 0.05, ["IBP"])
        reference, layers = bounder.preactivation_bounds()
        reg = warmup_regularisers(reference, layers, 0.5)
        width0 = (reference[1] - reference[0]).mean().item()
        gains = [(upper - lower).mean().item() / width0 for lower, upper in layers]
        seen.append({k: v.item() for k, v in reg.items()} | {"gains": gains})
        optimiser.zero_grad()
        reg[key].backward()
        optimiser.step()
    return [seen[0], seen[-1]]


def test_tightness_regulariser_shrinks_the_interval_growth_of_a_toy_net() -> None:
    first, last = regularise(toy(scale=3.0, bias=0.0), steps=20, key="tightness")
    assert first["tightness"] > 0.5 and max(first["gains"]) > 4
    assert last["tightness"] < first["tightness"] / 2
    assert max(last["gains"]) < max(first["gains"]) / 2


def test_relu_regulariser_balances_a_net_whose_relus_are_mostly_off() -> None:
    first, last = regularise(toy(scale=1.0, bias=-0.3), steps=20, key="relu")
    assert first["relu"] > 0.5
    assert last["relu"] < first["relu"] / 2


def test_warmup_regularisers_match_their_formulas_on_a_hand_made_layer() -> None:
    reference = (torch.zeros(1, 4), torch.ones(1, 4))  # E(Δ_0) = 0.5
    lower = torch.tensor([[1.0, 2.0, -4.0, -1.0]])  # two active, two inactive neurons
    upper = torch.tensor([[3.0, 4.0, -2.0, 1.0]])  # Δ = 1: gain 2, E(Δ_0)/E(Δ) = 0.5
    reg = warmup_regularisers(reference, [(lower, upper)], tau=0.8)
    assert reg["tightness"].item() == pytest.approx((0.8 - 0.5) / 0.8)
    # c = [2, 3, -3, 0]: mean ratio (5/4)/(3/4) → 0.6; c̄ = 0.5, spreads 2.25 + 6.25 vs 12.25 → 8.5/12.25
    expected = (0.8 - 0.6) / 0.8 + max(0.0, 0.8 - 8.5 / 12.25) / 0.8
    assert reg["relu"].item() == pytest.approx(expected)
    none = warmup_regularisers(reference, [(-torch.ones(1, 4), torch.ones(1, 4))], tau=0.5)
    assert none["relu"].item() == 0.0  # no stable neuron: 0/0, the layer adds nothing


@pytest.mark.parametrize(
    ("params", "message"),
    [({"warmup_tau": 0.0}, "warmup_tau"), ({"warmup_reg": -1.0}, "warmup_reg"), ({"init": "xavier"}, "init")],
)
def test_bad_options_are_refused_with_the_key_named(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        method(**params)


def test_a_run_with_the_recipe_resumes_to_the_same_model(
    tmp_path: Path, smoke_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe keeps no state beyond the model (the IBP initialisation is the model's first
    weights, the regulariser weight a function of ε): a run killed after its first epoch resumes
    to the weights of an uninterrupted one."""
    smoke_config["experiments"] = [
        {
            "method": "ibp",
            "arch": "mlp",
            "arch_params": {"widths": [32, 32]},
            "params": {**SHI, "schedule_start": 0.5, "schedule_length": 1},
        }
    ]
    smoke_config["training"]["epochs"] = 2
    checked = check_config(smoke_config)
    config = cfg.resolve_run(checked, cfg.runs(checked)[0])
    reference = train(config, tmp_path / "reference")
    assert reference["status"] == "ok" and all(h["reg_weight"] > 0 for h in reference["history"])
    assert get_method("ibp")(config["params"], None).state_dict() == {}

    original = BoundPropagationMethod.loss

    def killed_in_the_second_epoch(self, model, x, y, progress):  # type: ignore[no-untyped-def]
        if progress >= 0.5:
            raise KeyboardInterrupt
        return original(self, model, x, y, progress)

    monkeypatch.setattr(BoundPropagationMethod, "loss", killed_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(BoundPropagationMethod, "loss", original)
    resumed = train(config, tmp_path / "killed")
    assert resumed["resumed_from_epoch"] == 1
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    a, b = (load_tensors(tmp_path / d / "model.pt") for d in ("killed", "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(tmp_path / "killed" / "train.json")["status"] == "ok"
