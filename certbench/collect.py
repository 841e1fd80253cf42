"""Per-run records and the cross-run summary. Torch-free (numpy and pandas only).

A run's record joins its training record, certificates and attacks into one JSON
(``record.json``) and one per-sample table (``samples.csv``) with the columns

    index, label, prediction, margin,
    radius:<certificate>                  certified radius in the certificate's norm
    status:<certificate>@<ε>              certified | not_certified | error
    success:<attack>[@<ε>], error:<attack>[@<ε>],
    adv_l2:<attack>[@<ε>], adv_linf:<attack>[@<ε>]   norms measured on the returned example

``summary.csv`` has one row per run with its metrics (see :func:`metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certbench.config import format_eps
from certbench.data.specs import DATASETS
from certbench.storage import atomic_write_bytes, read_json, write_json

ATTACK_FIELDS = ("success", "error", "adv_l2", "adv_linf")


def sample_table(certify: Mapping[str, Any], attack: Mapping[str, Any]) -> pd.DataFrame:
    """The per-sample table of one run (empty when the run was skipped)."""
    if "samples" not in certify:
        return pd.DataFrame()
    columns: dict[str, Any] = dict(certify["samples"])
    for name, entry in certify["certificates"].items():
        if not entry["applicable"]:
            continue
        if entry.get("radius") is not None:
            columns[f"radius:{name}"] = np.asarray(entry["radius"], dtype=float)
        for eps, status in entry["status"].items():
            columns[f"status:{name}@{eps}"] = status
    for column, values in attack.get("table", {}).items():
        if column.split(":")[0] in ATTACK_FIELDS:
            columns[column] = np.asarray(values, dtype=float if column.startswith("adv_") else bool)
    return pd.DataFrame(columns)


def convert_radius(radius: np.ndarray, source: str, target: str, input_dim: int) -> np.ndarray:
    """A radius certified in norm ``source`` as a radius certified in norm ``target``.

    ‖δ‖∞ ≤ ‖δ‖₂ ≤ √d·‖δ‖∞: an ℓ∞ radius r certifies the ℓ2 ball of radius r, and an ℓ2 radius r
    certifies the ℓ∞ ball of radius r/√d.
    """
    if source == target or (source == "linf" and target == "l2"):
        return radius
    return radius / math.sqrt(input_dim)


def radius_certificate_radius(samples: pd.DataFrame, certificates: Mapping[str, Any], norm: str,
                              input_dim: int) -> np.ndarray:
    """Per sample, the largest radius in ``norm`` that a *radius* certificate proves, converted
    between norms (certified at ε iff the radius exceeds ε); NaN for every sample when no
    applicable certificate gives radii, 0 for misclassified samples."""
    correct = (samples["prediction"] == samples["label"]).to_numpy()
    best = np.full(len(samples), np.nan)
    for name, entry in certificates.items():
        if entry["applicable"] and f"radius:{name}" in samples:
            radius = np.nan_to_num(samples[f"radius:{name}"].to_numpy(dtype=float), nan=0.0)
            best = np.fmax(best, convert_radius(radius, entry["norm"], norm, input_dim))
    return np.where(correct | np.isnan(best), best, 0.0)


def status_certified_radius(samples: pd.DataFrame, certificates: Mapping[str, Any], norm: str,
                            input_dim: int) -> np.ndarray:
    """Per sample, the largest ball in ``norm`` that a fixed-ε certificate (IBP, CROWN, …) proves:
    the largest evaluated ε at which one certified the sample, converted between norms (an ℓ∞
    ball of radius ε holds the ℓ2 ball of radius ε; an ℓ2 ball of radius ε holds the ℓ∞ ball of
    radius ε/√d). Certified at ε iff this value is ≥ ε; 0 where none certified."""
    best = np.zeros(len(samples))
    for name, entry in certificates.items():
        if not entry["applicable"] or f"radius:{name}" in samples:
            continue
        for column in (c for c in samples if c.startswith(f"status:{name}@")):
            certified = samples[column].to_numpy() == "certified"
            eps = convert_radius(np.asarray(float(column.rsplit("@", 1)[1])), entry["norm"], norm, input_dim)
            best = np.where(certified, np.maximum(best, float(eps)), best)
    correct = (samples["prediction"] == samples["label"]).to_numpy()
    return np.where(correct, best, 0.0)


def best_certified_radius(samples: pd.DataFrame, certificates: Mapping[str, Any], norm: str,
                          input_dim: int) -> np.ndarray:
    """Per sample, the largest radius in ``norm`` that any certificate proves (0 if misclassified):
    the larger of :func:`radius_certificate_radius` and :func:`status_certified_radius`, so an ℓ∞
    guarantee counts as an ℓ2 one of the same radius and an ℓ2 one as an ℓ∞ one of radius r/√d."""
    radius = np.nan_to_num(radius_certificate_radius(samples, certificates, norm, input_dim), nan=0.0)
    return np.maximum(radius, status_certified_radius(samples, certificates, norm, input_dim))


def smallest_adversarial(samples: pd.DataFrame, norm: str) -> np.ndarray:
    """Per sample, the smallest perturbation in ``norm`` that any attack found (0 if misclassified, inf if none)."""
    smallest = np.full(len(samples), np.inf)
    for column in (c for c in samples if c.startswith(f"adv_{norm}:")):
        suffix = column.split(":", 1)[1]
        found = samples[f"success:{suffix}"].to_numpy(dtype=bool) & ~samples[f"error:{suffix}"].to_numpy(dtype=bool)
        smallest = np.where(found, np.minimum(smallest, samples[column].to_numpy(dtype=float)), smallest)
    correct = (samples["prediction"] == samples["label"]).to_numpy()
    return np.where(correct, smallest, 0.0)


def metrics(record: Mapping[str, Any], samples: pd.DataFrame) -> dict[str, Any]:
    """Summary metrics of one run.

    ``cert:<c>@<ε>`` certified accuracy; ``cert_errors:<c>`` samples with an error status;
    ``median_radius:<c>``/``mean_radius:<c>`` over all test points (0 for misclassified ones) and
    their normalised forms ``…_norm`` (radius / √d, the size of the input; LMT paper §5);
    ``certified:<norm>@<ε>`` accuracy certified by any certificate (radii converted between norms);
    ``robust:<a>@<ε>`` accuracy under attack ``a`` at ε (errors never count as robust);
    ``empirical:<norm>@<ε>`` accuracy under every attack of that norm together.
    """
    row: dict[str, Any] = {}
    certify = record["certify"]
    if samples.empty:
        return row
    d = DATASETS.get(record["run"]["dataset"]).input_dim
    correct = (samples["prediction"] == samples["label"]).to_numpy()
    row["clean_accuracy"] = float(correct.mean())
    for name, entry in certify["certificates"].items():
        row[f"applicable:{name}"] = entry["applicable"]
        if not entry["applicable"]:
            continue
        row[f"cert_seconds:{name}"] = entry["seconds"]
        for key, value in entry.get("extra", {}).items():
            row[f"{key}:{name}"] = value
        errors = np.zeros(len(samples), dtype=bool)
        for eps in entry["status"]:
            status = samples[f"status:{name}@{eps}"].to_numpy()
            row[f"cert:{name}@{eps}"] = float(np.mean(status == "certified"))
            errors |= status == "error"
        row[f"cert_errors:{name}"] = int(errors.sum())
        if f"radius:{name}" in samples:
            radius = np.where(correct, samples[f"radius:{name}"].to_numpy(), 0.0)
            row[f"median_radius:{name}"] = float(np.median(radius))
            row[f"mean_radius:{name}"] = float(np.mean(radius))
            row[f"median_radius_norm:{name}"] = float(np.median(radius)) / math.sqrt(d)
            row[f"mean_radius_norm:{name}"] = float(np.mean(radius)) / math.sqrt(d)
    attacks = record["attack"].get("attacks", {})
    eps_by_norm = {"linf": record["config"]["dataset"]["eps_linf"], "l2": record["config"]["dataset"]["eps_l2"]}
    for norm, values in eps_by_norm.items():
        by_radius = np.nan_to_num(radius_certificate_radius(samples, certify["certificates"], norm, d), nan=0.0)
        by_status = status_certified_radius(samples, certify["certificates"], norm, d)
        for eps in values:
            certified = (by_radius > eps) | (by_status >= float(format_eps(eps)))
            row[f"certified:{norm}@{format_eps(eps)}"] = float(np.mean(certified))
    survives: dict[tuple[str, float], np.ndarray] = {(n, float(e)): correct.copy()
                                                    for n, values in eps_by_norm.items() for e in values}
    for name, info in attacks.items():
        norm = info["norm"]
        for eps in eps_by_norm[norm]:
            if info["kind"] == "eps":
                suffix = f"{name}@{format_eps(eps)}"
                robust = ~samples[f"success:{suffix}"].to_numpy() & ~samples[f"error:{suffix}"].to_numpy()
            else:
                robust = correct & (samples[f"adv_{norm}:{name}"].to_numpy() > eps) & ~samples[f"error:{name}"].to_numpy()
            row[f"robust:{name}@{format_eps(eps)}"] = float(robust.mean())
            survives[(norm, float(eps))] &= robust
        errors = samples[[c for c in samples if c.startswith(f"error:{name}")]].to_numpy().any(axis=1)
        row[f"attack_errors:{name}"] = int(errors.sum())
    if attacks:
        for (norm, eps), alive in survives.items():
            if any(info["norm"] == norm for info in attacks.values()):
                row[f"empirical:{norm}@{format_eps(eps)}"] = float(alive.mean())
    return row


def assemble(run_config_path: Path, train_path: Path, certify_path: Path, attack_path: Path,
             record_path: Path, samples_path: Path) -> dict[str, Any]:
    """Join one run's parts into ``record.json`` and ``samples.csv``."""
    run_config = read_json(run_config_path)
    train = read_json(train_path)
    record = {"run": run_config["run"], "method": run_config["method"], "status": train["status"],
              "message": train["message"], "config": run_config, "config_hash": train["config_hash"],
              "cost": train["cost"], "epochs": train["epochs"], "history": train["history"],
              "provenance": train["provenance"], "certify": read_json(certify_path),
              "attack": read_json(attack_path)}
    samples = sample_table(record["certify"], record["attack"])
    record["metrics"] = metrics(record, samples)
    atomic_write_bytes(samples_path, samples.to_csv(index=False).encode())
    write_json(record_path, {**record, "certify": _without_samples(record["certify"]),
                             "attack": _without_samples(record["attack"]), "samples": samples_path.name})
    return record


def _without_samples(part: Mapping[str, Any]) -> dict[str, Any]:
    """A part of the record with its per-sample arrays left to ``samples.csv``."""
    keep = {k: v for k, v in part.items() if k not in ("samples", "table")}
    if "certificates" in keep:
        keep["certificates"] = {name: {k: v for k, v in entry.items() if k not in ("radius", "status")}
                                for name, entry in keep["certificates"].items()}
    return keep


def summary_row(record: Mapping[str, Any]) -> dict[str, Any]:
    run = record["run"]
    cost = record["cost"]
    return {"dataset": run["dataset"], "name": run["name"], "method": record["method"], "arch": run["arch"],
            "seed": run["seed"], "status": record["status"], "message": record["message"],
            "epochs": record["epochs"], "seconds_per_epoch": cost["seconds_per_epoch"],
            "train_seconds": cost["train_seconds"], "peak_memory_mb": cost["peak_memory_mb"],
            "parameters": cost["parameters"], "config_hash": record["config_hash"],
            "git_sha": record["provenance"]["git_sha"], "device": record["provenance"]["device"],
            **record["metrics"]}


def radii(record: Mapping[str, Any], samples: pd.DataFrame) -> pd.DataFrame:
    """Long table of one run: per sample and norm, the best certified radius (any certificate,
    ``certified_radius``), the radius from radius certificates alone (``radius_bound``, NaN when
    the run has none: its fixed-ε certificates hold only at the evaluated ε) and the smallest
    adversarial perturbation any attack found (``adversarial_norm``)."""
    if samples.empty:
        return pd.DataFrame()
    run, d = record["run"], DATASETS.get(record["run"]["dataset"]).input_dim
    certificates = record["certify"]["certificates"]
    parts = [pd.DataFrame({"index": samples["index"], "norm": norm,
                           "certified_radius": best_certified_radius(samples, certificates, norm, d),
                           "radius_bound": radius_certificate_radius(samples, certificates, norm, d),
                           "adversarial_norm": smallest_adversarial(samples, norm)})
             for norm in ("l2", "linf")]
    frame = pd.concat(parts, ignore_index=True)
    for key in ("dataset", "name", "arch", "seed"):
        frame.insert(0, key, run[key])
    frame.insert(0, "method", record["method"])
    return frame


def collect(record_paths: Iterable[Path], out: Path, radii_out: Path) -> pd.DataFrame:
    """``summary.csv`` (one row per run, every status kept, diverged runs included) and ``radii.csv``."""
    rows, long = [], []
    for path in record_paths:
        record = read_json(path)
        rows.append(summary_row(record))
        if record["status"] == "ok":
            long.append(radii(record, pd.read_csv(Path(path).parent / record["samples"])))
    frame = pd.DataFrame(rows).sort_values(["dataset", "name", "arch", "seed"]).reset_index(drop=True)
    atomic_write_bytes(out, frame.to_csv(index=False).encode())
    radii_frame = pd.concat(long, ignore_index=True) if long else pd.DataFrame()
    atomic_write_bytes(radii_out, radii_frame.to_csv(index=False).encode())
    return frame


def history(record_paths: Iterable[Path], out: Path) -> pd.DataFrame:
    """``history.csv``: the per-epoch training log of every run (loss, training accuracy, learning
    rate, seconds and each method's own statistics), one row per (run, epoch), for the training
    curves. Diverged runs keep the epochs they finished."""
    frames = []
    for path in record_paths:
        record = read_json(path)
        run = record["run"]
        frame = pd.DataFrame(record.get("history") or [])
        if frame.empty:
            continue
        for key in ("seed", "arch", "name", "dataset"):
            frame.insert(0, key, run[key])
        frame.insert(4, "method", record["method"])
        frame.insert(5, "status", record["status"])
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["dataset", "name", "arch", "seed", "method", "status", "epoch"])
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    return table
