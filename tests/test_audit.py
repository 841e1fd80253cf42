"""The soundness audit on hand-made per-sample tables: it passes sound certificates and fails broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from certbench.audit import audit_run, verdict

TOL = 1e-4


def record(certificates: dict) -> dict:
    return {"run": {"dataset": "digits", "name": "m", "arch": "mlp", "seed": 0}, "method": "m",
            "config": {"evaluation": {"audit_tolerance": TOL}},
            "certify": {"certificates": certificates}}


def table(radius: list[float], adv_l2: list[float], **extra) -> pd.DataFrame:
    n = len(radius)
    return pd.DataFrame({"index": np.arange(10, 10 + n), "label": np.zeros(n, int), "prediction": np.zeros(n, int),
                         "radius:lip": radius, "status:lip@0.5": ["certified" if r > 0.5 else "not_certified"
                                                                 for r in radius],
                         "success:df": np.isfinite(adv_l2), "error:df": np.zeros(n, bool),
                         "adv_l2:df": adv_l2, "adv_linf:df": np.asarray(adv_l2) / 4, **extra})


LIP = {"lip": {"norm": "l2", "applicable": True}}


def test_sound_certificate_passes() -> None:
    rows = audit_run(record(LIP), table([0.3, 0.8, 1.0], [0.31, 0.9, np.inf]))
    assert rows[0]["violations"] == 0 and rows[0]["checks"] > 0
    assert rows[0]["worst_ratio"] == pytest.approx(0.31 / 0.3)


def test_inflated_certificate_is_caught_naming_the_samples() -> None:
    samples = table([0.3, 0.8, 1.0], [0.31, 0.9, np.inf])
    samples["radius:lip"] *= 10  # a certificate inflated tenfold
    samples["status:lip@0.5"] = "certified"
    rows = audit_run(record(LIP), samples)
    assert rows[0]["violations"] == 2 and rows[0]["samples"] == "10 11"


def test_tolerance_is_tiny_and_favours_the_certificate() -> None:
    inside, outside = 1.0 * (1 - TOL / 2), 1.0 * (1 - 2 * TOL)
    assert audit_run(record(LIP), table([1.0], [inside]))[0]["violations"] == 0
    assert audit_run(record(LIP), table([1.0], [outside]))[0]["violations"] == 1


def test_certified_at_eps_but_broken_by_an_eps_attack() -> None:
    certificates = {"ibp": {"norm": "linf", "applicable": True}}
    samples = pd.DataFrame({"index": [0, 1], "label": [1, 1], "prediction": [1, 1],
                            "status:ibp@0.1": ["certified", "not_certified"],
                            "success:pgd@0.1": [True, True], "error:pgd@0.1": [False, False],
                            "adv_l2:pgd@0.1": [0.5, 0.5], "adv_linf:pgd@0.1": [0.1, 0.1]})
    rows = audit_run(record(certificates), samples)
    assert rows[0]["violations"] == 1 and rows[0]["samples"] == "0"
    samples["error:pgd@0.1"] = True  # an attack error is not an adversarial example
    assert audit_run(record(certificates), samples)[0]["violations"] == 0


def test_misclassified_points_and_inapplicable_certificates_are_not_violations() -> None:
    samples = table([0.0, 0.0], [0.0, 0.0])
    samples["prediction"] = 1
    certificates = {**LIP, "other": {"norm": "l2", "applicable": False}}
    rows = audit_run(record(certificates), samples)
    assert [r["certificate"] for r in rows] == ["lip"] and rows[0]["violations"] == 0


def test_verdict_names_method_certificate_and_samples(tmp_path: Path) -> None:
    samples = table([3.0, 8.0], [0.31, 0.9])
    rows = audit_run(record(LIP), samples)
    path = tmp_path / "audit.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    message = verdict(path)
    assert message is not None
    assert "digits/m/mlp/seed0: certificate lip (m) beaten on 2 sample(s) [10 11] by df" in message
    pd.DataFrame(audit_run(record(LIP), table([0.1], [0.2]))).to_csv(path, index=False)
    assert verdict(path) is None
