"""Per-run records and the cross-run summary. Torch-free (numpy and pandas only).

A run's record joins its training record, certificates and attacks into one JSON
(``record.json``) and one per-sample table (``samples.csv``). The per-sample table is tidy (long):
one row per (sample, evaluation, ε), with the sample's own columns repeated on each of its rows:

    index, label, prediction, margin      the test point and the model's answer on it
    kind                                  clean | certificate | attack
    evaluation                            the certificate's or attack's name (empty for clean)
    norm, eps                             the evaluation's norm and ε (eps empty where none applies)
    status                                certified | not_certified | error   (certificate at ε)
    verifier                              the verifier that certified it (a cascade's rows only)
    radius                                certified radius in ``norm``         (radius certificate, no ε)
    success, error, adv_l2, adv_linf      attack outcome and the norms measured on its example
                                          (fixed-ε attack at ε; minimum-norm attack without ε)

One ``clean`` row per sample; a certificate gives one row per sample and ε (its status) and,
when it computes radii, one row per sample without ε (its radius); an attack gives one row per
sample and ε (fixed-ε attacks) or one without ε (minimum-norm attacks). Select rows, e.g.
``samples[(samples.kind == "certificate") & (samples.norm == "linf") & (samples.eps == 0.1)]``;
:func:`write_samples` and :func:`read_samples` keep every column's type.

``summary.csv`` is tidy too: one row per (run, metric, evaluation, ε), the run's own columns
(:data:`RUN_COLUMNS`, provenance included) repeated on each of its rows, then ``metric, kind,
evaluation, norm, eps, value`` (see :func:`metrics`); :func:`select` picks one metric per run,
:func:`read_summary` reads it with its types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certbench.config import eps_by_norm, format_eps
from certbench.data.specs import DATASETS
from certbench.storage import atomic_write_bytes, read_json, write_json

SAMPLE_DTYPES: dict[str, str] = {
    "index": "int64",
    "label": "int64",
    "prediction": "int64",
    "margin": "float64",
    "kind": "object",
    "evaluation": "object",
    "norm": "object",
    "eps": "float64",
    "status": "object",
    "verifier": "object",
    "radius": "float64",
    "success": "boolean",
    "error": "boolean",
    "adv_l2": "float64",
    "adv_linf": "float64",
}
ATTACK_FIELDS = ("success", "error", "adv_l2", "adv_linf")
RUN_COLUMNS = [
    "dataset",
    "name",
    "method",
    "arch",
    "seed",
    "status",
    "message",
    "epochs",
    "seconds_per_epoch",
    "train_seconds",
    "peak_memory_mb",
    "parameters",
    "config_hash",
    "git_sha",
    "device",
]
METRIC_COLUMNS = ["metric", "kind", "evaluation", "norm", "eps", "value"]
SUMMARY_COLUMNS = RUN_COLUMNS + METRIC_COLUMNS
SUMMARY_DTYPES = {
    "status": str,
    "message": str,
    "config_hash": str,
    "git_sha": str,
    "device": str,
    "metric": str,
    "kind": str,
    "evaluation": str,
    "norm": str,
    "eps": float,
    "value": float,
}
ANY = "any"  # the evaluation of a metric over every certificate (or every attack) together


def sample_table(
    run_config: Mapping[str, Any], certify: Mapping[str, Any], attack: Mapping[str, Any]
) -> pd.DataFrame:
    """The tidy per-sample table of one run (empty when the run was skipped)."""
    if "samples" not in certify:
        return pd.DataFrame(columns=list(SAMPLE_DTYPES)).astype(SAMPLE_DTYPES)
    points = pd.DataFrame(certify["samples"])
    eps = eps_by_norm(run_config)
    parts = [points.assign(kind="clean")]
    for name, entry in certify["certificates"].items():
        if not entry["applicable"]:
            continue
        evaluation = {"kind": "certificate", "evaluation": name, "norm": entry["norm"]}
        if entry.get("radius") is not None:
            radius = np.asarray(entry["radius"], dtype=float)
            parts.append(points.assign(**evaluation, eps=np.nan, radius=radius))
        for value in eps[entry["norm"]]:
            status = entry["status"][format_eps(value)]
            by = entry.get("verifier", {}).get(format_eps(value))
            if by is not None:  # missing where no verifier certified, as the CSV reads it back
                by = {"verifier": np.where(np.asarray(by) == "", np.nan, np.asarray(by, dtype=object))}
            parts.append(points.assign(**evaluation, eps=float(value), status=status, **(by or {})))
    for outcome in attack.get("evaluations", []):
        fields = {
            field: np.asarray(outcome[field], dtype=float if field.startswith("adv_") else bool)
            for field in ATTACK_FIELDS
        }
        parts.append(
            points.assign(
                kind="attack",
                evaluation=outcome["attack"],
                norm=outcome["norm"],
                eps=np.nan if outcome["eps"] is None else float(outcome["eps"]),
                **fields,
            )
        )
    return pd.concat(parts, ignore_index=True).reindex(columns=list(SAMPLE_DTYPES)).astype(SAMPLE_DTYPES)


def write_samples(samples: pd.DataFrame, path: Path) -> None:
    """``samples.csv`` (and its hash); :func:`read_samples` reads it back with the same types."""
    atomic_write_bytes(path, samples.to_csv(index=False).encode())


def read_samples(path: Path) -> pd.DataFrame:
    """``samples.csv`` with the types of :data:`SAMPLE_DTYPES` (ε a float, norm and names text)."""
    return pd.read_csv(path, dtype=SAMPLE_DTYPES)


def per_sample(samples: pd.DataFrame, rows: pd.DataFrame, field: str) -> np.ndarray:
    """``field`` of ``rows`` (rows of one evaluation at one ε) in the order of the clean rows."""
    order = samples.loc[samples["kind"] == "clean", "index"]
    return rows.set_index("index")[field].reindex(order).to_numpy()


def correct_predictions(samples: pd.DataFrame) -> np.ndarray:
    """Per sample (in the order of the clean rows), whether the model classifies it correctly."""
    clean = samples[samples["kind"] == "clean"]
    return (clean["prediction"] == clean["label"]).to_numpy()


def _evaluations(
    samples: pd.DataFrame, kind: str, with_eps: bool | None = None, **equal: Any
) -> Iterable[tuple[tuple[str, str, float], pd.DataFrame]]:
    """The rows of each (evaluation, norm, ε) of ``kind``, in the order they were recorded: only those
    with an ε (``with_eps=True``) or without one (``False``), and where each column of ``equal`` has
    its value."""
    rows = samples[samples["kind"] == kind]
    if with_eps is not None:
        rows = rows[rows["eps"].notna() == with_eps]
    for column, value in equal.items():
        rows = rows[rows[column] == value]
    return rows.groupby(["evaluation", "norm", "eps"], sort=False, dropna=False)


def _rows(samples: pd.DataFrame, kind: str, evaluation: str, eps: float | None) -> pd.DataFrame:
    """The rows of one certificate or attack at ``eps`` (``None``: its rows without ε)."""
    chosen = (samples["kind"] == kind) & (samples["evaluation"] == evaluation)
    return samples[chosen & (samples["eps"].isna() if eps is None else samples["eps"] == eps)]


def convert_radius(radius: np.ndarray, source: str, target: str, input_dim: int) -> np.ndarray:
    """A radius certified in norm ``source`` as a radius certified in norm ``target``.

    ‖δ‖∞ ≤ ‖δ‖₂ ≤ √d·‖δ‖∞: an ℓ∞ radius r certifies the ℓ2 ball of radius r, and an ℓ2 radius r
    certifies the ℓ∞ ball of radius r/√d.
    """
    if source == target or (source == "linf" and target == "l2"):
        return radius
    return radius / math.sqrt(input_dim)


def radius_certificate_radius(samples: pd.DataFrame, norm: str, input_dim: int) -> np.ndarray:
    """Per sample, the largest radius in ``norm`` that a *radius* certificate proves, converted
    between norms (certified at ε iff the radius exceeds ε); NaN for every sample when no
    applicable certificate gives radii, 0 for misclassified samples."""
    correct = correct_predictions(samples)
    best = np.full(len(correct), np.nan)
    for (_, source, _), rows in _evaluations(samples, "certificate", with_eps=False):
        radius = np.nan_to_num(per_sample(samples, rows, "radius").astype(float), nan=0.0)
        best = np.fmax(best, convert_radius(radius, source, norm, input_dim))
    return np.where(correct | np.isnan(best), best, 0.0)


def status_certified_radius(samples: pd.DataFrame, norm: str, input_dim: int) -> np.ndarray:
    """Per sample, the largest ball in ``norm`` that a fixed-ε certificate (IBP, CROWN, …) proves:
    the largest evaluated ε at which one certified the sample, converted between norms (an ℓ∞
    ball of radius ε holds the ℓ2 ball of radius ε; an ℓ2 ball of radius ε holds the ℓ∞ ball of
    radius ε/√d). Certified at ε iff this value is ≥ ε; 0 where none certified."""
    correct = correct_predictions(samples)
    best = np.zeros(len(correct))
    with_radius = set(samples.loc[(samples["kind"] == "certificate") & samples["eps"].isna(), "evaluation"])
    for (name, source, eps), rows in _evaluations(samples, "certificate", with_eps=True):
        if name in with_radius:
            continue
        certified = per_sample(samples, rows, "status") == "certified"
        ball = float(convert_radius(np.asarray(eps), source, norm, input_dim))
        best = np.where(certified, np.maximum(best, ball), best)
    return np.where(correct, best, 0.0)


def best_certified_radius(samples: pd.DataFrame, norm: str, input_dim: int) -> np.ndarray:
    """Per sample, the largest radius in ``norm`` that any certificate proves (0 if misclassified):
    the larger of :func:`radius_certificate_radius` and :func:`status_certified_radius`, so an ℓ∞
    guarantee counts as an ℓ2 one of the same radius and an ℓ2 one as an ℓ∞ one of radius r/√d."""
    radius = np.nan_to_num(radius_certificate_radius(samples, norm, input_dim), nan=0.0)
    return np.maximum(radius, status_certified_radius(samples, norm, input_dim))


def attack_found(samples: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Per sample, whether the attack of ``rows`` (one attack at one ε) returned an adversarial example."""
    return per_sample(samples, rows, "success").astype(bool) & ~per_sample(samples, rows, "error").astype(
        bool
    )


def smallest_adversarial(samples: pd.DataFrame, norm: str) -> np.ndarray:
    """Per sample, the smallest perturbation in ``norm`` that any attack found (0 if misclassified, inf if
    none)."""
    correct = correct_predictions(samples)
    smallest = np.full(len(correct), np.inf)
    for _, rows in _evaluations(samples, "attack"):
        found = attack_found(samples, rows)
        adversarial = per_sample(samples, rows, f"adv_{norm}").astype(float)
        smallest = np.where(found, np.minimum(smallest, adversarial), smallest)
    return np.where(correct, smallest, 0.0)


def _metric(
    metric: str,
    kind: str,
    value: float | None,
    evaluation: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """One tidy metric row (see :func:`metrics`)."""
    return {
        "metric": metric,
        "kind": kind,
        "evaluation": evaluation,
        "norm": norm,
        "eps": np.nan if eps is None else float(eps),
        "value": np.nan if value is None else float(value),
    }


def metrics(record: Mapping[str, Any], samples: pd.DataFrame) -> list[dict[str, Any]]:
    """Summary metrics of one run, from the rows of its per-sample table: one row per (metric,
    evaluation, ε) with the columns :data:`METRIC_COLUMNS`. ``kind`` says what was evaluated
    (``clean``, ``certificate`` or ``attack``), ``evaluation`` which certificate or attack (:data:`ANY`:
    all of that kind together), ``norm`` and ``eps`` where they apply. The metrics:

    ``clean_accuracy``; per certificate ``applicable`` (1 or 0), ``cert_seconds``, the numbers it
    reports (``lipschitz_bound``, …), ``certified_accuracy`` at each ε, ``errors`` (samples with an
    error status), ``median_radius``/``mean_radius`` over all test points (0 for misclassified ones)
    and their normalised forms ``…_norm`` (radius / √d, the size of the input; LMT paper §5);
    ``certified_accuracy`` of :data:`ANY` certificate at each ε of each norm (radii converted between
    norms); per attack ``robust_accuracy`` at each ε of its norm (errors never count as robust) and
    ``errors``; ``robust_accuracy`` under :data:`ANY` (every) attack of a norm together.
    """
    if samples.empty:
        return []
    d = DATASETS.get(record["run"]["dataset"]).input_dim
    correct = correct_predictions(samples)
    rows = [_metric("clean_accuracy", "clean", correct.mean())]
    for name, entry in record["certify"]["certificates"].items():
        certificate = {"kind": "certificate", "evaluation": name, "norm": entry["norm"]}
        rows.append(_metric("applicable", value=entry["applicable"], **certificate))
        if not entry["applicable"]:
            continue
        rows.append(_metric("cert_seconds", value=entry["seconds"], **certificate))
        rows += [_metric(key, value=value, **certificate) for key, value in entry.get("extra", {}).items()]
        errors = np.zeros(len(correct), dtype=bool)
        for (_, _, eps), at in _evaluations(samples, "certificate", with_eps=True, evaluation=name):
            status = per_sample(samples, at, "status")
            certified = np.mean(status == "certified")
            rows.append(_metric("certified_accuracy", value=certified, eps=eps, **certificate))
            errors |= status == "error"
        rows.append(_metric("errors", value=errors.sum(), **certificate))
        for _, at in _evaluations(samples, "certificate", with_eps=False, evaluation=name):
            radius = np.where(correct, per_sample(samples, at, "radius").astype(float), 0.0)
            rows += [
                _metric("median_radius", value=np.median(radius), **certificate),
                _metric("mean_radius", value=np.mean(radius), **certificate),
                _metric("median_radius_norm", value=np.median(radius) / math.sqrt(d), **certificate),
                _metric("mean_radius_norm", value=np.mean(radius) / math.sqrt(d), **certificate),
            ]
    eps_of = eps_by_norm(record["config"])
    for norm, values in eps_of.items():
        by_radius = np.nan_to_num(radius_certificate_radius(samples, norm, d), nan=0.0)
        by_status = status_certified_radius(samples, norm, d)
        rows += [
            _metric(
                "certified_accuracy",
                "certificate",
                np.mean((by_radius > eps) | (by_status >= eps)),
                ANY,
                norm,
                eps,
            )
            for eps in values
        ]
    survives = {(norm, float(eps)): correct.copy() for norm, values in eps_of.items() for eps in values}
    attacks = record["attack"].get("attacks", {})
    for name, info in attacks.items():
        norm = info["norm"]
        for eps in eps_of[norm]:
            at = _rows(samples, "attack", name, eps if info["kind"] == "eps" else None)
            failed = ~per_sample(samples, at, "error").astype(bool)  # an error is never robust
            if info["kind"] == "eps":
                robust = ~per_sample(samples, at, "success").astype(bool) & failed
            else:
                robust = correct & (per_sample(samples, at, f"adv_{norm}").astype(float) > eps) & failed
            rows.append(_metric("robust_accuracy", "attack", robust.mean(), name, norm, eps))
            survives[(norm, float(eps))] &= robust
        errors = np.zeros(len(correct), dtype=bool)
        for _, at in _evaluations(samples, "attack", evaluation=name):
            errors |= per_sample(samples, at, "error").astype(bool)
        rows.append(_metric("errors", "attack", errors.sum(), name, norm))
    attacked = {info["norm"] for info in attacks.values()}
    rows += [
        _metric("robust_accuracy", "attack", alive.mean(), ANY, norm, eps)
        for (norm, eps), alive in survives.items()
        if norm in attacked
    ]
    return rows


def assemble(
    run_config_path: Path,
    train_path: Path,
    certify_path: Path,
    attack_path: Path,
    record_path: Path,
    samples_path: Path,
) -> dict[str, Any]:
    """Join one run's parts into ``record.json`` and ``samples.csv``."""
    run_config = read_json(run_config_path)
    train = read_json(train_path)
    record = {
        "run": run_config["run"],
        "method": run_config["method"],
        "status": train["status"],
        "message": train["message"],
        "config": run_config,
        "config_hash": train["config_hash"],
        "cost": train["cost"],
        "epochs": train["epochs"],
        "history": train["history"],
        "provenance": train["provenance"],
        "certify": read_json(certify_path),
        "attack": read_json(attack_path),
    }
    samples = sample_table(run_config, record["certify"], record["attack"])
    record["metrics"] = metrics(record, samples)
    write_samples(samples, samples_path)
    write_json(
        record_path,
        {
            **record,
            "certify": _without_samples(record["certify"]),
            "attack": _without_samples(record["attack"]),
            "samples": samples_path.name,
        },
    )
    return record


def _without_samples(part: Mapping[str, Any]) -> dict[str, Any]:
    """A part of the record with its per-sample arrays left to ``samples.csv``."""
    keep = {k: v for k, v in part.items() if k not in ("samples", "evaluations")}
    if "certificates" in keep:
        keep["certificates"] = {
            name: {k: v for k, v in entry.items() if k not in ("radius", "status", "verifier")}
            for name, entry in keep["certificates"].items()
        }
    return keep


def summary_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The tidy summary rows of one run: its columns :data:`RUN_COLUMNS` (what it is, how it ended,
    its cost and provenance) on each of its metric rows, or on one row without a metric when it has
    none (a run that did not finish)."""
    run, cost = record["run"], record["cost"]
    facts = {
        "dataset": run["dataset"],
        "name": run["name"],
        "method": record["method"],
        "arch": run["arch"],
        "seed": run["seed"],
        "status": record["status"],
        "message": record["message"],
        "epochs": record["epochs"],
        "seconds_per_epoch": cost["seconds_per_epoch"],
        "train_seconds": cost["train_seconds"],
        "peak_memory_mb": cost["peak_memory_mb"],
        "parameters": cost["parameters"],
        "config_hash": record["config_hash"],
        "git_sha": record["provenance"]["git_sha"],
        "device": record["provenance"]["device"],
    }
    return [{**facts, **metric} for metric in record["metrics"]] or [facts]


def runs(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a tidy summary, with its columns :data:`RUN_COLUMNS`."""
    columns = [c for c in RUN_COLUMNS if c in summary]
    return summary[columns].drop_duplicates(["dataset", "name", "arch", "seed"]).reset_index(drop=True)


def select(summary: pd.DataFrame, metric: str, **equal: Any) -> pd.DataFrame:
    """Every run of a tidy summary with the ``value`` of its row of ``metric`` where each column of
    ``equal`` has its value (NaN for a run without such a row), e.g.
    ``select(summary, "certified_accuracy", evaluation=ANY, norm="linf", eps=0.1)``."""
    chosen = summary["metric"] == metric if "metric" in summary else pd.Series(False, index=summary.index)
    for column, value in equal.items():
        chosen &= summary[column] == value
    values = summary.loc[chosen, ["dataset", "name", "arch", "seed", "value"]]
    if values.duplicated(["dataset", "name", "arch", "seed"]).any():
        raise ValueError(f"select: {metric} {equal} matches more than one row of a run")
    return runs(summary).merge(values, on=["dataset", "name", "arch", "seed"], how="left")


def read_summary(path: Path) -> pd.DataFrame:
    """``summary.csv`` with ε as a float and the names as text."""
    return pd.read_csv(path, dtype=SUMMARY_DTYPES)


def radii(record: Mapping[str, Any], samples: pd.DataFrame) -> pd.DataFrame:
    """Long table of one run: per sample and norm, the best certified radius (any certificate,
    ``certified_radius``), the radius from radius certificates alone (``radius_bound``, NaN when
    the run has none: its fixed-ε certificates hold only at the evaluated ε) and the smallest
    adversarial perturbation any attack found (``adversarial_norm``)."""
    if samples.empty:
        return pd.DataFrame()
    run, d = record["run"], DATASETS.get(record["run"]["dataset"]).input_dim
    index = samples.loc[samples["kind"] == "clean", "index"].to_numpy()
    parts = [
        pd.DataFrame(
            {
                "index": index,
                "norm": norm,
                "certified_radius": best_certified_radius(samples, norm, d),
                "radius_bound": radius_certificate_radius(samples, norm, d),
                "adversarial_norm": smallest_adversarial(samples, norm),
            }
        )
        for norm in ("l2", "linf")
    ]
    frame = pd.concat(parts, ignore_index=True)
    for key in ("dataset", "name", "arch", "seed"):
        frame.insert(0, key, run[key])
    frame.insert(0, "method", record["method"])
    return frame


def collect(record_paths: Iterable[Path], out: Path, radii_out: Path) -> pd.DataFrame:
    """``summary.csv`` (tidy: one row per run and metric, every status kept, diverged runs included) and
    ``radii.csv``."""
    rows, long = [], []
    for path in record_paths:
        record = read_json(path)
        rows += summary_rows(record)
        if record["status"] == "ok":
            long.append(radii(record, read_samples(Path(path).parent / record["samples"])))
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    frame = frame.sort_values(["dataset", "name", "arch", "seed"], kind="stable").reset_index(drop=True)
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
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["dataset", "name", "arch", "seed", "method", "status", "epoch"])
    )
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    return table
