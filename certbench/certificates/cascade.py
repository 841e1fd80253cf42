"""A verifier cascade: IBP, then CROWN-IBP, then CROWN, then α-CROWN, each on what the cheaper ones left.

Per batch (``batch_size`` points, default 256) and ε, the stages run in the order given (default:
IBP, Gowal et al. 2018; CROWN-IBP, Zhang et al. 2020; CROWN, Zhang et al. 2018; α-CROWN, Xu et al.
2021), each only on the samples no earlier stage proved; a sample is certified by the first stage
whose bounds prove all its margins.
Every stage is the registered certificate of that name, asked for its float64 margin bounds on the
still-open samples and judged by the same rule (:func:`~certbench.certificates.lirpa.needed_margins`:
the rounding slack and the float32 error bound on the box, computed once per batch), so a sample
the cascade certifies is one that stage's own certificate certifies too, and the cascade certifies
the union of its stages, each run alone: a sample's IBP, CROWN-IBP and CROWN bounds do not depend
on the rest of its batch (for CROWN, shim 11 of :mod:`certbench.bounds.lirpa_compat`); α-CROWN's
optimisation may end early on a rule that looks at the whole batch (auto_LiRPA's patience), so
there the union holds up to the batch it ran in. When CROWN runs before α-CROWN, α-CROWN starts
from CROWN's bounds (kept in :data:`~certbench.certificates.lirpa.CROWN_MEMO`) instead of
computing them again. Misclassified points are never certified.

Each stage runs the points that reach it in batches of its own size (its certificate's: CROWN's and
α-CROWN's sized by memory), so the few points a batch leaves to α-CROWN are not optimised in
many small calls: α-CROWN's cost per call hardly shrinks with the number of points.

``time_limit`` (default none) is a budget in seconds per batch and ε: it is checked before each
stage and during α-CROWN's iterations (a running IBP, CROWN-IBP or CROWN call is not interrupted);
once it is spent, the samples no stage has proved yet get status ``error``, with the reason, never a
status they were not proven for. A sample still unproven after the last stage is ``not_certified``.

The result records, per sample and ε, the stage that certified it (``verifier``); ``extra`` holds
the seconds spent in each stage (``seconds_<stage>``). ``certificates: [all]`` leaves the cascade
out (``in_all`` False): its certified set is that of its stages, which ``all`` already runs one by
one; name it to get the per-sample record and a single, budgeted run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from torch import nn

from certbench.bounds.lirpa import Bounder, BoundTimeLimitExceeded
from certbench.certificates import (
    CERTIFICATES,
    CERTIFIED,
    ERROR,
    NOT_CERTIFIED,
    CertificateResult,
    register_certificate,
)
from certbench.certificates.lirpa import (
    AlphaCROWNCertificate,
    CROWNCertificate,
    LiRPACertificate,
    needed_margins,
    proven,
)

#: The stages a cascade may run, cheapest first (the default order).
STAGES = ("ibp", "crown-ibp", "crown", "alpha-crown")


@register_certificate("cascade")
class CascadeCertificate(LiRPACertificate):
    """IBP → CROWN-IBP → CROWN → α-CROWN, each on the samples the cheaper ones left unproven, with a
    time budget per batch and a per-sample record of the stage that certified (module docstring)."""

    in_all = False
    #: Points per cascade batch (``batch_size`` null); each stage runs its share in its own batches.
    default_batch_size = 256
    params_schema = {
        **LiRPACertificate.params_schema,
        "stages": {
            "type": "array",
            "items": {"enum": list(STAGES)},
            "minItems": 1,
            "uniqueItems": True,
            "default": list(STAGES),
        },
        "alpha_iterations": {"type": "integer", "minimum": 1, "default": 20},
        "alpha_lr": {"type": "number", "exclusiveMinimum": 0, "default": 0.5},
        "time_limit": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None},
    }
    stages: list[str]
    alpha_iterations: int
    alpha_lr: float
    time_limit: float | None

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._stages: list[LiRPACertificate] = []
        for name in self.stages:
            stage_params: dict[str, Any] = {"batch_size": self.batch_size}
            if name == "alpha-crown":
                stage_params.update(iterations=self.alpha_iterations, lr=self.alpha_lr, time_limit=None)
            stage = CERTIFICATES.get(name)(**stage_params)
            if not isinstance(stage, LiRPACertificate):
                raise TypeError(f"cascade stage '{name}' is not an auto_LiRPA certificate")
            self._stages.append(stage)
        # per certify call: the stage that certified each (ε, sample), the errors of the budget, seconds
        self._by: dict[float, np.ndarray] = {}
        self._budget_errors: dict[tuple[float, int], str] = {}
        self._seconds: dict[str, float] = {}

    def _refusal(self, model: nn.Module) -> str | None:
        for stage in self._stages:
            reason = stage._refusal(model)
            if reason is not None:
                return reason
        return None

    def certify(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]
    ) -> CertificateResult:
        self._by = {float(e): np.full(len(x), "", dtype=f"<U{max(map(len, STAGES))}") for e in eps}
        self._budget_errors, self._seconds = {}, {stage.name: 0.0 for stage in self._stages}
        with ExitStack() as memos:  # CROWN's bounds kept for α-CROWN (CROWN_MEMO)
            for stage in self._stages:
                if isinstance(stage, CROWNCertificate):
                    memos.enter_context(stage.memo_for(model))
            result = super().certify(model, x, y, eps)
        verifier = {}
        for e, status in result.status.items():
            verifier[e] = np.where(status == CERTIFIED, self._by[e], "")
            # a budget error stands only where the sample's final status is that error
            result.errors.extend(
                message
                for (at, i), message in sorted(self._budget_errors.items())
                if at == e and status[i] == ERROR
            )
        result.verifier = verifier
        result.extra.update({f"seconds_{name}": seconds for name, seconds in self._seconds.items()})
        return result

    def _certified(
        self,
        bounder: Bounder,
        model: nn.Module,
        model64: nn.Module,
        depth: int,
        x: torch.Tensor,
        y: torch.Tensor,
        index: np.ndarray,
        eps: float,
    ) -> np.ndarray:
        """The stages in turn on the samples still open; records who certified each sample."""
        started = time.perf_counter()
        picked = torch.as_tensor(index, device=x.device)
        xb, yb = x[picked], y[picked]
        by = self._by[float(eps)]
        by[index] = ""
        status = np.full(len(index), NOT_CERTIFIED, dtype=f"<U{len(NOT_CERTIFIED)}")
        with torch.no_grad():
            needed = needed_margins(model, depth, xb, yb, eps)
            x64 = xb.double()
            open_ = torch.ones(len(index), dtype=torch.bool, device=xb.device)
            for stage in self._stages:
                if not open_.any():
                    break
                spent = time.perf_counter() - started
                if self.time_limit is not None and spent >= self.time_limit:
                    self._over_budget(index, open_, status, eps, f"before stage {stage.name}", spent)
                    break
                rows = open_.nonzero().squeeze(1)
                stage_started = time.perf_counter()
                lower = torch.empty(len(rows), needed.shape[1], dtype=needed.dtype, device=needed.device)
                step = stage._batch(model, xb)
                try:
                    for start in range(0, len(rows), step):  # the stage's own batch size
                        part = slice(start, start + step)
                        lower[part] = self._stage_bounds(
                            stage, bounder, model64, x64, yb, eps, needed, rows[part], started
                        )
                except BoundTimeLimitExceeded:
                    spent = time.perf_counter() - started
                    self._over_budget(index, open_, status, eps, f"in stage {stage.name}", spent)
                    break
                finally:
                    self._seconds[stage.name] += time.perf_counter() - stage_started
                done = proven(lower, needed[rows])
                certified = rows[done].cpu().numpy()
                by[index[certified]] = stage.name
                status[certified] = CERTIFIED
                open_[rows[done]] = False
        return status

    def _stage_bounds(
        self,
        stage: LiRPACertificate,
        bounder: Bounder,
        model64: nn.Module,
        x64: torch.Tensor,
        y: torch.Tensor,
        eps: float,
        needed: torch.Tensor,
        rows: torch.Tensor,
        started: float,
    ) -> torch.Tensor:
        """``stage``'s float64 margin bounds on ``rows``; α-CROWN gets what is left of the budget."""
        if isinstance(stage, AlphaCROWNCertificate):
            left = None if self.time_limit is None else self.time_limit - (time.perf_counter() - started)
            return stage.optimised_bounds(bounder, model64, x64[rows], y[rows], eps, needed[rows], left)
        return stage._lower_bounds(bounder, model64, x64[rows], y[rows], eps, needed[rows])

    def _over_budget(
        self,
        index: np.ndarray,
        open_: torch.Tensor,
        status: np.ndarray,
        eps: float,
        where: str,
        spent: float,
    ) -> None:
        """The samples still open get status ``error``: the budget ran out before they were proven."""
        rows = open_.nonzero().squeeze(1).cpu().numpy()
        status[rows] = ERROR
        for i in index[rows]:
            self._budget_errors[(float(eps), int(i))] = (
                f"sample {i}, eps {eps}: cascade ran past its time limit of {self.time_limit:g} s "
                f"{where} ({spent:.3g} s, {len(index)} samples in the batch)"
            )
