"""The auto_LiRPA adapter: which models it bounds soundly, and the bound helpers IBP/CROWN code shares.

auto_LiRPA 0.3 is imported only after :mod:`certbench.bounds.lirpa_compat` has checked its version and
applied the shims that make it run on today's torch and numpy.

Rules kept by :class:`Bounder` rather than by a shim: a ``BoundedModule`` whose call
raised is never used again (it keeps per-call state on its nodes), and one is built per
norm. With loss fusion, the labels of the ``GatherElements`` node are set before every
call: auto_LiRPA 0.3's fused IBP pass skips that node's forward, and CROWN's backward pass
reads the labels the forward stored, so a module reused on a new batch gave unsound bounds
(found by our tests; its own examples always run a forward pass first).

α-CROWN (Xu et al., ICLR 2021: CROWN with the lower ReLU slopes α ∈ [0, 1] optimised by
gradient ascent on the bound, ``method="CROWN-Optimized"``) needs shims 8 and 9 of
:mod:`~certbench.bounds.lirpa_compat` (without them α never moves on torch 2.14, and float64
bounds came back rounded to float32). Every iterate is a CROWN bound with some slopes in [0, 1]
and auto_LiRPA returns the best one per margin, starting from CROWN's own slopes, so the answer
is a valid bound never looser than CROWN's (up to rounding). A call may be given a time limit
(:class:`BoundTimeLimitExceeded`, checked after every iteration) and per-margin targets: the
optimisation of a sample stops once all its bounds exceed them. Its α are kept for every neuron of
each start node (``sparse_spec_alpha`` off): 0.3's sparse-spec α failed an assertion on
BatchNorm CNNs when a later pass bounded a start node densely.

BatchNorm (Shi et al., NeurIPS 2021, "Fast certified robust training with short warmup", second improvement:
in training, the bounds normalise with the mean and variance of the clean batch, used as constants
of the propagation): auto_LiRPA 0.3's BatchNorm node takes its training-mode statistics from its last
*forward* pass, which ``compute_bounds`` does not run, so a module called as the training methods
call it bounded a network normalised by the statistics of some earlier pass (at ε = 0 its IBP
margins were off by up to 1.7 on a small BatchNorm MLP). In training mode :class:`Bounder` therefore
runs the BoundedModule's forward on the clean batch before every bound call of a model with
BatchNorm; the statistics keep their autograd graph, as in plain BatchNorm training. The node's
running statistics are copies of the model's (``BoundBuffers`` clone them): that forward's momentum
update touches only the copies, never the model, and the copies are set from the model's running
statistics before every call, so eval-mode bounds of a cached module follow the model as it trains.

Soundness limits of auto_LiRPA 0.3 found here: for an ℓ2 ball the input node carries
``x_L = x_U = x``, so IBP through ``Normalize`` is a zero-width, unsound interval, and
CROWN's default IBP-based choice of unstable neurons inherits it. ℓ2 is therefore offered
for CROWN only, with ``sparse_intermediate_bounds_with_ibp`` off.
"""

from __future__ import annotations

import io
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certbench.bounds import lirpa_compat  # noqa: F401  (first: the version check and the shims)

# isort: split
from auto_LiRPA import BoundedModule, BoundedTensor, CrossEntropyWrapper, PerturbationLpNorm
from auto_LiRPA.operators import (
    BoundBatchNormalization,
    BoundBuffers,
    BoundConv,
    BoundExp,
    BoundGatherElements,
    BoundLinear,
    BoundRelu,
)

from certbench.nn import Normalize, Residual

log = logging.getLogger(__name__)

# --- bound helpers ---------------------------------------------------------------------

BoundMethod = Literal["IBP", "CROWN", "CROWN-IBP", "alpha-CROWN"]
BoundNorm = Literal["linf", "l2"]
BOUND_METHODS: tuple[BoundMethod, ...] = ("IBP", "CROWN", "CROWN-IBP", "alpha-CROWN")
_AUTO_LIRPA_METHOD = {
    "IBP": "IBP",
    "CROWN": "backward",
    "CROWN-IBP": "CROWN-IBP",
    "alpha-CROWN": "CROWN-Optimized",
}


@dataclass(frozen=True)
class AlphaCROWN:
    """Settings of α-CROWN's optimisation: Adam steps on the slopes, their learning rate (decayed
    by 0.98 a step, auto_LiRPA's default) and a limit in seconds for one call (None: none)."""

    iterations: int = 20
    lr: float = 0.5
    time_limit: float | None = None


class BoundTimeLimitExceeded(TimeoutError):
    """An α-CROWN call ran past its time limit; its bounds are not returned."""


#: Module types whose bounds auto_LiRPA computes soundly here (exact types: a subclass may
#: change ``forward``); ℓ∞-dist layers and other activations are not among them. auto_LiRPA
#: parses a model holding Dropout in train mode (its Dropout node is the identity in eval
#: mode). Some types are bounded correctly only with some settings, see :func:`_setting_problem`.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    Normalize,
    Residual,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
)


def _pair(value: Any) -> tuple[Any, Any]:
    return (value[0], value[-1]) if isinstance(value, (tuple, list)) else (value, value)


def _setting_problem(module: nn.Module) -> str | None:
    """Why auto_LiRPA 0.3 would bound this module of a supported type wrongly, or None.

    * ``AvgPool2d``: its ``BoundAveragePool`` always pools with ``ceil_mode=False`` and
      ``count_include_pad=True`` (the ONNX graph carries neither ``divisor_override`` nor the
      others), and its backward (CROWN) pass spreads each output over a kernel-sized block, right
      only for windows that tile the input: kernel = stride, no padding.
    * ``Conv2d``: ``BoundPad`` pads with a constant, so reflect, replicate and circular padding
      are bounded as zero padding.
    * ``AdaptiveAvgPool2d``: parsed as global average pooling, so only a 1×1 output is right.
    * ``BatchNorm``: without running statistics the layer normalises by the batch, even in eval mode.
    """
    kind = type(module)
    if kind is nn.AvgPool2d:
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        if kernel != stride:
            return (
                f"overlapping or gapped windows (kernel {kernel}, stride {stride}): kernel must equal stride"
            )
        if module.ceil_mode:
            return "ceil_mode=True: must be False"
        if not module.count_include_pad:
            return "count_include_pad=False: must be True"
        if module.divisor_override is not None:
            return f"divisor_override={module.divisor_override}: must be None"
        if _pair(module.padding) != (0, 0):
            return f"padding {module.padding}: must be 0"
    if kind is nn.Conv2d and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: auto_LiRPA 0.3 pads with zeros only"
    if kind is nn.AdaptiveAvgPool2d and _pair(module.output_size) != (1, 1):
        return f"output_size {module.output_size}: only 1×1 (global average pooling)"
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d) and (
        module.running_mean is None or module.running_var is None
    ):
        return "track_running_stats=False: normalises by the batch"
    return None


def _unsupported(name: str, module: nn.Module) -> str | None:
    where = f"layer '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
    if type(module) not in SUPPORTED_MODULES:
        return f"{where}: auto_LiRPA bounds are not offered for this layer type (exact types only)"
    problem = _setting_problem(module)
    return None if problem is None else f"{where}: {problem}"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why auto_LiRPA 0.3 cannot bound ``model`` soundly here (the first layer at fault), or None."""
    for name, module in model.named_modules():
        reason = _unsupported(name, module)
        if reason is not None:
            return reason
    return None


def supports(model: nn.Module) -> bool:
    """Whether every module of ``model`` is one auto_LiRPA bounds soundly (a ReLU network);
    :func:`unsupported_reason` says why not."""
    return unsupported_reason(model) is None


def specification_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C of shape (B, K−1, K) with rows e_y − e_j for j ≠ y, so C·z are the margins z_y − z_j."""
    eye = torch.eye(num_classes, device=y.device)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row j = e_y − e_j
    keep = eye[y] == 0  # drop j = y
    return rows[keep].view(len(y), num_classes - 1, num_classes)


def robust_cross_entropy(lower: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over ``−lower`` padded with 0 at the label (Zhang et al. 2020, eq. 5).

    ``lower`` (B, K−1) bounds z_y − z_j from below, so −lower bounds z_j − z_y from above:
    worst-case logits relative to the label's. Cross-entropy does not depend on the order
    of the classes, so the label's 0 goes first and the target is class 0.
    """
    padded = torch.cat([lower.new_zeros(len(lower), 1), -lower], dim=1)
    return F.cross_entropy(padded, lower.new_zeros(len(lower), dtype=torch.long))


def input_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ℓ∞ ball of radius ε around x, clipped to the input domain [0, 1]."""
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def ball(
    x: torch.Tensor, eps: float, norm: BoundNorm, box: tuple[torch.Tensor, torch.Tensor] | None = None
) -> PerturbationLpNorm:
    """ℓ∞: the box ``input_box(x, ε)``, or ``box`` = (lower, upper) when given (elementwise bounds of
    x's shape, e.g. a sub-box of the ε-ball); ℓ2: the ball ‖δ‖₂ ≤ ε, unclipped (a superset: still sound)."""
    if not eps >= 0 or (norm == "linf" and eps > 1):
        raise ValueError(f"eps must be ≥ 0 (and ≤ 1 for linf), got {eps}")
    if box is not None:
        lower, upper = box
        if norm != "linf" or lower.shape != x.shape or upper.shape != x.shape:
            raise ValueError("an explicit input box is an ℓ∞ box of the input's shape")
        return PerturbationLpNorm(norm=np.inf, eps=eps, x_L=lower, x_U=upper)
    if norm == "linf":
        x_lower, x_upper = input_box(x, eps)
        return PerturbationLpNorm(norm=np.inf, eps=eps, x_L=x_lower, x_U=x_upper)
    if norm == "l2":
        return PerturbationLpNorm(norm=2, eps=eps)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


def _alpha_crown(
    bounded: BoundedModule,
    x: torch.Tensor,
    perturbation: PerturbationLpNorm,
    spec: torch.Tensor,
    settings: AlphaCROWN,
    targets: torch.Tensor | None,
) -> torch.Tensor:
    """α-CROWN lower bounds (B, K−1) of ``spec``·logits: the best over the iterations, per margin."""
    started = time.perf_counter()

    def over_time() -> bool:
        return settings.time_limit is not None and time.perf_counter() - started > settings.time_limit

    def stop(lower: torch.Tensor) -> torch.Tensor | bool:
        """auto_LiRPA's stop criterion, asked after every iteration: (B, 1), True where done."""
        if over_time():
            raise BoundTimeLimitExceeded(
                f"alpha-CROWN ran past its time limit of {settings.time_limit:g} s "
                f"({time.perf_counter() - started:.3g} s, {len(x)} samples)"
            )
        return False if targets is None else (lower.detach() > targets).all(dim=1, keepdim=True)

    bounded.set_bound_opts(
        {
            "optimize_bound_args": {
                "iteration": settings.iterations,
                "lr_alpha": settings.lr,
                "stop_criterion_func": stop,
            }
        }
    )
    printed = io.StringIO()  # auto_LiRPA prints its early stops
    with torch.enable_grad(), redirect_stdout(printed):
        lower, _ = bounded.compute_bounds(
            x=(BoundedTensor(x, perturbation),), C=spec, method="CROWN-Optimized", bound_upper=False
        )
    if printed.getvalue().strip():
        log.debug("auto_LiRPA: %s", printed.getvalue().strip())
    stop(lower)  # the time limit covers the whole call
    return lower.detach()


class Bounder:
    """Lower bounds on the margins z_y − z_j over an ε-ball, through a cached BoundedModule.

    The BoundedModule shares the model's parameters, so training may keep one Bounder for
    all steps; it is rebuilt when the model, its tensors, the norm or the input shape
    change, and after any failed call. Copies (``deepcopy``, pickling) start empty.
    Building one writes the model's parameters back in place (auto_LiRPA restores its
    state dict), which invalidates autograd graphs recorded before: bound first, then run
    any forward pass you will differentiate.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._model_ref: weakref.ref[nn.Module] | None = None
        self._bounded: BoundedModule | None = None
        #: (the BoundedModule's copy, the model's tensor) of every running statistic of a BatchNorm
        self._running: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._batch_norm = False

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    @staticmethod
    def _key_of(model: nn.Module, norm: BoundNorm, x: torch.Tensor, fused: bool) -> tuple[Any, ...]:
        tensors = tuple(id(t) for t in (*model.parameters(), *model.buffers()))
        return norm, fused, tuple(x.shape[1:]), x.device, x.dtype, tensors

    def _module(
        self, model: nn.Module, norm: BoundNorm, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> BoundedModule:
        """The cached BoundedModule of ``model``, or of its loss-fusion wrapper when ``labels`` are given."""
        fused = labels is not None
        key = self._key_of(model, norm, x, fused)
        if (
            self._bounded is None
            or self._key != key
            or self._model_ref is None
            or self._model_ref() is not model
        ):
            reason = unsupported_reason(model)
            if reason is not None:
                raise ValueError(reason)
            self._bounded = None
            training = model.training
            model.eval()  # building runs the model: leave BatchNorm statistics alone
            try:
                with torch.no_grad():
                    # ℓ2: choose unstable neurons by CROWN itself, not by (unsound, zero-width) IBP.
                    # α over the unstable neurons of a start node only (sparse spec) failed an
                    # assertion in 0.3 when a later pass bounds that node densely: full α instead.
                    opts = {
                        "sparse_intermediate_bounds_with_ibp": norm == "linf",
                        "loss_fusion": fused,
                        "sparse_spec_alpha": False,
                    }
                    source = CrossEntropyWrapper(model).eval() if fused else model
                    bounded = (
                        BoundedModule(source, (x.detach(), labels), bound_opts=opts)
                        if fused
                        else BoundedModule(source, x.detach(), bound_opts=opts)
                    )
            finally:
                model.train(training)
            buffers = dict(source.named_buffers())
            self._running = [
                (node.buffer, buffers[node.ori_name])
                for node in bounded.modules()
                if isinstance(node, BoundBuffers) and node.ori_name in buffers
            ]
            self._batch_norm = any(isinstance(node, BoundBatchNormalization) for node in bounded.modules())
            self._bounded, self._model_ref = bounded, weakref.ref(model)
            self._key = self._key_of(model, norm, x, fused)  # conversion may re-create buffers on GPU
        self._bounded.train(model.training)
        return self._bounded

    def preactivation_bounds(
        self,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The intervals of the last bound call's IBP pass, still attached to the autograd graph:
        ``(reference, layers)``, where ``reference`` is the box entering the first affine layer
        (the normalised input box) and ``layers`` the (lower, upper) of every ReLU's input, in graph
        order. CROWN-IBP bounds the hidden layers by IBP, so after either kind of call these are IBP
        intervals. Read them before the next call, which overwrites them."""
        if self._bounded is None:
            raise RuntimeError("no bounds computed yet: call margin_lower_bounds first")
        nodes = list(self._bounded.modules())
        affine = next((n for n in nodes if isinstance(n, (BoundLinear, BoundConv))), None)
        relus = [n.inputs[0] for n in nodes if isinstance(n, BoundRelu)]
        found = [affine.inputs[0], *relus] if affine is not None else []
        if not relus or any(getattr(n, "lower", None) is None for n in found):
            raise RuntimeError("the bounded model has no affine layer followed by ReLUs with IBP bounds")
        first = affine.inputs[0]
        return (first.lower, first.upper), [(n.lower, n.upper) for n in relus]

    def _normalise(self, bounded: BoundedModule, *inputs: torch.Tensor) -> None:
        """Before a bound call: the module's running statistics set to the model's, and in training
        mode its BatchNorm nodes given the statistics of the clean batch ``inputs`` by a forward pass
        (Shi et al. 2021, second improvement; see the module docstring). Models without BatchNorm: nothing."""
        with torch.no_grad():
            for copy, original in self._running:
                copy.copy_(original)
        if self._batch_norm and bounded.training:
            bounded(*inputs)

    @contextmanager
    def _discarded_on_failure(self) -> Iterator[None]:
        """A BoundedModule whose call raised keeps per-call state on its nodes: never reuse it."""
        try:
            yield
        except Exception:
            self._bounded = self._key = self._model_ref = None
            raise

    def margin_lower_bounds(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        methods: Sequence[BoundMethod],
        norm: BoundNorm = "linf",
        alpha: AlphaCROWN | None = None,
        targets: torch.Tensor | None = None,
        box: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[BoundMethod, torch.Tensor]:
        """Lower bounds (B, K−1) on z_y − z_j, j ≠ y, over the ε-ball, for each of ``methods``.

        The perturbation set is :func:`ball`, or the ℓ∞ box ``box`` = (lower, upper) when given
        (SABR's small boxes); ℓ2 is offered for CROWN only. Gradients flow to
        the model's parameters unless the caller disables them (except for α-CROWN, whose bound is
        detached). In training mode a BatchNorm normalises by the statistics of the clean batch ``x``
        (also when ``box`` is given; Shi et al. 2021, second improvement), in eval mode by the model's running
        statistics. IBP and CROWN-IBP asked together share one IBP pass. α-CROWN runs with
        ``alpha`` (default :class:`AlphaCROWN`); ``targets`` (B, K−1), if given, end the
        optimisation of a sample once all its bounds exceed them.
        """
        unknown = [m for m in methods if m not in BOUND_METHODS]
        if unknown or not methods:
            raise ValueError(f"bound methods {list(methods)}: choose from {', '.join(BOUND_METHODS)}")
        if norm == "l2" and set(methods) != {"CROWN"}:
            raise ValueError(
                "ℓ2 bounds: auto_LiRPA 0.3 propagates IBP through Normalize with zero width "
                "(unsound), so only CROWN is offered"
            )
        perturbation = ball(x, eps, norm, box)
        bounded = self._module(model, norm, x)
        spec = specification_matrix(y, int(bounded.final_shape[1])).to(x.dtype)
        results: dict[BoundMethod, torch.Tensor] = {}
        with self._discarded_on_failure():
            self._normalise(bounded, x)
            for method in [m for m in BOUND_METHODS if m in methods]:
                if method == "IBP" and "CROWN-IBP" in methods:
                    continue  # read off the CROWN-IBP call below
                if method == "alpha-CROWN":
                    results[method] = _alpha_crown(
                        bounded, x, perturbation, spec, alpha or AlphaCROWN(), targets
                    )
                    continue
                lower, _ = bounded.compute_bounds(
                    x=(BoundedTensor(x, perturbation),),
                    C=spec,
                    method=_AUTO_LIRPA_METHOD[method],
                    bound_upper=False,
                )
                results[method] = lower
                if method == "CROWN-IBP" and "IBP" in methods:
                    results["IBP"] = bounded.ibp_lower  # the IBP pass CROWN-IBP starts with
        return {m: results[m] for m in methods}

    def fused_cross_entropy_upper_bounds(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        methods: Sequence[Literal["IBP", "CROWN-IBP"]],
    ) -> dict[BoundMethod, torch.Tensor]:
        """Upper bounds (B,) on max CE(f(x'), y) over the ℓ∞ box, by loss fusion (Xu et al., NeurIPS 2020).

        auto_LiRPA bounds S = Σ_j exp(z_j − z_y) (``CrossEntropyWrapper``, one output per sample)
        instead of the K−1 margins, so CROWN's backward pass carries one row, not K−1;
        CE = log S. Its Exp node subtracts M = max of its input's upper bound, so the bound is
        log(ub) + M: with IBP's M (differentiable, taken from the same interval) this equals
        :func:`robust_cross_entropy` of the IBP margin bounds; CROWN's M is detached, a constant.
        IBP and CROWN-IBP asked together share one IBP pass.
        """
        if not methods or not set(methods) <= {"IBP", "CROWN-IBP"}:
            raise ValueError(f"loss fusion bounds {list(methods)}: choose from IBP, CROWN-IBP")
        perturbation = ball(x, eps, "linf")
        bounded = self._module(model, "linf", x, labels=y)
        exp = next(node for node in bounded.modules() if isinstance(node, BoundExp))
        gather = next(node for node in bounded.modules() if isinstance(node, BoundGatherElements))
        gather.index = y.unsqueeze(-1)  # the fused IBP pass skips the node's forward; CROWN reads this
        method = "CROWN-IBP" if "CROWN-IBP" in methods else "IBP"
        with self._discarded_on_failure():
            self._normalise(bounded, x, y)
            _, upper = bounded.compute_bounds(
                x=(BoundedTensor(x, perturbation), y), C=None, method=method, bound_lower=False
            )
            results: dict[BoundMethod, torch.Tensor] = {method: (upper.log() + exp.max_input).squeeze(-1)}
            if method == "CROWN-IBP" and "IBP" in methods:
                shift = exp.inputs[0].upper.max(dim=-1, keepdim=True)[0]  # IBP's M, differentiable
                results["IBP"] = (bounded.ibp_upper.log() + shift).squeeze(-1)
        return {m: results[m] for m in methods}
