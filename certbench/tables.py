"""Tables from ``summary.csv`` and ``audit.csv``: mean ± std over seeds, as CSV, Markdown
(tabulate) and LaTeX.

Runs that did not finish (``status`` other than ``ok``, e.g. ``diverged``) stay in every
table as rows marked with their status instead of being dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from certbench.storage import atomic_write_bytes

KEYS = ["dataset", "name", "arch"]


def _fmt(values: pd.Series, percent: bool) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    scale = 100.0 if percent else 1.0
    mean, std = values.mean() * scale, (values.std(ddof=0) * scale if len(values) > 1 else 0.0)
    digits = 2 if percent or abs(mean) >= 1 else 4
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def aggregate(summary: pd.DataFrame, columns: Sequence[str], percent: Sequence[str] = (),
              counts: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (dataset, name, arch): seeds, status, and mean ± std of each column over ok runs
    (``counts`` columns: the total over seeds)."""
    rows = []
    for key, group in summary.groupby(KEYS, sort=True):
        ok = group[group["status"] == "ok"]
        statuses = group["status"].value_counts()
        row = dict(zip(KEYS, key))
        row["method"] = group["method"].iloc[0]
        row["seeds"] = len(group)
        row["status"] = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in statuses.items())
        for column in columns:
            if column not in ok:
                row[column] = "–"
            elif column in counts:
                row[column] = int(pd.to_numeric(ok[column], errors="coerce").fillna(0).sum())
            else:
                row[column] = _fmt(ok[column], column in percent)
        rows.append(row)
    return pd.DataFrame(rows)


def _columns(summary: pd.DataFrame, pattern: str) -> list[str]:
    return sorted(c for c in summary.columns if re.fullmatch(pattern, c))


def linf_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ℓ∞-dist paper's Table 1 layout: clean / PGD / certified accuracy (%) at each ℓ∞ ε.

    ``certified`` counts a point certified by any certificate (ℓ2 radii converted); with a paper
    config, the published figures of each row stand in adjacent columns with our difference.
    """
    rename = {"clean_accuracy": "clean"}
    for column in _columns(summary, r"robust:pgd-linf@.*"):
        rename[column] = "pgd@" + column.split("@")[1]
    for column in _columns(summary, r"certified:linf@.*"):
        rename[column] = "certified@" + column.split("@")[1]
    table = aggregate(summary, list(rename), percent=list(rename)).rename(columns=rename)
    if published is None or published.empty:
        return table
    table = table.merge(published, on=KEYS, how="left")
    order = [c for c in table.columns if not c.startswith("paper:")]
    for ours in rename.values():
        paper = f"paper:{ours}"
        if paper not in table:
            continue
        mean = pd.to_numeric(table[ours].str.split(" ± ").str[0], errors="coerce")
        table[f"Δ {ours}"] = (mean - table[paper]).map(lambda v: f"{v:+.2f}" if np.isfinite(v) else "–")
        at = order.index(ours) + 1
        order[at:at] = [paper, f"Δ {ours}"]
    return table[order]


def lmt_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The LMT paper's table: clean accuracy, mean and median normalised ℓ2 radius per certificate."""
    columns = ["clean_accuracy"] + _columns(summary, r"(mean|median)_radius_norm:.*")
    return aggregate(summary, columns, percent=["clean_accuracy"])


def cost_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ℓ∞-dist paper's Table 4 layout: seconds per epoch, peak memory, ratio to ``standard``."""
    table = aggregate(summary, ["seconds_per_epoch", "peak_memory_mb", "parameters", "epochs"])
    mean = summary[summary["status"] == "ok"].groupby(KEYS)["seconds_per_epoch"].mean()
    ratios = []
    for row in table.itertuples():
        base = mean.get((row.dataset, "standard", row.arch), np.nan)
        ours = mean.get((row.dataset, row.name, row.arch), np.nan)
        ratios.append(f"{ours / base:.2f}×" if np.isfinite(base) and np.isfinite(ours) else "–")
    table["time_vs_standard"] = ratios
    return table


def cross_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Certified accuracy (%) of every method's models under every certificate at each ε."""
    errors = _columns(summary, r"cert_errors:.*")
    table = aggregate(summary, _columns(summary, r"cert:.*") + errors, percent=_columns(summary, r"cert:.*"),
                      counts=errors)
    applicable = _columns(summary, r"applicable:.*")
    for column in applicable:
        name = column.split(":", 1)[1]
        never = summary.groupby(KEYS)[column].apply(lambda v: not v.fillna(False).astype(bool).any())
        for index, row in table.iterrows():
            if never.get((row["dataset"], row["name"], row["arch"]), True):
                for target in [c for c in table.columns if c.startswith(f"cert:{name}@")]:
                    table.at[index, target] = "n/a"
    return table


def audit_table(audit: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, method, architecture, certificate): checks, violations and the worst ratio
    adversarial norm / certified radius (≥ 1 for a sound certificate)."""
    if audit.empty:
        return pd.DataFrame(columns=["dataset", "name", "arch", "certificate", "checks", "violations", "worst_ratio"])
    grouped = audit.groupby(["dataset", "name", "arch", "certificate"], sort=True)
    return grouped.agg(method=("method", "first"), runs=("seed", "count"), checks=("checks", "sum"),
                       violations=("violations", "sum"), worst_ratio=("worst_ratio", "min")).reset_index()


TABLES: dict[str, Callable[..., pd.DataFrame]] = {
    "linf": linf_table, "lmt": lmt_table, "cost": cost_table, "cross": cross_table}


def write_table(table: pd.DataFrame, out_dir: Path, name: str) -> None:
    atomic_write_bytes(out_dir / f"{name}.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / f"{name}.md", table.to_markdown(index=False).encode() + b"\n")
    latex = table.to_latex(index=False).replace("±", r"$\pm$").replace("×", r"$\times$").replace("–", "--")
    atomic_write_bytes(out_dir / f"{name}.tex", latex.replace("Δ", r"$\Delta$").encode())


def write_tables(summary_path: Path, audit_path: Path, out_dir: Path, published_path: Path | None = None) -> None:
    """Every table of :data:`certbench.outputs.TABLE_NAMES` (Snakemake checks that all are made)."""
    summary = pd.read_csv(summary_path)
    published = pd.read_csv(published_path) if published_path is not None else None
    for name, build in TABLES.items():
        write_table(build(summary, published), out_dir, name)
    write_table(audit_table(pd.read_csv(audit_path, dtype={"samples": str})), out_dir, "audit")


def published_table(experiments: Sequence[dict]) -> pd.DataFrame:
    """The ``published`` figures of the config's experiments, one row per (data set, name, arch)."""
    rows = [{"dataset": dataset, "name": entry["name"], "arch": entry["arch"],
             **{f"paper:{key}": value for key, value in figures.items()}}
            for entry in experiments for dataset, figures in entry.get("published", {}).items()]
    return pd.DataFrame(rows, columns=KEYS if not rows else None)
