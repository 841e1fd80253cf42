"""Tables from ``summary.csv``: mean ± std over seeds, as CSV, Markdown (tabulate) and LaTeX.

Runs that did not finish (``status`` other than ``ok``, e.g. ``diverged``) stay in every
table as rows marked with their status instead of being dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


def aggregate(summary: pd.DataFrame, columns: Sequence[str], percent: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (dataset, name, arch): seeds, status, and mean ± std of each column."""
    rows = []
    for key, group in summary.groupby(KEYS, sort=True):
        ok = group[group["status"] == "ok"]
        statuses = group["status"].value_counts()
        row = dict(zip(KEYS, key))
        row["method"] = group["method"].iloc[0]
        row["seeds"] = len(group)
        row["status"] = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in statuses.items())
        for column in columns:
            row[column] = _fmt(ok[column], column in percent) if column in ok else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def _columns(summary: pd.DataFrame, pattern: str) -> list[str]:
    return sorted(c for c in summary.columns if re.fullmatch(pattern, c))


def accuracy_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Clean, attacked (empirical) and certified accuracy (%) at every ε, every certificate."""
    columns = ["clean_accuracy"] + _columns(summary, r"empirical:.*") + _columns(summary, r"cert:.*")
    return aggregate(summary, columns, percent=columns)


def lmt_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The LMT paper's table: clean accuracy, mean and median normalised ℓ2 radius."""
    columns = ["clean_accuracy"] + _columns(summary, r"(mean|median)_radius_norm:.*")
    return aggregate(summary, columns, percent=["clean_accuracy"])


def cost_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Seconds per epoch and peak memory, with the ratio to ``standard`` on the same data and architecture."""
    table = aggregate(summary, ["seconds_per_epoch", "peak_memory_mb", "parameters"])
    mean = summary[summary["status"] == "ok"].groupby(KEYS)["seconds_per_epoch"].mean()
    ratios = []
    for row in table.itertuples():
        base = mean.get((row.dataset, "standard", row.arch), np.nan)
        ours = mean.get((row.dataset, row.name, row.arch), np.nan)
        ratios.append(f"{ours / base:.2f}×" if np.isfinite(base) and np.isfinite(ours) else "–")
    table["time_vs_standard"] = ratios
    return table


TABLES = {"accuracy": accuracy_table, "lmt": lmt_table, "cost": cost_table}


def write_table(table: pd.DataFrame, out_dir: Path, name: str) -> None:
    atomic_write_bytes(out_dir / f"{name}.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / f"{name}.md", table.to_markdown(index=False).encode() + b"\n")
    latex = table.to_latex(index=False).replace("±", r"$\pm$").replace("×", r"$\times$").replace("–", "--")
    atomic_write_bytes(out_dir / f"{name}.tex", latex.encode())


def write_tables(summary_path: Path, out_dir: Path) -> None:
    summary = pd.read_csv(summary_path)
    for name, build in TABLES.items():
        write_table(build(summary), out_dir, name)
