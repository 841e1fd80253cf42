"""The certificate-soundness audit: every certificate against every attack, every sample.

A certificate promises that no perturbation smaller than its radius (or within its ε)
changes the prediction. A *violation* is

- a radius certificate of norm N and a successful adversarial example, from any attack,
  whose perturbation measured in N is below ``radius · (1 − tol)``; or
- a sample certified at ε (norm N) that a fixed-ε attack of norm N at the same ε
  broke (its example is projected into the ε-ball by us, so no tolerance is needed), or
  that any attack broke with a perturbation, measured in N, below ``ε · (1 − tol)``.

``tol`` (``evaluation.audit_tolerance``, 1e-4 relative by default) only absorbs floating
point rounding and always favours the certificate; it is the same for every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certbench.collect import attack_found, correct_predictions, per_sample, read_samples
from certbench.config import format_eps
from certbench.storage import atomic_write_bytes, read_json

COLUMNS = [
    "dataset",
    "name",
    "method",
    "arch",
    "seed",
    "certificate",
    "norm",
    "checks",
    "violations",
    "worst_ratio",
    "samples",
    "attacks",
]


def audit_run(record: dict[str, Any], samples: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per applicable certificate of one run (``samples``: its tidy per-sample table)."""
    tol = record["config"]["evaluation"]["audit_tolerance"]
    rows = []
    run = record["run"]
    index = samples.loc[samples["kind"] == "clean", "index"].to_numpy()
    correct = correct_predictions(samples)
    certificates = samples[samples["kind"] == "certificate"]
    for name, entry in record["certify"].get("certificates", {}).items():
        if not entry["applicable"]:
            continue
        norm = entry["norm"]
        mine = certificates[certificates["evaluation"] == name]
        radius_rows = mine[mine["eps"].isna()]
        radius = per_sample(samples, radius_rows, "radius").astype(float) if len(radius_rows) else None
        certified_at = {
            float(eps): per_sample(samples, at, "status") == "certified"
            for eps, at in mine[mine["eps"].notna()].groupby("eps", sort=False)
        }
        checks, worst = 0, np.inf
        offending: dict[int, set[str]] = {}

        def flag(mask: np.ndarray, attack: str, offending: dict[int, set[str]] = offending) -> None:
            for sample in index[mask]:
                offending.setdefault(int(sample), set()).add(attack)

        attacks = samples[samples["kind"] == "attack"]
        evaluations = attacks.groupby(["evaluation", "norm", "eps"], sort=False, dropna=False)
        for (attack, attack_norm, attack_eps), outcome in evaluations:
            label = attack if pd.isna(attack_eps) else f"{attack}@{format_eps(attack_eps)}"
            found = attack_found(samples, outcome) & correct
            adv = per_sample(samples, outcome, f"adv_{norm}").astype(float)
            if radius is not None:
                checks += int(found.sum())
                flag(found & (adv < radius * (1 - tol)), label)
                positive = found & (radius > 0)
                if positive.any():
                    worst = min(worst, float(np.min(adv[positive] / radius[positive])))
            for eps, certified in certified_at.items():
                checks += int((found & certified).sum())
                inside = adv < eps * (1 - tol)
                if attack_norm == norm and not pd.isna(attack_eps):  # projected into its ε-ball by us
                    inside |= np.isclose(attack_eps, eps, rtol=1e-9, atol=0)
                broken = found & certified & inside
                flag(broken, f"{label} vs ε={format_eps(eps)}")
        rows.append(
            {
                "dataset": run["dataset"],
                "name": run["name"],
                "method": record["method"],
                "arch": run["arch"],
                "seed": run["seed"],
                "certificate": name,
                "norm": norm,
                "checks": checks,
                "violations": len(offending),
                "worst_ratio": worst if np.isfinite(worst) else np.nan,
                "samples": " ".join(str(i) for i in sorted(offending)),
                "attacks": "; ".join(sorted({a for s in offending.values() for a in s})),
            }
        )
    return rows


def audit(record_paths: Iterable[Path], out: Path) -> pd.DataFrame:
    """Audit every run; write ``out`` (CSV, one row per run and certificate)."""
    rows: list[dict[str, Any]] = []
    for path in record_paths:
        record = read_json(path)
        if record["status"] != "ok":
            continue
        samples = read_samples(Path(path).parent / record["samples"])
        rows += audit_run(record, samples)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    atomic_write_bytes(out, frame.to_csv(index=False).encode())
    return frame


def verdict(audit_csv: Path) -> str | None:
    """None when the audit found nothing; otherwise a message naming method, certificate and samples."""
    frame = pd.read_csv(audit_csv, dtype={"samples": str})
    bad = frame[frame["violations"] > 0]
    if bad.empty:
        return None
    lines = [
        f"{r.dataset}/{r.name}/{r.arch}/seed{r.seed}: certificate {r.certificate} ({r.method}) beaten on "
        f"{r.violations} sample(s) [{r.samples}] by {r.attacks}"
        for r in bad.itertuples()
    ]
    return "certificate soundness audit FAILED:\n" + "\n".join(lines)
