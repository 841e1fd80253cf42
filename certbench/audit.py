"""The certificate-soundness audit: every certificate against every attack, every sample.

A certificate promises that no perturbation smaller than its radius (or within its ε)
changes the prediction. A *violation* is

- a radius certificate of norm N and a successful adversarial example, from any attack,
  whose perturbation measured in N is below ``radius · (1 − tol)``; or
- a sample certified at ε (norm N) that a fixed-ε attack of norm N at the same ε
  broke (its example is projected into the ε-ball by us, so no tolerance is needed), or
  that a minimum-norm attack broke with a perturbation below ``ε · (1 − tol)``.

``tol`` (``evaluation.audit_tolerance``, 1e-4 relative by default) only absorbs floating
point rounding and always favours the certificate; it is the same for every method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certbench.storage import atomic_write_bytes, read_json

COLUMNS = ["dataset", "name", "method", "arch", "seed", "certificate", "norm", "checks", "violations",
           "worst_ratio", "samples", "attacks"]
_ADV = re.compile(r"^adv_(l2|linf):([^@]+)(?:@(.+))?$")


def audit_run(record: dict[str, Any], samples: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per applicable certificate of one run."""
    tol = record["config"]["evaluation"]["audit_tolerance"]
    rows = []
    run = record["run"]
    for name, entry in record["certify"].get("certificates", {}).items():
        if not entry["applicable"]:
            continue
        norm = entry["norm"]
        checks, worst = 0, np.inf
        offending: dict[int, set[str]] = {}

        def flag(mask: np.ndarray, attack: str) -> None:
            for index in samples["index"].to_numpy()[mask]:
                offending.setdefault(int(index), set()).add(attack)

        for column in samples:
            match = _ADV.match(column)
            if not match or match.group(1) != norm:
                continue
            attack, attack_eps = match.group(2), match.group(3)
            suffix = f"{attack}@{attack_eps}" if attack_eps else attack
            found = samples[f"success:{suffix}"].to_numpy() & ~samples[f"error:{suffix}"].to_numpy()
            found &= (samples["prediction"] == samples["label"]).to_numpy()
            adv = samples[column].to_numpy()
            if f"radius:{name}" in samples:
                radius = samples[f"radius:{name}"].to_numpy()
                checks += int(found.sum())
                broken = found & (adv < radius * (1 - tol))
                flag(broken, suffix)
                positive = found & (radius > 0)
                if positive.any():
                    worst = min(worst, float(np.min(adv[positive] / radius[positive])))
            for eps in [c.split("@", 1)[1] for c in samples if c.startswith(f"status:{name}@")]:
                certified = samples[f"status:{name}@{eps}"].to_numpy() == "certified"
                checks += int((found & certified).sum())
                if attack_eps is not None:
                    broken = found & certified & np.isclose(float(attack_eps), float(eps), rtol=1e-9, atol=0)
                else:
                    broken = found & certified & (adv < float(eps) * (1 - tol))
                flag(broken, f"{suffix} vs ε={eps}")
        rows.append({"dataset": run["dataset"], "name": run["name"], "method": record["method"],
                     "arch": run["arch"], "seed": run["seed"], "certificate": name, "norm": norm,
                     "checks": checks, "violations": len(offending),
                     "worst_ratio": worst if np.isfinite(worst) else np.nan,
                     "samples": " ".join(str(i) for i in sorted(offending)),
                     "attacks": "; ".join(sorted({a for s in offending.values() for a in s}))})
    return rows


def audit(record_paths: Iterable[Path], out: Path) -> pd.DataFrame:
    """Audit every run; write ``out`` (CSV, one row per run and certificate)."""
    rows: list[dict[str, Any]] = []
    for path in record_paths:
        record = read_json(path)
        if record["status"] != "ok":
            continue
        samples = pd.read_csv(Path(path).parent / record["samples"])
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
    lines = [f"{r.dataset}/{r.name}/{r.arch}/seed{r.seed}: certificate {r.certificate} ({r.method}) beaten on "
             f"{r.violations} sample(s) [{r.samples}] by {r.attacks}" for r in bad.itertuples()]
    return "certificate soundness audit FAILED:\n" + "\n".join(lines)
