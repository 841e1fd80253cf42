"""The Triton kernels of the ℓp-distance layer against the chunked PyTorch reference, on the CPU
through Triton's interpreter: values and both gradients, shapes that straddle the tile sizes, p = 1,
8, 8.5, 64, 1000 and ∞, exact ties in the max; and the dispatch (CPU tensors never reach Triton,
a triton that fails to import falls back to PyTorch); and, compiled for an sm_90 GPU (no GPU
needed), the p = ∞ forward pass is subtractions, |·| and max only, and non-integer powers use
PTX's approximate lg2.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is first imported (``@triton.jit``
picks the interpreter when it decorates, triton's own ``tl.zeros`` & co. included), and once set it
holds for the whole process. A test process may already hold a compiled triton (an xdist worker
runs other files), and the variable must not leak into other tests or the processes they start; so
:func:`test_kernels_in_the_triton_interpreter` runs this file's interpreter tests in a fresh
process with the variable set. ``TRITON_INTERPRET=1 pytest tests/test_linf_dist_triton.py`` runs
them directly.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor

import certbench.nn
from certbench.nn import linf_dist as ld
from certbench.nn.linf_dist import lp_distance

INF = math.inf
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]
in_interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="run in a fresh process with TRITON_INTERPRET=1 by test_kernels_in_the_triton_interpreter",
)
IN_TEST_PROCESS = "runs in the test process, not in the interpreter"
in_test_process = pytest.mark.skipif(INTERPRETED, reason=IN_TEST_PROCESS)


# --- in the test process -----------------------------------------------------------------------


@in_test_process
def test_kernels_in_the_triton_interpreter() -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TRITON_"))}
    env["TRITON_INTERPRET"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "error::RuntimeWarning",
        __file__,
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " failed" not in summary, summary
    skipped = set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", run.stdout, re.MULTILINE))
    assert skipped <= {IN_TEST_PROCESS}, skipped  # every interpreter test ran


def test_cpu_tensors_never_reach_triton() -> None:
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    assert ld._triton_for(x, w) is None
    forward, backward = ld._backend(x, w)
    assert forward in (ld._kernel_forward, ld._torch_forward)
    assert backward in (ld._kernel_backward, ld._torch_backward)


def test_triton_that_fails_to_import_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "certbench.nn.linf_dist_triton", None)  # import raises ImportError
    monkeypatch.delattr(certbench.nn, "linf_dist_triton", raising=False)
    with pytest.warns(RuntimeWarning, match="Triton kernels unavailable"):
        assert ld._triton_kernels.__wrapped__() is None


@pytest.fixture()
def compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernels module, for compiling; triton's cache in ``tmp_path``, so compilation really runs."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    return pytest.importorskip("certbench.nn.linf_dist_triton")


def ptx_for_sm90(kernels: ModuleType, kernel: str, **constexprs: object) -> str:
    """PTX of ``kernels.<kernel>`` compiled for sm_90 (an H100/H200; no GPU needed) with the tile sizes
    and the given compile-time arguments, as the wrappers launch it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = getattr(kernels, kernel)
    constexprs = {
        "BLOCK_B": kernels.BLOCK_B,
        "BLOCK_OUT": kernels.BLOCK_OUT,
        "BLOCK_IN": kernels.BLOCK_IN,
        **constexprs,
    }
    types = {"p": "fp32", "e": "fp32", "index_ptr": "*i64"}

    def argument_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        return types.get(name, "*fp32" if name.endswith("_ptr") else "i32")

    signature = {name: argument_type(name) for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def float_operations(ptx: str) -> set[str]:
    """The float32 PTX instructions (``sub``, ``fma``, …) in ``ptx``."""
    instructions = re.findall(r"^\s*(?:@%p\d+\s+)?([a-z0-9]+(?:\.[a-z0-9]+)*\.f32)\s", ptx, re.MULTILINE)
    return {instruction.split(".")[0] for instruction in instructions}


@in_test_process
@pytest.mark.parametrize("with_index", [True, False])
def test_infinity_forward_compiles_to_subtraction_abs_and_max_only(
    compiled: ModuleType, with_index: bool
) -> None:
    """What the rounding enclosure of :mod:`certbench.bounds.rounding` assumes of the float32 forward
    pass at p = ∞: each difference rounded once, |·| and max exact (no multiply, fused or not)."""
    ptx = ptx_for_sm90(
        compiled,
        "_forward_kernel",
        P_INT=-1,
        PTX_LOG2=True,
        P_IS_INF=True,
        WITH_INDEX=with_index,
        **({} if with_index else {"index_ptr": None}),
    )
    assert float_operations(ptx) <= {"sub", "abs", "max", "setp", "selp", "mov"}
    assert {"sub", "abs", "max"} <= float_operations(ptx)


@in_test_process
def test_non_integer_powers_use_the_ptx_approximate_log2(compiled: ModuleType) -> None:
    forward = ptx_for_sm90(
        compiled, "_forward_kernel", P_INT=-1, PTX_LOG2=True, P_IS_INF=False, WITH_INDEX=False, index_ptr=None
    )
    weight_gradient = ptx_for_sm90(compiled, "_weight_gradient_kernel", E_INT=-1, PTX_LOG2=True)
    input_gradient = ptx_for_sm90(compiled, "_input_gradient_kernel", E_INT=7, PTX_LOG2=True)  # p = 8
    assert "lg2.approx.f32" in forward and "lg2.approx.f32" in weight_gradient
    assert "lg2" not in input_gradient and "ex2" not in input_gradient  # integer powers: squaring only


# --- in the interpreter ------------------------------------------------------------------------


@pytest.fixture()
def kernels() -> ModuleType:
    return pytest.importorskip("certbench.nn.linf_dist_triton")


Layer = Callable[[str, Tensor, Tensor, Tensor, float], tuple[Tensor, ...]]


@pytest.fixture()
def layer(kernels: ModuleType) -> Layer:
    """``layer(backend, x, w, g, p)``: :func:`values_and_gradients` of float32 tensors through the
    layer, with ``"triton"`` (the interpreted kernels) or the chunked PyTorch ``"reference"``."""

    def run(backend: str, x: Tensor, w: Tensor, g: Tensor, p: float) -> tuple[Tensor, ...]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ld, "use_kernel", lambda *tensors: False)
            patch.setattr(ld, "_triton_for", lambda *tensors: kernels if backend == "triton" else None)
            return values_and_gradients(x, w, g, p)

    return run


def values_and_gradients(x: Tensor, w: Tensor, g: Tensor, p: float) -> tuple[Tensor, ...]:
    """``y``, ``y`` without autograd (no argmax kept), ``∂(g·y)/∂x`` and ``∂(g·y)/∂w``."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = lp_distance(x, w, p)
    with torch.no_grad():
        y_no_grad = lp_distance(x, w, p)
    return (y.detach(), y_no_grad, *torch.autograd.grad(y, (x, w), g))


def relative_error(ours: Tensor, reference: Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def gradient_tolerance(p: float) -> float:
    """Both sides round ``|d|/y`` to float32 and raise it to the power ``p − 1``, which multiplies
    its relative error by ``p − 1``: a few float32 ulps (2^-24 each) times ``p``."""
    return 1e-6 + p * 2.0**-21


# (batch, out, in): one tile and a tail in every dimension (tiles 32 × 32 × 8), and less than a tile
SHAPES = [(35, 34, 21), (3, 5, 6)]


@in_interpreter
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [1.0, 8.0, 8.5, 64.0, 1000.0, INF])
def test_values_and_gradients_match_the_reference(layer: Layer, shape: tuple[int, ...], p: float) -> None:
    b, n_out, n_in = shape
    gen = torch.Generator().manual_seed(0)
    scale = 50.0 if p == 1000.0 else 1.0  # with p = 1000, |d|^p overflows float32 unless scaled by the max
    x, w = (torch.randn(*s, generator=gen) * scale for s in ((b, n_in), (n_out, n_in)))
    g = torch.randn(b, n_out, generator=gen)
    ours, reference = layer("triton", x, w, g, p), layer("reference", x, w, g, p)
    assert all(bool(torch.isfinite(t).all()) for t in ours)
    if math.isinf(p):  # same subtractions, exact max, same first argmax: identical, bit for bit
        for o, r in zip(ours, reference):
            assert torch.equal(o, r)
        return
    assert relative_error(ours[0], reference[0]) < 1e-6
    assert torch.equal(ours[0], ours[1])
    for o, r in zip(ours[2:], reference[2:]):
        assert relative_error(o, r) < gradient_tolerance(p)


def tied_inputs(b: int, n_out: int, n_in: int) -> tuple[Tensor, Tensor]:
    """Small integers: ``|x_i − w_ji|`` has tied maxima in most pairs, of either sign, in the same
    lane of the tile and in different ones; row 0 of ``w`` equals row 0 of ``x`` (all distances 0)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (b, n_in), generator=gen).float()
    w = torch.randint(-2, 3, (n_out, n_in), generator=gen).float()
    w[0] = x[0]
    return x, w


@in_interpreter
def test_ties_in_the_max_go_to_the_first_coordinate(layer: Layer, kernels: ModuleType) -> None:
    x, w = tied_inputs(33, 34, 29)
    y, index = kernels.forward(x, w, INF, True)
    a = (x[:, None, :] - w[None]).abs().numpy()
    tied = (a == a.max(-1, keepdims=True)).sum(-1)
    assert (tied > 1).mean() > 0.5  # the construction ties most pairs
    assert torch.equal(y, torch.from_numpy(a.max(-1)))
    assert torch.equal(index, torch.from_numpy(a.argmax(-1)))  # numpy: the first of tied maxima
    g = torch.randn(33, 34, generator=torch.Generator().manual_seed(2))
    for ours, reference in zip(layer("triton", x, w, g, INF), layer("reference", x, w, g, INF)):
        assert torch.equal(ours, reference)


@in_interpreter
def test_gradient_at_p_infinity_is_the_signed_first_tied_coordinate(layer: Layer) -> None:
    """|d| = 3 at coordinates 5 (d = −3, the first), 13 (another step, same lane) and 18; the second
    weight row equals x, so its distance is 0 and its gradient (sign 0) too."""
    x, w = torch.zeros(1, 20), torch.zeros(2, 20)
    w[0, 5], w[0, 13], w[0, 18] = 3.0, 3.0, -3.0
    y, _, gx, gw = layer("triton", x, w, torch.tensor([[2.0, 7.0]]), INF)
    assert y.tolist() == [[3.0, 0.0]]
    expected_gx = torch.zeros(1, 20)
    expected_gx[0, 5] = -2.0
    assert torch.equal(gx, expected_gx) and torch.equal(gw, torch.cat([-expected_gx, torch.zeros(1, 20)]))


@in_interpreter
@pytest.mark.parametrize("p", [1.0, 8.0, 64.0])
def test_ties_with_finite_p_match_the_reference(layer: Layer, p: float) -> None:
    x, w = tied_inputs(33, 34, 29)
    g = torch.randn(33, 34, generator=torch.Generator().manual_seed(2))
    ours, reference = layer("triton", x, w, g, p), layer("reference", x, w, g, p)
    assert relative_error(ours[0], reference[0]) < 1e-6 and float(ours[0][0, 0]) == 0.0
    for o, r in zip(ours[2:], reference[2:]):
        assert relative_error(o, r) < gradient_tolerance(p)


@in_interpreter
def test_kernels_pass_the_self_check_that_gates_them_on_cuda(kernels: ModuleType) -> None:
    assert ld._disagreement_with_torch(kernels.forward, kernels.backward, torch.device("cpu")) == ""


@in_interpreter
def test_empty_batch(kernels: ModuleType) -> None:
    x, w = torch.zeros(0, 9), torch.randn(4, 9)
    y, index = kernels.forward(x, w, INF, True)
    assert y.shape == index.shape == (0, 4)
    gx, gw = kernels.backward(x, w, torch.zeros(0, 4), torch.zeros(0, 4), 8.0)
    assert gx.shape == (0, 9) and torch.equal(gw, torch.zeros(4, 9))
