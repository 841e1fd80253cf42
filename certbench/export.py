"""Export for external verifiers: trained runs as ONNX, their test points as VNN-LIB properties.

``certbench export --out-dir DIR RUN_DIR...`` writes a benchmark folder in the layout of VNN-COMP:

    DIR/onnx/<dataset>_<name>_<arch>_seed<k>.onnx          one model per run (opset :data:`OPSET`)
    DIR/vnnlib/<dataset>_<index>_linf_<eps>.vnnlib         one property per test point and ℓ∞ ε
    DIR/instances.csv                                      onnx,vnnlib,timeout: every model × its properties
    DIR/export.json                                        per run: status, file, the onnxruntime check

Normalisation is the model's first layer, so a property's input box is the ℓ∞ ball of radius ε
around the test point in pixel units, clipped to [0, 1] (its bounds rounded outward in float64);
its output constraint is the negation of robustness, as VNN-COMP writes it: some other logit is at
least the true label's (a verifier that proves it unsatisfiable proves the point robust at ε).
Properties depend on the data set's test points only, so runs on one data set share them. Every
ONNX file is read back with onnxruntime and its logits on the run's test points compared with the
model's; a relative difference above :data:`certbench.external.TOLERANCE` fails that run's export.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certbench.config import eps_by_norm, format_eps
from certbench.data.specs import DATASETS
from certbench.evaluate import load_model, test_points
from certbench.external import TOLERANCE, first_line, onnxruntime_difference
from certbench.storage import atomic_write_bytes, read_json, sha256_bytes, write_json

#: The ONNX opset of exported models (wide support among verifiers).
OPSET = 13


class ExportError(RuntimeError):
    """A model that could not be exported faithfully; one line naming the run."""


def onnx_bytes(model: nn.Module, shape: Sequence[int]) -> bytes:
    """``model`` (on the CPU, in eval mode) as an ONNX file: input ``input`` of shape (batch, *shape),
    output ``logits``, the batch dimension dynamic."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, *shape),),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def _bounds(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The box of the ℓ∞ ball of radius ``eps`` around ``x`` within [0, 1], rounded outward."""
    x = x.astype(np.float64).reshape(-1)
    lower = np.maximum(np.nextafter(x - eps, -np.inf), 0.0)
    upper = np.minimum(np.nextafter(x + eps, np.inf), 1.0)
    return lower, upper


def vnnlib_property(x: np.ndarray, label: int, eps: float, num_classes: int, comment: str) -> str:
    """One VNN-LIB property: inputs ``X_i`` in the ε-box of ``x`` (flattened in C order), outputs
    ``Y_j``, and the disjunction "some ``Y_j`` with j ≠ label is ≥ ``Y_label``" (the unsafe set)."""
    lower, upper = _bounds(x, eps)
    lines = [f"; {comment}", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(len(lower))]
    lines += [""] + [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines += ["", f"; input: the l-inf ball of radius {format_eps(eps)} around the test point, within [0, 1]"]
    for i, (low, high) in enumerate(zip(lower, upper)):
        lines += [f"(assert (>= X_{i} {float(low)!r}))", f"(assert (<= X_{i} {float(high)!r}))"]
    lines += ["", f"; output: unsafe where another logit is at least that of label {label}", "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label]
    lines += ["))", ""]
    return "\n".join(lines)


def _run_name(run_config: dict[str, Any]) -> str:
    run = run_config["run"]
    return f"{run['dataset']}_{run['name']}_{run['arch']}_seed{run['seed']}"


def export_runs(run_dirs: Sequence[Path], out_dir: Path, timeout: float) -> dict[str, Any]:
    """Export every run of ``run_dirs`` that trained fine into ``out_dir`` (see the module's
    docstring); returns what ``export.json`` holds. A run that cannot be exported, or whose ONNX file
    fails the onnxruntime check, is listed with status ``failed`` and its reason, and left out of
    ``instances.csv``; the other runs are exported all the same."""
    runs: dict[str, dict[str, Any]] = {}
    instances: list[str] = []
    written: set[str] = set()
    for run_dir in run_dirs:
        run_config = read_json(run_dir / "run.json")
        name = _run_name(run_config)
        status = read_json(run_dir / "train.json")["status"]
        if status != "ok":
            runs[name] = {"run_dir": str(run_dir), "status": f"skipped ({status})"}
            continue
        indices, x, y = test_points(run_config)
        model = load_model(run_config, run_dir, torch.device("cpu"))
        try:
            data = onnx_bytes(model, tuple(x.shape[1:]))
            difference = onnxruntime_difference(model, data, x)
        except Exception as error:  # noqa: BLE001 - an exporter or runtime failure fails this run only
            difference, data, reason = math.nan, b"", first_line(error)
        else:
            reason = None
            if not difference <= TOLERANCE:
                reason = (
                    f"onnxruntime's logits differ by {difference:.3g} (relative; tolerance {TOLERANCE:g})"
                )
        entry = {"run_dir": str(run_dir), "relative_difference": difference, "tolerance": TOLERANCE}
        if reason is not None:
            runs[name] = {**entry, "status": "failed", "message": f"{run_dir}: export failed: {reason}"}
            continue
        onnx_path = f"onnx/{name}.onnx"
        atomic_write_bytes(out_dir / onnx_path, data, with_hash=False)
        runs[name] = {**entry, "status": "ok", "onnx": onnx_path, "sha256": sha256_bytes(data)}
        dataset = run_config["dataset"]["name"]
        num_classes = DATASETS.get(dataset).num_classes
        for index, point, label in zip(indices.tolist(), x.numpy(), y.tolist()):
            for eps in eps_by_norm(run_config)["linf"]:
                vnnlib_path = f"vnnlib/{dataset}_{index}_linf_{format_eps(eps)}.vnnlib"
                if vnnlib_path not in written:
                    comment = f"{dataset} test point {index}, label {label}, l-inf eps {format_eps(eps)}"
                    text = vnnlib_property(point, label, eps, num_classes, comment)
                    atomic_write_bytes(out_dir / vnnlib_path, text.encode(), with_hash=False)
                    written.add(vnnlib_path)
                instances.append(f"{onnx_path},{vnnlib_path},{timeout:g}")
    atomic_write_bytes(
        out_dir / "instances.csv", "".join(f"{line}\n" for line in instances).encode(), with_hash=False
    )
    result = {"opset": OPSET, "timeout": timeout, "runs": runs}
    write_json(out_dir / "export.json", result)
    return result
