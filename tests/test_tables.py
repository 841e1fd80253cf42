"""Tables: mean ± std over seeds, failed runs kept as rows, published figures beside ours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.tables import audit_table, cost_table, cross_table, linf_table, published_table, write_table


def summary() -> pd.DataFrame:
    rows = []
    for name, status, clean, cert in [("standard", "ok", 0.9, 0.1), ("standard", "ok", 0.8, 0.3),
                                      ("lmt", "ok", 0.85, 0.5), ("lmt", "diverged", None, None),
                                      ("ibp", "diverged", None, None)]:
        rows.append({"dataset": "digits", "name": name, "method": name, "arch": "mlp", "seed": len(rows),
                     "status": status, "clean_accuracy": clean, "certified:linf@0.1": cert,
                     "robust:pgd-linf@0.1": cert, "cert:ibp@0.1": cert, "cert_errors:ibp": 1 if cert else None,
                     "applicable:ibp": True, "seconds_per_epoch": 1.0 if name == "standard" else 2.0,
                     "peak_memory_mb": 100.0, "parameters": 10, "epochs": 5})
    return pd.DataFrame(rows)


def test_mean_and_std_over_ok_seeds_and_failed_runs_kept() -> None:
    table = linf_table(summary()).set_index("name")
    assert table.loc["standard", "clean"] == "85.00 ± 5.00"
    assert table.loc["standard", "certified@0.1"] == "20.00 ± 10.00"
    assert table.loc["lmt", "status"] == "ok, diverged" and table.loc["lmt", "seeds"] == 2
    assert table.loc["ibp", "status"] == "diverged" and table.loc["ibp", "clean"] == "–"


def test_published_figures_stand_beside_ours_with_the_difference() -> None:
    published = published_table([{"name": "standard", "arch": "mlp",
                                  "published": {"digits": {"clean": 80.0, "certified@0.1": 25.0}}}])
    table = linf_table(summary(), published).set_index("name")
    columns = list(table.columns)
    assert columns[columns.index("clean") + 1: columns.index("clean") + 3] == ["paper:clean", "Δ clean"]
    assert table.loc["standard", "Δ clean"] == "+5.00" and table.loc["standard", "Δ certified@0.1"] == "-5.00"
    assert table.loc["lmt", "Δ clean"] == "–"


def test_cost_ratio_to_standard_and_error_counts() -> None:
    cost = cost_table(summary()).set_index("name")
    assert cost.loc["lmt", "time_vs_standard"] == "2.00×" and cost.loc["standard", "time_vs_standard"] == "1.00×"
    cross = cross_table(summary()).set_index("name")
    assert cross.loc["standard", "cert_errors:ibp"] == 2


def test_audit_summary_and_three_formats(tmp_path: Path) -> None:
    audit = pd.DataFrame([{"dataset": "digits", "name": "m", "method": "m", "arch": "mlp", "seed": s,
                           "certificate": "lip", "norm": "l2", "checks": 10, "violations": v,
                           "worst_ratio": r, "samples": "", "attacks": ""} for s, v, r in [(0, 0, 1.5), (1, 2, 0.5)]])
    table = audit_table(audit)
    assert table[["runs", "checks", "violations", "worst_ratio"]].iloc[0].tolist() == [2, 20, 2, 0.5]
    write_table(table, tmp_path, "audit")
    assert "$\\pm$" not in (tmp_path / "audit.tex").read_text() and "|" in (tmp_path / "audit.md").read_text()
    assert pd.read_csv(tmp_path / "audit.csv").shape == table.shape
