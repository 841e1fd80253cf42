"""The ``cascade`` certificate: the union of its stages, the per-sample stage record, soundness by
sampling, the time budget, parameters and applicability (those of the LiRPA certificates)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from certbench.certificates import CERTIFICATES, CERTIFIED, ERROR, NOT_CERTIFIED
from certbench.certificates.cascade import STAGES
from certbench.config import ConfigError
from certbench.nn import Normalize
from tests.test_lirpa import box_samples, small_bn_cnn, small_cnn, small_mlp, small_resnet, unstable_mlp


def cnn_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[float]]:
    """small_cnn with six misclassified points, at ε where IBP, CROWN-IBP and CROWN each certify
    some sample that the cheaper ones do not."""
    model = small_cnn(5)
    torch.manual_seed(5)
    x = torch.rand(48, 2, 8, 8)
    y = model(x).argmax(1)
    y[:6] = (y[:6] + 1) % 5
    return model, x, y, [0.002, 0.01, 0.02, 0.04]


def mlp_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[float]]:
    """A float32 MLP with mostly unstable neurons, where α-CROWN certifies beyond CROWN."""
    model = unstable_mlp(2).float()
    torch.manual_seed(3)
    x = torch.rand(16, 1, 4, 4)
    return model, x, model(x).argmax(1), [0.1, 0.2]


def alone(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[float]) -> dict:
    params = {"iterations": 20, "lr": 0.1} if name == "alpha-crown" else {}
    return CERTIFICATES.get(name)(**params).certify(model, x, y, eps).status


@pytest.mark.parametrize("case", [cnn_case, mlp_case])
def test_cascade_certifies_the_union_of_its_stages_and_records_who(case) -> None:
    model, x, y, eps = case()
    cascade = CERTIFICATES.get("cascade")(batch_size=8, alpha_lr=0.1)
    result = cascade.certify(model, x, y, eps)
    assert not result.errors and result.radius is None and result.verifier is not None
    by_stage = {name: alone(name, model, x, y, eps) for name in STAGES}
    reached = set()
    for e in eps:
        certified = result.status[e] == CERTIFIED
        union = np.logical_or.reduce([by_stage[name][e] == CERTIFIED for name in STAGES])
        assert np.array_equal(certified, union)
        assert set(result.status[e][~certified]) <= {NOT_CERTIFIED}
        verifier = result.verifier[e]
        assert np.array_equal(verifier != "", certified)
        for i in np.flatnonzero(certified):  # certified by its stage alone, by no cheaper one
            stage = STAGES.index(verifier[i])
            assert by_stage[STAGES[stage]][e][i] == CERTIFIED
            assert all(by_stage[cheaper][e][i] != CERTIFIED for cheaper in STAGES[:stage])
        reached |= set(verifier[certified])
    if case is cnn_case:
        assert set(result.status[eps[0]][:6]) == {NOT_CERTIFIED}  # misclassified
        assert {"ibp", "crown-ibp", "crown"} <= reached
    else:
        assert "alpha-crown" in reached
    assert all(result.extra[f"seconds_{name}"] >= 0 for name in STAGES)


def test_certified_points_keep_their_prediction_in_the_whole_box() -> None:
    """Random points and corners of the box of a certified point never change its prediction."""
    for model, x, y, eps in (cnn_case(), mlp_case()):
        result = CERTIFICATES.get("cascade")(alpha_iterations=5).certify(model, x, y, eps)
        checked = 0
        for e in eps:
            for i in np.flatnonzero(result.status[e] == CERTIFIED):
                with torch.no_grad():
                    predictions = model(box_samples(x[i], e)).argmax(1)
                assert (predictions == y[i]).all(), f"sample {i} flips inside its certified box at ε = {e}"
                checked += 1
        assert checked > 0


def test_stages_parameter_runs_only_those_stages() -> None:
    model, x, y, eps = cnn_case()
    result = CERTIFICATES.get("cascade")(stages=["ibp", "crown"]).certify(model, x, y, eps)
    assert set(np.concatenate(list(result.verifier.values()))) <= {"", "ibp", "crown"}
    assert {k for k in result.extra if k.startswith("seconds_")} == {"seconds_ibp", "seconds_crown"}
    crown = alone("crown", model, x, y, eps)
    ibp = alone("ibp", model, x, y, eps)
    for e in eps:
        assert np.array_equal(result.status[e] == CERTIFIED, (crown[e] == CERTIFIED) | (ibp[e] == CERTIFIED))


def test_each_stage_runs_the_points_left_to_it_in_its_own_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """α-CROWN gets the open points of a whole cascade batch in one call, starting from CROWN's bounds
    (no CROWN pass of its own), not a few points per small batch."""
    from certbench.bounds.lirpa import Bounder
    from certbench.certificates.lirpa import CROWN_MEMO, AlphaCROWNCertificate

    model, x, y, eps = mlp_case()
    CROWN_MEMO.clear()  # CROWN's bounds from another test of the same model would be served here
    calls: list[tuple[str, int]] = []
    optimised, bounds = AlphaCROWNCertificate.optimised_bounds, Bounder.margin_lower_bounds

    def count_optimised(self, bounder, model64, x64, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(("optimised", len(x64)))
        return optimised(self, bounder, model64, x64, *args, **kwargs)

    def count_bounds(self, model, x, y, eps, methods, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((methods[0], len(x)))
        return bounds(self, model, x, y, eps, methods, *args, **kwargs)

    monkeypatch.setattr(AlphaCROWNCertificate, "optimised_bounds", count_optimised)
    monkeypatch.setattr(Bounder, "margin_lower_bounds", count_bounds)
    cascade = CERTIFICATES.get("cascade")(stages=["crown", "alpha-crown"], alpha_iterations=2)
    result = cascade.certify(model, x, y, eps[1:])
    left = int((result.status[eps[1]] != CERTIFIED).sum() + (result.verifier[eps[1]] == "alpha-crown").sum())
    assert left > 1
    assert [name for name, _ in calls] == ["CROWN", "optimised", "alpha-CROWN"]
    assert calls[1][1] == left


def test_time_limit_gives_error_never_a_status_not_proven() -> None:
    model, x, y, eps = cnn_case()
    result = CERTIFICATES.get("cascade")(time_limit=1e-9).certify(model, x, y, eps[:1])
    status = result.status[eps[0]]
    assert set(status[:6]) == {NOT_CERTIFIED}  # misclassified: never reach a stage
    assert set(status[6:]) == {ERROR} and len(result.errors) == len(x) - 6
    assert all("time limit" in message for message in result.errors)
    assert set(result.verifier[eps[0]]) == {""}


def test_time_limit_keeps_what_the_stages_before_it_proved(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget runs out during IBP: what IBP proved stays certified (by ibp), the rest is error."""
    model, x, y, eps = cnn_case()
    cascade = CERTIFICATES.get("cascade")(time_limit=0.05)
    ibp = cascade._stages[0]
    lower_bounds = type(ibp)._lower_bounds

    def slow(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.1)
        return lower_bounds(self, *args, **kwargs)

    monkeypatch.setattr(type(ibp), "_lower_bounds", slow)
    e = eps[1]
    result = cascade.certify(model, x, y, [e])
    expected = alone("ibp", model, x, y, [e])[e] == CERTIFIED
    status = result.status[e]
    assert np.array_equal(status == CERTIFIED, expected) and expected.any()
    assert set(result.verifier[e][expected]) == {"ibp"}
    assert np.array_equal(status == ERROR, ~expected & (np.arange(len(x)) >= 6))
    assert len(result.errors) == int((status == ERROR).sum()) and "before stage crown-ibp" in result.errors[0]


def test_time_limit_interrupts_alpha_crown() -> None:
    model, x, y, eps = mlp_case()
    cascade = CERTIFICATES.get("cascade")(stages=["crown", "alpha-crown"], alpha_iterations=10_000)
    cascade.time_limit = 0.5  # α-CROWN gets what CROWN left of it
    result = cascade.certify(model, x, y, [eps[1]])
    status = result.status[eps[1]]
    crown = alone("crown", model, x, y, [eps[1]])[eps[1]]
    assert np.array_equal(status == CERTIFIED, crown == CERTIFIED)
    assert np.array_equal(status == ERROR, crown != CERTIFIED) and (status == ERROR).any()
    assert all("in stage alpha-crown" in message for message in result.errors)


def refusal_models() -> list[nn.Module]:
    return [
        small_mlp(0),
        small_cnn(0),
        small_bn_cnn(0),
        small_resnet(0),
        nn.Sequential(Normalize([0.5], [0.5]), nn.Flatten(), nn.Linear(4, 2), nn.Tanh()),
        nn.Sequential(nn.AvgPool2d(3, stride=1), nn.Flatten(), nn.Linear(4, 2)),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)),
    ]


@pytest.mark.parametrize("index", range(len(refusal_models())))
def test_refusal_is_that_of_the_lirpa_certificates(index: int) -> None:
    model = refusal_models()[index]
    reasons = {name: CERTIFICATES.get(name)().refusal(model) for name in STAGES}
    assert len(set(reasons.values())) == 1
    assert CERTIFICATES.get("cascade")().refusal(model) == reasons["crown"]
    assert CERTIFICATES.get("cascade")(stages=["ibp"]).refusal(model) == reasons["ibp"]


@pytest.mark.parametrize(
    "params",
    [
        {"stages": []},
        {"stages": ["ibp", "ibp"]},
        {"stages": ["pgd"]},
        {"alpha_iterations": 0},
        {"time_limit": 0},
        {"time_limit": float("nan")},
    ],
)
def test_bad_parameters_are_refused(params: dict) -> None:
    with pytest.raises(ConfigError, match=r"certificate_params\.cascade\."):
        CERTIFICATES.get("cascade")(**params)


def test_cascade_is_opt_in() -> None:
    from certbench.evaluate import selected_certificates

    assert not CERTIFICATES.get("cascade").in_all
    assert "cascade" not in selected_certificates(["all"])


def test_evaluation_records_the_verifier_per_sample_and_the_count_per_stage() -> None:
    from certbench.config import format_eps
    from certbench.evaluate import _certify_one

    model, x, y, eps = cnn_case()
    entry = _certify_one("cascade", {"alpha_iterations": 2}, model, x, y, {"linf": eps, "l2": []})
    assert entry["applicable"] and set(entry["verifier"]) == set(entry["status"]) == {
        format_eps(e) for e in eps
    }
    for key, verifier in entry["verifier"].items():
        names, counts = np.unique(verifier[verifier != ""], return_counts=True)
        assert entry["certified_by"][key] == dict(zip(names.tolist(), counts.tolist(), strict=True))
        assert sum(entry["certified_by"][key].values()) == int((entry["status"][key] == CERTIFIED).sum())
