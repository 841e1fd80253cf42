"""Exact applicability (issue 13, part 2) and strict float32 precision (part 3): one test per failure class.

Each test builds a model that triggers the failure and asserts that the certificate refuses it with
a reason (or that the bound cache / precision context behaves); where feasible it also shows that
the refused rule is really wrong for that model, so the refusal is justified. Each docstring says
how the test fails on the code as it was before these fixes.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.modules.module as module_globals
from torch import nn

from certbench import precision
from certbench.applicability import common_refusal
from certbench.bounds.linf_dist import lipschitz_linf
from certbench.bounds.lipschitz import LipschitzBound
from certbench.bounds.lipsdp import mlp_weights, product_bound
from certbench.bounds.lirpa import (
    BoundedModule,
    BoundedTensor,
    PerturbationLpNorm,
    input_box,
    unsupported_reason,
)
from certbench.certificates import CERTIFICATES
from certbench.certificates.lipschitz import exact_bound
from certbench.evaluate import _certify_one
from certbench.nn import Normalize
from certbench.nn.linf_dist import LinfDist, MeanShift, Negate

LIRPA = ("ibp", "crown", "crown-ibp")
LIRPA_METHODS = {"ibp": "IBP", "crown": "backward", "crown-ibp": "CROWN-IBP"}


# --- models ------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Sequential:
    """An MLP every certificate but the ℓ∞-dist ones accepts."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()


def linf_net(seed: int = 0) -> nn.Sequential:
    """A plain ℓ∞-dist net (the ℓ∞-dist certificates accept it)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Flatten(),
        LinfDist(16, 8),
        MeanShift(8),
        LinfDist(8, 3, bias=True),
        Negate(),
    ).eval()


def accepted(name: str) -> nn.Sequential:
    """A model certificate ``name`` applies to (checked), to be broken by each test."""
    model = linf_net() if name.startswith("linf-dist") else mlp()
    assert CERTIFICATES.get(name)().refusal(model) is None
    return model


def conv_net(*layers: nn.Module, side: int = 4) -> nn.Sequential:
    """Normalize → ``layers`` → Flatten → Linear(·, 3) on 1×side×side inputs."""
    torch.manual_seed(0)
    body = nn.Sequential(Normalize([0.0], [1.0]), *layers, nn.Flatten())
    with torch.no_grad():
        features = body(torch.zeros(1, 1, side, side)).shape[1]
    return nn.Sequential(*body, nn.Linear(features, 3)).eval()


# --- auto_LiRPA's raw bounds (no certbench checks) ---------------------------------------------


def raw_output_bounds(
    model: nn.Module, x: torch.Tensor, eps: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """auto_LiRPA 0.3's bounds of the logits over the clipped ℓ∞ box, bypassing every certbench check."""
    lower_x, upper_x = input_box(x, eps)
    bounded = BoundedModule(model, torch.zeros_like(x))
    perturbation = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=lower_x, x_U=upper_x)
    with torch.no_grad():
        return bounded.compute_bounds(x=(BoundedTensor(x, perturbation),), method=method)


def sampled_outputs(model: nn.Module, x: torch.Tensor, eps: float, n: int = 512) -> torch.Tensor:
    """The logits at x and at n points of the box (half of their coordinates at a vertex), (n+1, B, K)."""
    lower_x, upper_x = input_box(x, eps)
    u = torch.rand(n, *x.shape)
    u = torch.where(torch.rand(u.shape) < 0.5, u.round(), u)
    points = torch.cat([x[None], lower_x + u * (upper_x - lower_x)])
    with torch.no_grad():
        return model(points.flatten(0, 1)).view(n + 1, len(x), -1)


def lirpa_bound_violated(model: nn.Module, x: torch.Tensor, eps: float, method: str) -> bool:
    """True when a logit at a point of the box lies outside auto_LiRPA's bounds (or bounding fails)."""
    try:
        lower, upper = raw_output_bounds(model, x, eps, method)
    except Exception:  # noqa: BLE001 - a failing parse of the layer is another sign it is not supported
        return True
    outputs = sampled_outputs(model, x, eps)
    slack = 1e-4 * (1 + outputs.abs().max())
    return bool(((outputs < lower - slack) | (outputs > upper + slack)).any())


# --- part 2: auto_LiRPA settings ---------------------------------------------------------------

AVGPOOL_CASES = {
    # name: (layers, input side, method showing the wrong bound, words of the reason)
    "overlapping": ([nn.AvgPool2d(2, stride=1)], 3, "backward", "kernel must equal stride"),
    "count_include_pad": (
        [nn.AvgPool2d(2, padding=1, count_include_pad=False)],
        2,
        "IBP",
        "count_include_pad",
    ),
    "divisor_override": ([nn.AvgPool2d(2, divisor_override=1)], 4, "IBP", "divisor_override"),
    "ceil_mode": ([nn.AvgPool2d(2, ceil_mode=True)], 3, "IBP", "ceil_mode"),
}


@pytest.mark.parametrize("case", sorted(AVGPOOL_CASES))
def test_avgpool_settings_auto_lirpa_gets_wrong_are_refused(case: str) -> None:
    """Overlapping windows, count_include_pad=False, divisor_override and ceil_mode: auto_LiRPA 0.3
    bounds each as a tiling, padding-counting, plain average with floor mode, and a sampled logit
    falls outside its bounds (or parsing fails). Failed before: ``supports`` accepted any
    AvgPool2d, so ibp/crown/crown-ibp applied."""
    layers, side, method, words = AVGPOOL_CASES[case]
    model = conv_net(*layers, side=side)
    x = torch.full((1, 1, side, side), 0.5) + 0.1 * torch.rand(1, 1, side, side)
    assert lirpa_bound_violated(model, x, 0.05, method)
    reason = unsupported_reason(model)
    assert reason is not None and words in reason and "AvgPool2d" in reason
    for name in LIRPA:
        refusal = CERTIFICATES.get(name)().refusal(model)
        assert refusal is not None and words in refusal


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_are_refused(mode: str) -> None:
    """auto_LiRPA 0.3's Pad node pads with a constant whatever ``padding_mode`` says, so for reflect
    and replicate padding its bound of a logit at ε = 0 is not even the logit. Circular padding is
    exported as slices and a concatenation instead, which IBP gets right here but CROWN fails on; it
    is refused as not verified. Failed before: any Conv2d padding mode was accepted."""
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode=mode, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = conv_net(conv, nn.ReLU())
    x = torch.full((1, 1, 4, 4), 0.5)
    if mode != "circular":
        assert lirpa_bound_violated(model, x, 0.0, "IBP")
    for name in LIRPA:
        refusal = CERTIFICATES.get(name)().refusal(model)
        assert refusal is not None and "padding_mode" in refusal and "features" not in refusal


def test_other_auto_lirpa_settings_are_refused_with_the_layer_named() -> None:
    """Adaptive pooling to more than 1×1 and BatchNorm without running statistics are refused,
    naming the layer; the shipped settings stay accepted. Failed before: BatchNorm without running
    statistics was accepted (auto_LiRPA then fails on every sample), and no reason was given."""
    assert "output_size" in unsupported_reason(conv_net(nn.AdaptiveAvgPool2d(2)))
    no_stats = unsupported_reason(conv_net(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)))
    assert "track_running_stats" in no_stats and "'2'" in no_stats
    assert (
        unsupported_reason(
            conv_net(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1))
        )
        is None
    )


def test_ibp_training_names_the_unsupported_setting() -> None:
    """The ibp method's ConfigError says which layer setting auto_LiRPA cannot bound. Failed
    before: the method trained on any AvgPool2d and its error named no layer."""
    from certbench.config import ConfigError, validate_against
    from certbench.data.specs import DATASETS
    from certbench.method import RunContext
    from methods.ibp import IBP

    spec = DATASETS.get("digits")
    params = validate_against({"type": "object", "properties": IBP.params_schema}, {})
    method = IBP(params, RunContext(spec, 10, spec.eps_linf, spec.eps_l2, torch.device("cpu")))
    with pytest.raises(ConfigError, match="divisor_override"):
        method.prepare(conv_net(nn.AvgPool2d(2, divisor_override=3)))
    method.prepare(conv_net(nn.AvgPool2d(2)))


# --- part 2: subclasses ------------------------------------------------------------------------


class SteepReLU(nn.ReLU):
    """A ReLU subclass with slope 10: a rule for nn.ReLU does not hold for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


@pytest.mark.parametrize("name", CERTIFICATES.names())
def test_relu_subclass_is_refused_by_every_certificate(name: str) -> None:
    """An MLP whose activation is a ReLU subclass of slope 10. Failed before for lipsdp-l2, whose
    ``mlp_structure`` matched layers with isinstance (it then certified with the weights' bound,
    10× too small); the other certificates already compared exact types."""
    model = mlp()
    model[3] = SteepReLU()
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and ("SteepReLU" in refusal or "ℓ∞-dist" in refusal)


def test_relu_subclass_breaks_the_lipsdp_rule() -> None:
    """Why the refusal is needed: the product of the weights' norms, an upper bound of LipSDP's
    bound for any ReLU net with these weights, is below the slope the steep model actually has.
    Failed before at the last line (lipsdp-l2 accepted the model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
    bound = product_bound(mlp_weights(model))
    model[2] = SteepReLU()
    x, x2 = torch.full((1, 1, 1, 1), 0.2), torch.full((1, 1, 1, 1), 0.3)
    with torch.no_grad():
        slope = float((model(x2) - model(x)).abs().max()) / 0.1
    assert slope > 5 * bound
    assert CERTIFICATES.get("lipsdp-l2")().refusal(model) is not None


class ScaledLinfDist(LinfDist):
    """A LinfDist subclass that scales its output by 10: 10-Lipschitz, not 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * super().forward(x)


@pytest.mark.parametrize("name", ["linf-dist", "linf-dist-l2"])
def test_linf_dist_subclass_is_refused(name: str) -> None:
    """Failed before: the ℓ∞-dist certificate, ``split_trunk`` and ``lipschitz_linf`` matched
    LinfDist with isinstance, so the subclass was given the constant 1 of the plain layer."""
    model = linf_net()
    scaled = ScaledLinfDist(8, 3, bias=True)
    scaled.load_state_dict(model[4].state_dict())
    plain_rule = lipschitz_linf(model)
    model[4] = scaled
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and "ScaledLinfDist" in refusal
    with pytest.raises(TypeError, match="ScaledLinfDist"):
        lipschitz_linf(model)
    # the plain layer's rule is violated by the subclass: the logits move 10× faster
    x = torch.rand(1, 1, 4, 4) * 0.8 + 0.1
    delta = torch.full_like(x, 0.05)
    with torch.no_grad():
        moved = float((model(x + delta) - model(x)).abs().max())
    assert moved > plain_rule * 0.05 * (1 + 1e-3)


# --- part 2: hooks -----------------------------------------------------------------------------


def _scale_output(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return 10 * output


def _scale_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(10 * t for t in inputs)


@pytest.mark.parametrize("name", CERTIFICATES.names())
def test_forward_hook_is_refused_by_every_certificate(name: str) -> None:
    """A forward hook that scales a layer's output by 10 changes the model's function but not its
    type or weights. Failed before: no certificate looked at hooks."""
    model = accepted(name)
    handle = model[2].register_forward_hook(_scale_output)
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and "forward hook" in refusal and "'2'" in refusal
    handle.remove()
    assert CERTIFICATES.get(name)().refusal(model) is None


@pytest.mark.parametrize("name", CERTIFICATES.names())
def test_forward_pre_hook_is_refused_by_every_certificate(name: str) -> None:
    """A forward pre-hook that scales a layer's input by 10. Failed before: hooks were not checked."""
    model = accepted(name)
    model[2].register_forward_pre_hook(_scale_input)
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and "forward pre-hook" in refusal


def test_hooks_change_what_the_lipschitz_rule_bounds() -> None:
    """Why hooks are refused: the hooked model moves faster than the bound read off its layers.
    Failed before at the last line (no check of hooks existed)."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 3)).eval()
    bound = float(LipschitzBound(model, (1, 4, 4)).compute(exact=True).total)
    direction = torch.linalg.svd(model[2].weight.detach())[2][0].view(1, 1, 4, 4)  # the steepest one
    model[2].register_forward_hook(_scale_output)
    x = torch.full((1, 1, 4, 4), 0.5)
    with torch.no_grad():
        slope = float((model(x + 0.01 * direction) - model(x)).norm()) / 0.01
    assert slope > 5 * bound
    assert common_refusal(model) is not None


@pytest.mark.parametrize(
    "kind", ["backward", "global forward", "global forward pre", "root forward", "forward attribute"]
)
def test_other_hooks_and_a_patched_forward_are_refused(kind: str) -> None:
    """Backward hooks, torch's global module hooks, a hook on the model itself and an instance
    attribute ``forward`` are refused too. Failed before: none of them was checked."""
    model = mlp()
    remove = []
    if kind == "backward":
        model[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    elif kind == "global forward":
        remove.append(module_globals.register_module_forward_hook(_scale_output))
    elif kind == "global forward pre":
        remove.append(module_globals.register_module_forward_pre_hook(_scale_input))
    elif kind == "root forward":
        model.register_forward_hook(_scale_output)
    else:
        original = model[3].forward
        model[3].forward = lambda x: 10 * original(x)
    try:
        for name in CERTIFICATES.names():
            assert CERTIFICATES.get(name)().refusal(model) is not None
        expected = {
            "backward": "backward hook",
            "global forward": "global forward hook",
            "global forward pre": "global forward pre-hook",
            "root forward": "the model",
            "forward attribute": "forward replaced",
        }[kind]
        assert expected in common_refusal(model)
    finally:
        for handle in remove:
            handle.remove()
    if remove:
        assert common_refusal(model) is None


# --- part 2: Normalize buffers -----------------------------------------------------------------

BAD_STD = {"negative": -0.25, "zero": 0.0, "nan": math.nan, "inf": math.inf}


@pytest.mark.parametrize("value", sorted(BAD_STD))
@pytest.mark.parametrize("name", CERTIFICATES.names())
def test_normalize_with_changed_std_is_refused_by_every_certificate(name: str, value: str) -> None:
    """A Normalize whose std buffer was changed in place after construction. Failed before: only
    the constructor checked std, so e.g. lipschitz-l2 took 1/min σ < 0 and ibp bounded x/σ with σ = 0."""
    model = accepted(name)
    model[0].std.fill_(BAD_STD[value])
    refusal = CERTIFICATES.get(name)().refusal(model)
    assert refusal is not None and "std must be finite and positive" in refusal


def test_normalize_with_nan_mean_is_refused() -> None:
    """A non-finite mean is refused as well (it makes every logit nan). Failed before: accepted."""
    model = mlp()
    model[0].mean.fill_(math.nan)
    assert "mean must be finite" in CERTIFICATES.get("ibp")().refusal(model)


def test_negative_std_breaks_the_lipschitz_rule() -> None:
    """Why: with σ < 0 the rule 1/min σ is negative, not a bound. Failed before: LipschitzBound
    took the negative constant and lipschitz_linf returned a negative bound."""
    from certbench.bounds.lipschitz import UnsupportedLayerError

    model = mlp()
    model[0].std.fill_(-0.25)
    with pytest.raises(UnsupportedLayerError, match="std"):
        LipschitzBound(model, (1, 4, 4))
    net = linf_net()
    net[0].std.fill_(-1.0)
    with pytest.raises(ValueError, match="std"):
        lipschitz_linf(net)


@pytest.mark.parametrize("value", sorted(BAD_STD))
def test_loading_a_state_dict_with_bad_std_raises(value: str) -> None:
    """Loading a state dict whose std is not finite and positive raises ValueError and leaves the
    layer as it was. Failed before: load_state_dict copied any buffer."""
    model = mlp()
    state = model.state_dict()
    state["0.std"] = torch.full_like(state["0.std"], BAD_STD[value])
    with pytest.raises(ValueError, match="std must be finite and positive"):
        model.load_state_dict(state)
    assert float(model[0].std.min()) == 0.25
    with pytest.raises(ValueError):
        Normalize([0.5], [BAD_STD[value]])


def test_bounds_use_the_normalize_buffer_as_it_is_at_certification_time() -> None:
    """A valid std changed after the bound object was built is read when the bound is computed.
    Failed before for LipschitzBound, which fixed 1/min σ when it was built (the training methods
    keep one such object for a whole run)."""
    model = mlp()
    bound = LipschitzBound(model, (1, 4, 4))
    before = float(bound.compute(exact=True).total)
    model[0].std.fill_(0.125)
    assert float(bound.compute(exact=True).total) == pytest.approx(2 * before, rel=1e-9)
    net = linf_net()
    first = lipschitz_linf(net)
    net[0].std.fill_(0.5)
    assert lipschitz_linf(net) == pytest.approx(first / 2)


# --- part 2: the exact-bound cache -------------------------------------------------------------


def lipschitz_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Normalize([0.5], [0.25]),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


@pytest.mark.parametrize(
    "change", ["swap activation", "swap pooling", "setting", "weight via .data", "std via .data"]
)
def test_exact_bound_cache_follows_structure_and_content(change: str) -> None:
    """The cached exact bound is recomputed after an in-place change of the model. Failed before:
    the cache key was (data_ptr, _version) of the tensors, blind to a parameterless layer swapped in
    place, to a changed setting and to writes through ``.data`` (which bypass the version counter)."""
    model = lipschitz_model()
    shape = (1, 4, 4)
    first, _ = exact_bound(model, shape)
    assert exact_bound(model, shape)[0] is first  # unchanged model: cached
    if change == "swap activation":
        model[2] = nn.LeakyReLU(negative_slope=5.0)
    elif change == "swap pooling":
        model[3] = nn.MaxPool2d(2)
    elif change == "setting":
        model[2] = nn.LeakyReLU(negative_slope=1.0)
        first, _ = exact_bound(model, shape)
        model[2].negative_slope = 5.0
    elif change == "weight via .data":
        model[5].weight.data.mul_(3.0)
    else:
        model[0].std.data.mul_(0.5)
    again, _ = exact_bound(model, shape)
    fresh = LipschitzBound(model, shape).compute(exact=True)
    assert again is not first
    assert float(again.total) == pytest.approx(float(fresh.total), rel=1e-12)
    assert float(again.total) != pytest.approx(float(first.total), rel=1e-6)


# --- part 2: records ---------------------------------------------------------------------------


def test_a_refused_certificate_records_and_logs_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """``_certify_one`` writes the reason into the entry and the log; the run goes on. Failed
    before: the entry said only ``applicable: false``."""
    model = conv_net(nn.AvgPool2d(2, stride=1))
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    with caplog.at_level(logging.INFO, logger="certbench.evaluate"):
        entry = _certify_one("ibp", {}, model, x, y, {"linf": [0.01], "l2": [0.1]})
    assert entry["applicable"] is False and "kernel must equal stride" in entry["reason"]
    assert "certificate ibp not applicable: " in caplog.text and "kernel must equal stride" in caplog.text
    fine = _certify_one("ibp", {}, mlp(), x, y, {"linf": [0.01], "l2": [0.1]})
    assert fine["applicable"] is True and "reason" not in fine


def test_a_certificate_with_the_older_applies_interface_still_works() -> None:
    """A plug-in certificate that overrides ``applies`` (the interface before ``refusal``) gets the
    common checks first and its own answer after them."""
    from certbench.certificates import Certificate

    class Legacy(Certificate):
        name, norm = "legacy", "l2"

        def applies(self, model: nn.Module) -> bool:
            return len(model) == 5

    model = mlp()
    assert Legacy().refusal(model) is None and Legacy().applies(model)
    assert "does not apply" in Legacy().refusal(model[:3])
    model[2].register_forward_hook(_scale_output)
    assert "forward hook" in Legacy().refusal(model)


# --- part 3: strict float32 --------------------------------------------------------------------


@pytest.fixture
def saved_precision():
    """Leave torch's global precision settings as this test found them."""
    state = precision._snapshot()
    yield
    precision._restore(state)


def _user_settings() -> None:
    """Non-default settings through both the legacy and the new API."""
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.mkldnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.benchmark = True


def _assert_strict(record: dict) -> None:
    assert record["tf32"] is False and record["cudnn"] is False and record["mkldnn"] is False
    assert record["dtype"] == "float32" and record["matmul_precision"] == "highest"
    assert set(record["fp32_precision"].values()) == {"ieee"}
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.fp32_precision == "ieee"
    assert torch.backends.cudnn.enabled is False and torch.backends.mkldnn.enabled is False
    assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is False
    assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is False


def test_strict_float32_switches_everything_off_and_restores_the_users_settings(saved_precision) -> None:
    """Inside: no TF32, no reduced-precision reductions, no cuDNN or oneDNN; after: exactly the
    user's (non-default) settings again. Failed before: there was no such context."""
    _user_settings()
    before = precision._snapshot()
    assert precision.describe_precision()["tf32"] is True
    with precision.strict_float32("cpu") as record:
        _assert_strict(record)
        assert record["device"] == "cpu"
        with precision.strict_float32("cpu"):  # nesting is harmless
            _assert_strict(precision.describe_precision())
        _assert_strict(precision.describe_precision())
    assert precision._snapshot() == before
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.benchmark is True
    assert torch.backends.mkldnn.conv.fp32_precision == "tf32"


def test_strict_float32_restores_after_an_exception(saved_precision) -> None:
    """The user's settings come back even when the body raises. Failed before: no such context."""
    _user_settings()
    before = precision._snapshot()
    with pytest.raises(KeyError), precision.strict_float32():
        _assert_strict(precision.describe_precision())
        raise KeyError("inside")
    assert precision._snapshot() == before


def test_strict_float32_with_mixed_legacy_and_new_settings(saved_precision) -> None:
    """Settings that mix the legacy and the new API (a legacy getter then raises) are restored too.
    Failed before: no such context."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    before = precision._snapshot()
    with precision.strict_float32() as record:
        assert record["tf32"] is False and set(record["fp32_precision"].values()) == {"ieee"}
    assert precision._snapshot() == before


def test_strict_float32_gives_the_same_logits_as_float64_rounded(saved_precision) -> None:
    """A conv net evaluated inside the context (im2col + GEMM, not oneDNN) stays within float32
    rounding of its float64 evaluation. Failed before: there was no such context."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(10),
    ).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        model(x)
        with precision.strict_float32():
            strict = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    assert torch.allclose(strict.double(), exact, rtol=1e-5, atol=1e-5)


def test_attack_verification_runs_in_strict_precision(saved_precision) -> None:
    """The attack's clean and final verification forward passes run inside the strict context
    even when the user's settings allow TF32 and oneDNN. Failed before: they ran with the user's
    settings."""
    from certbench.attacks.base import Attack

    _user_settings()
    seen = []
    model = mlp()
    original = model.forward

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(precision.describe_precision()["mkldnn"])
        return original(x)

    model.forward = spy
    Attack("pgd-linf", steps=2).run(model, torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), 0.1, seed=0)
    assert seen[0] is False and seen[-1] is False  # the clean and the final verification pass
    assert True in seen  # the search itself ran with the user's settings
    record = precision.strict_precision("cpu")  # what attack.json records
    assert record["tf32"] is False and record["mkldnn"] is False and record["cudnn"] is False
