"""Tables: mean ± std over seeds, failed runs kept as rows, published figures beside ours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.collect import ANY, SUMMARY_COLUMNS, select
from certbench.tables import (
    audit_table,
    cost_table,
    cross_table,
    human,
    l2_table,
    linf_table,
    lmt_table,
    published_table,
    write_table,
)


def summary() -> pd.DataFrame:
    """A tidy summary of five runs (two diverged: no metric rows), as ``certbench collect`` writes it."""
    rows = []
    runs = [
        ("standard", "ok", 0.9, 0.1),
        ("standard", "ok", 0.8, 0.3),
        ("lmt", "ok", 0.85, 0.5),
        ("lmt", "diverged", None, None),
        ("ibp", "diverged", None, None),
    ]
    for seed, (name, status, clean, cert) in enumerate(runs):
        run = {
            "dataset": "digits",
            "name": name,
            "method": name,
            "arch": "mlp",
            "seed": seed,
            "status": status,
            "seconds_per_epoch": 1.0 if name == "standard" else 2.0,
            "peak_memory_mb": 100.0,
            "parameters": 10,
            "epochs": 5,
        }
        if status != "ok":
            rows.append(run)
            continue
        ibp = {"kind": "certificate", "evaluation": "ibp", "norm": "linf"}
        rows += [
            {**run, **metric}
            for metric in [
                {"metric": "clean_accuracy", "kind": "clean", "value": clean},
                {"metric": "applicable", **ibp, "value": 1.0},
                {"metric": "certified_accuracy", **ibp, "eps": 0.1, "value": cert},
                {"metric": "errors", **ibp, "value": 1},
                {
                    "metric": "certified_accuracy",
                    "kind": "certificate",
                    "evaluation": ANY,
                    "norm": "linf",
                    "eps": 0.1,
                    "value": cert,
                },
                {
                    "metric": "robust_accuracy",
                    "kind": "attack",
                    "evaluation": "pgd-linf",
                    "norm": "linf",
                    "eps": 0.1,
                    "value": cert,
                },
            ]
        ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def test_mean_and_sample_std_over_ok_seeds_and_failed_runs_kept() -> None:
    table = linf_table(summary()).set_index("name")
    # the sample standard deviation (ddof=1), as in the figures: std(0.9, 0.8) = 0.0707
    assert table.loc["standard", "clean"] == "85.00 ± 7.07"
    assert table.loc["standard", "certified@0.1"] == "20.00 ± 14.14"
    assert table.loc["lmt", "clean"] == "85.00"  # one finished seed: no spread to show
    assert table.loc["lmt", "status"] == "ok, diverged" and table.loc["lmt", "seeds"] == 2
    assert table.loc["ibp", "status"] == "diverged" and table.loc["ibp", "clean"] == "–"


def test_published_figures_stand_beside_ours_with_the_difference() -> None:
    published = published_table(
        [{"name": "standard", "arch": "mlp", "published": {"digits": {"clean": 80.0, "certified@0.1": 25.0}}}]
    )
    table = linf_table(summary(), published).set_index("name")
    columns = list(table.columns)
    assert columns[columns.index("clean") + 1 : columns.index("clean") + 3] == ["paper:clean", "Δ clean"]
    assert table.loc["standard", "Δ clean"] == "+5.00" and table.loc["standard", "Δ certified@0.1"] == "-5.00"
    assert table.loc["lmt", "Δ clean"] == "–"
    assert table.loc["standard", "paper:clean"] == "80.00" and table.loc["lmt", "paper:clean"] == "–"


def test_each_norm_table_takes_the_attacks_and_certified_rows_of_its_norm() -> None:
    rows = summary()
    ok = rows[rows["metric"] == "clean_accuracy"]
    l2_rows = [
        ok.assign(metric="robust_accuracy", kind="attack", evaluation=attack, norm="l2", eps=0.5, value=value)
        for attack, value in (("pgd-l2", 0.6), ("autoattack-l2", 0.4))
    ]
    certified = {"metric": "certified_accuracy", "kind": "certificate", "evaluation": ANY, "norm": "l2"}
    l2_rows.append(ok.assign(**certified, eps=0.5, value=0.2))
    rows = pd.concat([rows, *l2_rows], ignore_index=True)
    l2 = l2_table(rows).set_index("name")
    assert list(l2.columns[-4:]) == ["clean", "pgd@0.5", "autoattack@0.5", "certified@0.5"]
    assert l2.loc["standard", "autoattack@0.5"] == "40.00 ± 0.00" and l2.loc["lmt", "pgd@0.5"] == "60.00"
    assert "AutoAttack accuracy (%) at ℓ2 ε = 0.5" in human(l2_table(rows)).columns
    linf = linf_table(rows)  # the ℓ∞ table keeps to ℓ∞: no ℓ2 attack or ε leaks in
    assert not any("0.5" in column or "autoattack" in column for column in linf.columns)


def test_cost_ratio_to_standard_and_error_counts() -> None:
    cost = cost_table(summary()).set_index("name")
    assert (
        cost.loc["lmt", "time_vs_standard"] == "2.00×" and cost.loc["standard", "time_vs_standard"] == "1.00×"
    )
    cross = cross_table(summary()).set_index("name")
    assert cross.loc["standard", "cert_errors:ibp"] == 2
    assert cross.loc["standard", "cert:ibp@0.1"] == "20.00 ± 14.14"
    assert cross.loc["ibp", "cert:ibp@0.1"] == "n/a"  # never applicable (never ran)


def test_select_gives_every_run_the_value_of_its_row() -> None:
    certified = select(summary(), "certified_accuracy", evaluation=ANY, norm="linf", eps=0.1)
    assert certified["seed"].tolist() == [0, 1, 2, 3, 4]
    assert certified["value"].tolist()[:3] == [0.1, 0.3, 0.5] and certified["value"].iloc[3:].isna().all()
    assert select(summary(), "certified_accuracy", evaluation=ANY, norm="l2", eps=0.1)["value"].isna().all()


def test_audit_summary_and_three_formats(tmp_path: Path) -> None:
    audit = pd.DataFrame(
        [
            {
                "dataset": "digits",
                "name": "m",
                "method": "m",
                "arch": "mlp",
                "seed": s,
                "certificate": "lip",
                "norm": "l2",
                "checks": 10,
                "violations": v,
                "worst_ratio": r,
                "samples": "",
                "attacks": "",
            }
            for s, v, r in [(0, 0, 1.5), (1, 2, 0.5)]
        ]
    )
    table = audit_table(audit)
    assert table[["runs", "checks", "violations", "worst_ratio"]].iloc[0].tolist() == [2, 20, 2, 0.5]
    write_table(table, tmp_path, "audit")
    assert "$\\pm$" not in (tmp_path / "audit.tex").read_text() and "|" in (tmp_path / "audit.md").read_text()
    assert pd.read_csv(tmp_path / "audit.csv").shape == table.shape


def test_csv_keeps_keys_and_the_other_formats_show_human_headers(tmp_path: Path) -> None:
    table = linf_table(summary())
    table["extra"] = "0.1"  # a column its builder gave no label keeps its key
    write_table(table, tmp_path, "linf")
    assert {"certified@0.1", "extra"} <= set(pd.read_csv(tmp_path / "linf.csv").columns)
    for suffix in ("md", "html", "tex"):
        text = (tmp_path / f"linf.{suffix}").read_text()
        assert "certified@0.1" not in text and "extra" in text
    assert "PGD accuracy (%) at ℓ∞ ε = 0.1" in (tmp_path / "linf.md").read_text()
    page = (tmp_path / "linf.html").read_text()
    assert "<table" in page and "Table 1 of Zhang et al. (2021)" in page and "ddof = 1" in page
    assert "certified accuracy (%) at ℓ∞ ε = 0.1" in page and "20.00 ± 14.14" in page
    assert r"(\%)" in (tmp_path / "linf.tex").read_text()  # LaTeX-escaped, not a comment


def test_headers_come_from_the_rows_each_column_selects() -> None:
    rows = summary()
    radius = {
        "metric": "median_radius_norm",
        "kind": "certificate",
        "evaluation": "lipschitz-l2",
        "norm": "l2",
        "value": 0.2,
    }
    rows = pd.concat([rows, pd.DataFrame([{**rows.iloc[0].to_dict(), **radius}])], ignore_index=True)
    assert list(human(lmt_table(rows)).columns)[-2:] == [
        "clean accuracy (%)",
        "median normalised ℓ2 radius (lipschitz-l2)",
    ]
    assert "certified by ibp (%) at ℓ∞ ε = 0.1" in human(cross_table(rows)).columns
    assert "ibp errors" in human(cross_table(rows)).columns
    published = published_table([{"name": "lmt", "arch": "mlp", "published": {"digits": {"pgd@0.1": 30.0}}}])
    headers = list(human(linf_table(rows, published)).columns)
    assert "published PGD accuracy (%) at ℓ∞ ε = 0.1" in headers
    assert "Δ PGD accuracy at ℓ∞ ε = 0.1 (points, ours − published)" in headers
    assert human(audit_table(pd.DataFrame())).columns[0] == "data set"  # the fixed headers
