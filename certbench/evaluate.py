"""Evaluation of one trained run: clean predictions and margins, every certificate.

The test points are the first ``test_size`` items of a fixed permutation of the test
split, the same for every run, so per-sample columns line up across methods.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certbench.certificates import CERTIFICATES, ERROR, margins
from certbench.config import eps_by_norm, format_eps
from certbench.data.loaders import load_split
from certbench.method import get_method, run_context
from certbench.precision import strict_float32, strict_precision
from certbench.progress import Progress
from certbench.records import load_tensors
from certbench.storage import read_json, write_json
from certbench.train import peak_memory_mb, select_device, subset

log = logging.getLogger(__name__)


def test_points(run_config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices into the test split, images, labels) of the evaluated test points."""
    _, (_, test_set) = load_split(
        run_config["dataset"]["name"], run_config["data"]["dir"], run_config["data"]["download"]
    )
    chosen = subset(test_set, run_config["dataset"]["test_size"])
    indices = torch.tensor(chosen.indices if hasattr(chosen, "indices") else range(len(test_set)))
    xs, ys = zip(*(chosen[i] for i in range(len(chosen))))  # type: ignore[arg-type]
    return indices, torch.stack(xs), torch.as_tensor(ys)


def load_model(run_config: Mapping[str, Any], run_dir: Path, device: torch.device) -> nn.Module:
    """Rebuild the architecture and load ``model.pt`` (hash-checked, ``weights_only=True``); an
    external model's by :func:`certbench.external.load_imported`."""
    if "external" in run_config:
        from certbench.external import load_imported

        return load_imported(run_config, run_dir / "model.pt").to(device).eval()
    method = get_method(run_config["method"])(run_config["params"], run_context(run_config, device))
    model = method.build_model(run_config["run"]["arch"], run_config["arch_params"])
    model.load_state_dict(load_tensors(run_dir / "model.pt", map_location="cpu"))
    return model.to(device).eval()


@torch.no_grad()
def predict_all(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and margins z_y − max_{j≠y} z_j, batched."""
    predictions, margin = [], []
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        predictions.append(logits.argmax(1).cpu())
        margin.append(margins(logits, y[start : start + batch_size]).cpu())
    return torch.cat(predictions).numpy(), torch.cat(margin).numpy()


def _dtypes(model: nn.Module) -> list[str]:
    """The floating dtypes of the model's parameters and buffers (the arithmetic its forward pass uses)."""
    return sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for t in (*model.parameters(), *model.buffers())
            if t.is_floating_point()
        }
    )


def _certify_one(
    name: str,
    params: Mapping[str, Any],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: Mapping[str, list[float]],
) -> dict[str, Any]:
    certificate = CERTIFICATES.get(name)(**params)
    try:
        reason = certificate.refusal(model)
    except Exception as error:  # noqa: BLE001 - a failing check refuses: never certify what was not checked
        log.error("certificate %s: applicability check failed:\n%s", name, traceback.format_exc())
        reason = f"applicability check raised {type(error).__name__}: {error}"
    entry: dict[str, Any] = {"norm": certificate.norm, "applicable": reason is None}
    if reason is not None:
        entry["reason"] = reason
        log.info("certificate %s not applicable: %s", name, reason)
        return entry
    started = time.perf_counter()
    log.info("certificate %s on %d samples", name, len(x))
    try:
        result = certificate.certify(model, x, y, eps[certificate.norm])
        entry.update(
            radius=result.radius,
            errors=result.errors,
            extra=result.extra,
            status={format_eps(e): s for e, s in result.status.items()},
        )
        if result.verifier is not None:  # which verifier certified each sample, and how many each
            entry["verifier"] = {format_eps(e): v for e, v in result.verifier.items()}
            entry["certified_by"] = {
                format_eps(e): {name: int(np.sum(v == name)) for name in sorted(set(v.tolist()) - {""})}
                for e, v in result.verifier.items()
            }
    except Exception as error:  # a crashing verifier marks every sample "error", never "not certified"
        log.error("certificate %s failed:\n%s", name, traceback.format_exc())
        entry.update(
            radius=None,
            errors=[f"{type(error).__name__}: {error}"],
            extra={},
            status={format_eps(e): np.full(len(x), ERROR) for e in eps[certificate.norm]},
        )
    entry["seconds"] = time.perf_counter() - started
    return entry


def trained_run(
    run_config: Mapping[str, Any], run_dir: str | Path
) -> tuple[str, tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The run's status and, when it trained fine, its model and (indices, x, y) of its test points,
    on the run's device; a run that did not train fine is skipped."""
    trained = read_json(Path(run_dir) / "train.json")
    if trained["status"] != "ok":
        return f"skipped ({trained['status']})", None
    device = select_device(run_config["device"])
    if device.type == "cuda":  # the job's own peak (peak_memory_mb), not an earlier step's of this process
        torch.cuda.reset_peak_memory_stats(device)
    indices, x, y = test_points(run_config)
    return "ok", (load_model(run_config, Path(run_dir), device), indices, x.to(device), y.to(device))


def selected_certificates(selection: Sequence[str]) -> list[str]:
    """The configured names; ``all`` stands for every registered certificate whose ``in_all`` is set
    (in registry order), followed by the ones named besides it."""
    if "all" not in selection:
        return list(selection)
    default = [name for name in CERTIFICATES.names() if CERTIFICATES.get(name).in_all]
    return default + [name for name in selection if name != "all" and name not in default]


def certify(run_config: Mapping[str, Any], run_dir: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Certify the run's model with every applicable certificate; write ``out_path`` (JSON).

    Predictions and certificates run inside :func:`~certbench.precision.strict_float32` (no TF32,
    no cuDNN/oneDNN convolutions); ``precision`` records the settings read back inside it.
    """
    status, trained = trained_run(run_config, run_dir)
    result: dict[str, Any] = {"status": status}
    if trained is not None:
        model, indices, x, y = trained
        evaluation = run_config["evaluation"]
        eps = eps_by_norm(run_config)
        names = selected_certificates(evaluation["certificates"])
        with strict_float32(x.device) as precision:
            prediction, margin = predict_all(model, x, y, evaluation["batch_size"])
            certificates: dict[str, dict[str, Any]] = {}
            # one line per certificate in a log file (its name and seconds), a bar on a terminal
            with Progress(
                total=len(names), desc="certify", unit="certificate", log=log, log_on_terminal=True
            ) as progress:
                for name in names:
                    entry = _certify_one(
                        name, evaluation["certificate_params"].get(name, {}), model, x, y, eps
                    )
                    certificates[name] = entry
                    progress.update(
                        certificate=name,
                        **(
                            {"seconds": round(entry["seconds"], 2)}
                            if "seconds" in entry
                            else {"applicable": "no"}
                        ),
                    )
        result.update(
            samples={
                "index": indices.numpy(),
                "label": y.cpu().numpy(),
                "prediction": prediction,
                "margin": margin,
            },
            clean_accuracy=float(np.mean(prediction == y.cpu().numpy())),
            precision={**precision, "model_dtypes": _dtypes(model)},
            certificates=certificates,
            peak_memory_mb=peak_memory_mb(x.device),
        )
    write_json(out_path, result)
    return result


def attack(run_config: Mapping[str, Any], run_dir: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Attack the run's model with every configured attack; write ``out_path`` (JSON) with, per attack
    and ε (``None`` for a minimum-norm attack), its per-sample fields (:data:`certbench.attacks.FIELDS`)."""
    from certbench.attacks import FIELDS, Attack, attack_table, column

    status, trained = trained_run(run_config, run_dir)
    result: dict[str, Any] = {"status": status}
    if trained is not None:
        model, _, x, y = trained
        evaluation = run_config["evaluation"]
        attacks = [
            Attack(name, **evaluation["attack_params"].get(name, {})) for name in evaluation["attacks"]
        ]
        eps = eps_by_norm(run_config)
        started = time.perf_counter()
        table = attack_table(
            model, x, y, attacks, eps=eps, batch_size=evaluation["batch_size"], seed=run_config["run"]["seed"]
        )
        result.update(
            seconds=time.perf_counter() - started,
            attacks={a.name: {"norm": a.norm, "kind": a.kind, "settings": a.settings} for a in attacks},
            # the attacks search with the user's settings; success is decided by forward
            # passes inside strict_float32 (certbench.attacks.base.Attack.run)
            precision={
                **strict_precision(x.device),
                "model_dtypes": _dtypes(model),
                "scope": "final verification forward passes",
            },
            evaluations=[
                {
                    "attack": a.name,
                    "norm": a.norm,
                    "eps": e,
                    **{field: table[column(field, a.name, e)] for field in FIELDS},
                }
                for a in attacks
                for e in (eps[a.norm] if a.kind == "eps" else [None])
            ],
            peak_memory_mb=peak_memory_mb(x.device),
        )
    write_json(out_path, result)
    return result
