"""Attacks: success on an undefended model, our own verification, exact distances of affine models, errors."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certbench.attacks import ATTACKS, FIELDS, Attack, attack_table, column, format_eps
from certbench.attacks.base import project
from certbench.nn import Normalize

LARGE_EPS = {"linf": 0.5, "l2": 4.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only adds contention (25× slower
    here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An undefended MLP on sklearn digits (inputs /16), trained for about a second; 96 test samples."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.target)
    model = nn.Sequential(
        Normalize([0.3051], [0.3783]), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        for batch in torch.randperm(1500).split(100):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    x_test, y_test = x[1500:1596], y[1500:1596]
    assert (model(x_test).argmax(1) == y_test).float().mean() > 0.85
    return model, x_test, y_test


def test_registry_holds_the_six_foolbox_attacks_with_norm_and_kind() -> None:
    kinds = {
        name: (Attack(name).norm, Attack(name).kind)
        for name in ATTACKS.names()
        if ATTACKS.get(name).runner.__module__ == "certbench.attacks.foolbox_attacks"
    }
    assert kinds == {
        "deepfool-l2": ("l2", "minimal"),
        "cw-l2": ("l2", "minimal"),
        "ddn-l2": ("l2", "minimal"),
        "fmn-linf": ("linf", "minimal"),
        "pgd-linf": ("linf", "eps"),
        "pgd-l2": ("l2", "eps"),
    }


def test_registry_holds_autoattack_for_both_norms_at_fixed_eps_with_the_papers_defaults() -> None:
    kinds = {
        name: (Attack(name).norm, Attack(name).kind, Attack(name).settings)
        for name in ATTACKS.names()
        if ATTACKS.get(name).runner.__module__ == "certbench.attacks.autoattack"
    }
    standard = {"steps": 100, "n_queries": 5000, "n_restarts": 1, "n_target_classes": 9}
    assert kinds == {"autoattack-linf": ("linf", "eps", standard), "autoattack-l2": ("l2", "eps", standard)}


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_beats_undefended_model_and_results_are_self_consistent(digits, name: str) -> None:
    model, x, y = digits
    attack = Attack(name)
    eps = LARGE_EPS[attack.norm] if attack.kind == "eps" else None
    result = attack.run(model, x, y, eps, seed=0)
    correct = result.clean_pred == y.numpy()
    assert not result.error.any()
    own_norm = result.l2 if attack.norm == "l2" else result.linf
    beaten = result.success & (own_norm <= LARGE_EPS[attack.norm])
    assert beaten[correct].mean() >= 0.9, f"{name}: only {beaten[correct].mean():.2f} of correct samples"
    # Misclassified samples count as success with the clean input and norm 0.
    assert result.success[~correct].all()
    assert torch.equal(result.x_adv[torch.from_numpy(~correct)], x[torch.from_numpy(~correct)])
    # Examples in the box, norms measured on the returned example, success re-checked by a forward pass.
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    delta = (result.x_adv.double() - x.double()).flatten(1)
    hit = result.success
    np.testing.assert_allclose(result.l2[hit], delta.norm(dim=1).numpy()[hit], rtol=1e-12)
    np.testing.assert_allclose(result.linf[hit], delta.abs().amax(1).numpy()[hit], rtol=1e-12)
    assert np.isinf(result.l2[~hit]).all() and np.isinf(result.linf[~hit]).all()
    with torch.no_grad():
        assert np.array_equal(model(result.x_adv).argmax(1).numpy() != y.numpy(), result.success)
    if eps is not None:
        assert own_norm[hit].max() <= eps  # exactly: measured in float64 on the returned float32 example


def _affine_problem(n: int = 256) -> tuple[nn.Module, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """An affine classifier on inputs in [0.3, 0.7]^64 and its exact minimal ℓ2 and ℓ∞ adversarial distances.

    For f(x) = Wx + b the smallest perturbation to reach class k has ‖δ‖_p = (f_y − f_k) / ‖w_y − w_k‖_q
    with q the dual norm (Moosavi-Dezfooli et al. 2016, Eq. 4 generalised); distances below 0.3 are
    not affected by the box [0, 1].
    """
    torch.manual_seed(1)
    linear = nn.Linear(64, 10)
    with torch.no_grad():  # all logits equal at the centre 0.5, so many points lie near a boundary
        linear.bias.copy_(-0.5 * linear.weight.sum(1))
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.3 + 0.4 * torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        logits = model(x).double()
        y = logits.argmax(1)
        w = linear.weight.double()
        dw = w[y][:, None, :] - w[None, :, :]
        margin = logits.gather(1, y[:, None]) - logits
        own = torch.arange(10)[None] == y[:, None]
        d2 = (margin / dw.norm(dim=2)).masked_fill(own, torch.inf).amin(1).numpy()
        dinf = (margin / dw.abs().sum(dim=2)).masked_fill(own, torch.inf).amin(1).numpy()
    return model, x, y, d2, dinf


@pytest.mark.parametrize(
    ("name", "median_upper"), [("deepfool-l2", 1.025), ("cw-l2", 1.05), ("ddn-l2", 1.5), ("fmn-linf", 1.01)]
)
def test_minimum_norm_attacks_on_affine_model_near_exact_distance(name: str, median_upper: float) -> None:
    model, x, y, d2, dinf = _affine_problem()
    attack = Attack(name)
    exact = d2 if attack.norm == "l2" else dinf
    # Points very close to the boundary make relative gaps meaningless (DeepFool adds 1e-4, DDN's ε
    # shrinks by at most (1 − γ)^steps); keep the others.
    kept = exact > (0.02 if attack.norm == "l2" else 0.005)
    assert kept.sum() >= 50
    result = attack.run(model, x, y)
    found = (result.l2 if attack.norm == "l2" else result.linf)[kept]
    assert result.success[kept].mean() >= 0.95
    ratio = found[result.success[kept]] / exact[kept][result.success[kept]]
    # No attack can beat the exact minimal distance: a smaller measured norm is a measuring bug.
    assert ratio.min() >= 1 - 1e-4
    assert np.median(ratio) <= median_upper
    if (
        name == "deepfool-l2"
    ):  # on an affine model DeepFool lands on the boundary in one step, plus 2 % overshoot
        assert ratio.max() <= 1.03


@pytest.mark.parametrize(("name", "eps"), [("autoattack-linf", 0.01), ("autoattack-l2", 0.1)])
def test_autoattack_on_affine_model_breaks_exactly_the_points_within_eps(name: str, eps: float) -> None:
    """On an affine model the exact minimal distance d of every point is known, and FAB-T's step, a
    projection onto the linearised decision boundary (Croce & Hein 2020, "Minimally distorted
    adversarial examples with a fast adaptive boundary attack", Sec. 2), is exact there for each of
    the 9 target classes: AutoAttack breaks every point with d below ε (with a margin for FAB's
    final search) and none with d above ε, as its examples are projected into the ε-ball."""
    model, x, y, d2, dinf = _affine_problem(64)
    exact = d2 if name.endswith("l2") else dinf
    within, beyond = exact < 0.9 * eps, exact > 1.01 * eps
    assert within.sum() >= 20 and beyond.sum() >= 5
    result = Attack(name, n_queries=100).run(model, x, y, eps, seed=0)
    assert not result.error.any()
    assert result.success[within].all()
    assert not result.success[beyond].any()


@pytest.mark.parametrize(
    ("name", "settings_", "message"),
    [
        ("pgd-linf", {"steps": 0}, "pgd-linf.steps: 0 is less than the minimum of 1"),
        ("deepfool-l2", {"steps": -3}, "deepfool-l2.steps: -3 is less than the minimum of 1"),
        ("cw-l2", {"binary_search_steps": 2.5}, "binary_search_steps: 2.5 is not of type 'integer'"),
        ("cw-l2", {"stepsize": 0.0}, "stepsize: 0.0 is less than or equal to the minimum of 0"),
        ("ddn-l2", {"gamma": 1.0}, "gamma: 1.0 is greater than or equal to the maximum of 1"),
        ("pgd-l2", {"random_start": 1}, "random_start: 1 is not of type 'boolean'"),
        ("fmn-linf", {"step": 10}, "fmn-linf.step: unknown key; allowed: steps, max_stepsize"),
        ("autoattack-l2", {"n_queries": 0}, "autoattack-l2.n_queries: 0 is less than the minimum of 1"),
        (
            "pgd-linf",
            {"rel_stepsize": float("nan")},
            "pgd-linf.rel_stepsize: must be a finite number, got nan",
        ),
    ],
)
def test_bad_settings_rejected_with_one_line(name: str, settings_: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Attack(name, **settings_)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_attack_lists_known_names() -> None:
    with pytest.raises(KeyError, match="pgd-linf"):
        Attack("pgd-l3")


class CountingModel(nn.Module):
    """A model that counts its forward calls and raises when ``fail(x)`` holds."""

    def __init__(self, inner: nn.Module, fail=lambda x: False) -> None:
        super().__init__()
        self.inner, self.fail, self.calls = inner, fail, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail(x):
            raise RuntimeError("deliberate failure")
        return self.inner(x)


@pytest.mark.parametrize(
    ("name", "eps", "message"),
    [
        ("pgd-linf", 1.5, "eps must lie in [0, 1]"),
        ("pgd-linf", -0.1, "eps must lie in [0, 1]"),
        ("pgd-l2", 8.5, "eps must lie in [0, 8]"),
        ("pgd-l2", None, "needs eps"),
        ("deepfool-l2", 0.5, "takes no eps"),
    ],
)
def test_bad_eps_rejected_before_running(digits, name: str, eps: float | None, message: str) -> None:
    model, x, y = digits
    counting = CountingModel(model)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Attack(name).run(counting, x, y, eps)
    assert counting.calls == 0


def test_inputs_outside_the_box_rejected(digits) -> None:
    model, x, y = digits
    with pytest.raises(ValueError, match="inputs must lie in"):
        Attack("deepfool-l2").run(model, x * 2 - 0.5, y)


def test_model_raising_inside_attack_gives_error_not_robust(digits, caplog) -> None:
    model, x, y = digits
    broken = CountingModel(model, fail=lambda x: x.requires_grad)  # the clean pass works, gradients do not
    with caplog.at_level(logging.WARNING, logger="certbench.attacks.base"):
        result = Attack("deepfool-l2").run(broken, x, y)
    correct = result.clean_pred == y.numpy()
    assert result.error[correct].all() and not result.success[correct].any()
    assert np.isnan(result.l2[correct]).all() and np.isnan(result.linf[correct]).all()
    assert result.success[~correct].all() and not result.error[~correct].any()
    assert "deliberate failure" in result.error_message() and "deliberate failure" in caplog.text
    assert torch.equal(result.x_adv, x)


def test_table_records_failing_batch_and_goes_on(digits) -> None:
    model, x, y = digits
    broken = CountingModel(model, fail=lambda x: len(x) == 7)  # only the last batch: 39 = 2·16 + 7
    x, y = x[:39], y[:39]
    table = attack_table(broken, x, y, ["deepfool-l2", "pgd-linf"], {"linf": [0.3]}, batch_size=16)
    for attack, eps in [("deepfool-l2", None), ("pgd-linf", 0.3)]:
        error = table[column("error", attack, eps)]
        assert error[32:].all() and not error[:32].any()
        assert not table[column("success", attack, eps)][32:].any()
        assert (table[column("error_msg", attack, eps)][32:] != "").all()
        assert (table[column("error_msg", attack, eps)][:32] == "").all()
        assert table[column("success", attack, eps)][:32].mean() > 0.5
    assert (table["clean_pred"][32:] == -1).all() and (table["clean_pred"][:32] >= 0).all()


def test_table_columns_match_single_runs(digits) -> None:
    model, x, y = digits
    table = attack_table(
        model, x, y, [Attack("pgd-l2", steps=10), "fmn-linf"], {"l2": [0.5, 1.0]}, batch_size=40, seed=3
    )
    expected = (
        {"label", "clean_pred"}
        | {column(f, "fmn-linf") for f in FIELDS}
        | {column(f, "pgd-l2", e) for f in FIELDS for e in (0.5, 1.0)}
    )
    assert set(table) == expected
    assert all(len(values) == len(x) for values in table.values())
    single = Attack("pgd-l2", steps=10).run(model, x[40:80], y[40:80], 1.0, seed=4)
    np.testing.assert_array_equal(table["adv_l2:pgd-l2@1"][40:80], single.l2)
    # A stronger ε never lowers the success rate much on an undefended model, and ε bounds the norm.
    assert table["success:pgd-l2@1"].mean() >= table["success:pgd-l2@0.5"].mean()
    assert np.nanmax(np.where(table["success:pgd-l2@0.5"], table["adv_l2:pgd-l2@0.5"], 0)) <= 0.5


def test_table_rejects_missing_eps_and_repeated_columns(digits) -> None:
    model, x, y = digits
    with pytest.raises(ValueError, match="no linf eps"):
        attack_table(model, x, y, ["pgd-linf"], {"l2": [0.5]})
    with pytest.raises(ValueError, match="columns would repeat"):
        attack_table(model, x, y, ["pgd-linf", Attack("pgd-linf", steps=5)], {"linf": [0.1]})


def test_library_output_is_projected_and_reverified(digits) -> None:
    """A runner that returns examples far outside ball and box: we project, clip and re-check."""
    model, x, y = digits
    attack = Attack("pgd-linf")
    attack.spec = dataclasses.replace(
        attack.spec, runner=lambda m, xs, ys, eps, s: xs + 3.0 * torch.randn_like(xs)
    )
    result = attack.run(model, x, y, 0.05, seed=0)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.x_adv.double() - x.double()).abs().max() <= 0.05
    with torch.no_grad():
        assert np.array_equal(model(result.x_adv).argmax(1).numpy() != y.numpy(), result.success)

    attack.spec = dataclasses.replace(attack.spec, runner=lambda m, xs, ys, eps, s: xs * torch.nan)
    result = attack.run(model, x, y, 0.05)
    correct = result.clean_pred == y.numpy()
    assert result.error[correct].all() and not result.success[correct].any()
    assert "non-finite" in result.error_message()


@settings(max_examples=30, deadline=None)
@given(
    norm=st.sampled_from(["l2", "linf"]),
    eps=st.floats(0.0, 2.0),
    scale=st.floats(0.0, 10.0),
    seed=st.integers(0, 2**16),
)
def test_projection_lands_in_box_and_ball(norm: str, eps: float, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 5, 5, generator=generator)
    raw = x + scale * torch.randn(x.shape, generator=generator)
    out = project(raw, x, norm, eps)
    assert out.min() >= 0 and out.max() <= 1
    delta = (out.double() - x.double()).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
    assert (size <= eps).all()  # exactly, in float64
    # ... and it is the Euclidean projection up to float32 rounding, not a cruder pull towards x.
    wide = raw.double() - x.double()
    if norm == "linf":
        ideal = wide.clamp(-eps, eps)
    else:
        ideal = wide * (eps / wide.flatten(1).norm(dim=1).clamp_min(1e-300)).clamp(max=1).view(-1, 1, 1, 1)
    ideal = (x.double() + ideal).clamp(0, 1)
    assert (out.double() - ideal).abs().max() <= 1e-6


def test_eps_in_column_names_matches_certificate_keys() -> None:
    # Certificates key their status by f"{eps:g}"; the audit pairs columns by that text.
    assert column("success", "pgd-linf", 8 / 255) == "success:pgd-linf@0.0313725"
    assert column("adv_l2", "pgd-l2", 1.0) == "adv_l2:pgd-l2@1" and format_eps(1.58) == "1.58"
    assert column("error", "fmn-linf") == "error:fmn-linf"
    with pytest.raises(ValueError, match="unknown field"):
        column("norm", "fmn-linf")


def test_numpy_scalars_accepted_as_eps_and_settings(digits) -> None:
    model, x, y = digits
    result = Attack("pgd-linf", steps=np.int64(5)).run(model, x[:8], y[:8], np.float32(0.25))
    assert result.eps == float(np.float32(0.25)) and result.linf[result.success].max() <= 0.25


@pytest.mark.parametrize(
    ("name", "settings_"), [("pgd-linf", {"steps": 5}), ("autoattack-linf", {"steps": 5, "n_queries": 20})]
)
def test_model_state_restored_and_rng_untouched(digits, name: str, settings_: dict) -> None:
    model, x, y = digits
    model.train()
    model.zero_grad(set_to_none=True)
    state = torch.random.get_rng_state()
    first = Attack(name, **settings_).run(model, x, y, 0.1, seed=7)
    second = Attack(name, **settings_).run(model, x, y, 0.1, seed=7)
    assert torch.equal(first.x_adv, second.x_adv)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    model.eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["pgd-linf", "autoattack-linf"])
def test_runs_on_the_models_device(digits, name: str) -> None:
    model, x, y = digits
    result = Attack(name).run(model.cuda(), x, y, 0.3)
    model.cpu()
    assert result.x_adv.device.type == "cuda" and result.success.mean() > 0.5
