"""The soundness audit on hand-made per-sample tables: it passes sound certificates and fails broken ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from certbench.audit import audit_run, verdict
from certbench.collect import SAMPLE_DTYPES

TOL = 1e-4


def record(certificates: dict) -> dict:
    return {
        "run": {"dataset": "digits", "name": "m", "arch": "mlp", "seed": 0},
        "method": "m",
        "config": {"evaluation": {"audit_tolerance": TOL}},
        "certify": {"certificates": certificates},
    }


def points(n: int, prediction: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": np.arange(10, 10 + n),
            "label": np.zeros(n, int),
            "prediction": np.full(n, prediction),
            "margin": np.ones(n),
        }
    )


def rows(
    kind: str, evaluation: str, norm: str, eps: float | None, n: int, prediction: int = 0, **fields
) -> pd.DataFrame:
    """The tidy per-sample rows of one certificate or attack at ε (``None``: without ε)."""
    return points(n, prediction).assign(
        kind=kind, evaluation=evaluation, norm=norm, eps=np.nan if eps is None else eps, **fields
    )


def tidy(*parts: pd.DataFrame, n: int, prediction: int = 0) -> pd.DataFrame:
    """A per-sample table as ``sample_table`` writes it: the clean rows, then ``parts``."""
    table = pd.concat([points(n, prediction).assign(kind="clean"), *parts], ignore_index=True)
    return table.reindex(columns=list(SAMPLE_DTYPES)).astype(SAMPLE_DTYPES)


def table(
    radius: list[float], adv_l2: list[float], prediction: int = 0, status: str | None = None
) -> pd.DataFrame:
    """An ℓ2 radius certificate ``lip`` (status at ε = 0.5) and a minimum-norm ℓ2 attack ``df``."""
    n = len(radius)
    statuses = [status or ("certified" if r > 0.5 else "not_certified") for r in radius]
    return tidy(
        rows("certificate", "lip", "l2", None, n, prediction, radius=radius),
        rows("certificate", "lip", "l2", 0.5, n, prediction, status=statuses),
        rows(
            "attack",
            "df",
            "l2",
            None,
            n,
            prediction,
            success=np.isfinite(adv_l2),
            error=False,
            adv_l2=adv_l2,
            adv_linf=np.asarray(adv_l2) / 4,
        ),
        n=n,
        prediction=prediction,
    )


LIP = {"lip": {"norm": "l2", "applicable": True}}


def test_sound_certificate_passes() -> None:
    rows = audit_run(record(LIP), table([0.3, 0.8, 1.0], [0.31, 0.9, np.inf]))
    assert rows[0]["violations"] == 0 and rows[0]["checks"] > 0
    assert rows[0]["worst_ratio"] == pytest.approx(0.31 / 0.3)


def test_inflated_certificate_is_caught_naming_the_samples() -> None:
    inflated = table([3.0, 8.0, 10.0], [0.31, 0.9, np.inf], status="certified")  # tenfold
    found = audit_run(record(LIP), inflated)
    assert found[0]["violations"] == 2 and found[0]["samples"] == "10 11"
    assert found[0]["attacks"] == "df; df vs ε=0.5"


def test_tolerance_is_tiny_and_favours_the_certificate() -> None:
    inside, outside = 1.0 * (1 - TOL / 2), 1.0 * (1 - 2 * TOL)
    assert audit_run(record(LIP), table([1.0], [inside]))[0]["violations"] == 0
    assert audit_run(record(LIP), table([1.0], [outside]))[0]["violations"] == 1


def test_certified_at_eps_but_broken_by_an_eps_attack() -> None:
    certificates = {"ibp": {"norm": "linf", "applicable": True}}

    def samples(error: bool) -> pd.DataFrame:
        return tidy(
            rows("certificate", "ibp", "linf", 0.1, 2, status=["certified", "not_certified"]),
            rows("attack", "pgd", "linf", 0.1, 2, success=True, error=error, adv_l2=0.5, adv_linf=0.1),
            rows("attack", "pgd", "linf", 0.2, 2, success=True, error=False, adv_l2=0.9, adv_linf=0.2),
            n=2,
        )

    found = audit_run(record(certificates), samples(error=False))
    assert found[0]["violations"] == 1 and found[0]["samples"] == "10"
    assert found[0]["attacks"] == "pgd@0.1 vs ε=0.1"  # the attack at ε = 0.2 is outside the certified ball
    smaller = samples(error=False).replace({"eps": {0.2: 0.05}})  # an attack inside the certified ball
    smaller.loc[smaller["eps"] == 0.05, "adv_linf"] = 0.05
    assert audit_run(record(certificates), smaller)[0]["attacks"] == "pgd@0.05 vs ε=0.1; pgd@0.1 vs ε=0.1"
    # an attack error is not an adversarial example
    assert audit_run(record(certificates), samples(error=True))[0]["violations"] == 0


def test_misclassified_points_and_inapplicable_certificates_are_not_violations() -> None:
    samples = table([0.0, 0.0], [0.0, 0.0], prediction=1)
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


def test_attacks_of_the_other_norm_are_measured_in_the_certificate_norm() -> None:
    """An ℓ∞ attack's example is checked against an ℓ2 certificate by its ℓ2 size (an ℓ∞ ε is no ℓ2 ε)."""

    def samples(adv_l2: float) -> pd.DataFrame:
        return tidy(
            rows("certificate", "lip", "l2", None, 1, radius=1.0),
            rows("certificate", "lip", "l2", 0.5, 1, status="certified"),
            rows("attack", "pgd", "linf", 0.5, 1, success=True, error=False, adv_l2=adv_l2, adv_linf=0.5),
            n=1,
        )

    inside = audit_run(record(LIP), samples(adv_l2=0.4))[0]
    assert (inside["violations"], inside["attacks"]) == (1, "pgd@0.5; pgd@0.5 vs ε=0.5")
    outside = audit_run(record(LIP), samples(adv_l2=1.2))[0]  # outside both ℓ2 balls (ε = 0.5, radius 1)
    assert (outside["checks"], outside["violations"]) == (2, 0)
