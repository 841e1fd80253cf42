"""Figures from ``summary.csv`` and the per-run sample tables, as PNG and PDF (seaborn)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(figure: plt.Figure, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        figure.savefig(out_dir / f"{name}.{suffix}", bbox_inches="tight", dpi=150)
    plt.close(figure)


def accuracy_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    """Clean and attacked accuracy per method (one bar group per data set and architecture)."""
    ok = summary[summary["status"] == "ok"]
    columns = ["clean_accuracy"] + sorted(c for c in ok.columns if c.startswith("empirical:"))
    long = ok.melt(id_vars=["dataset", "name", "arch", "seed"], value_vars=columns,
                   var_name="metric", value_name="accuracy")
    grid = sns.catplot(data=long, x="name", y="accuracy", hue="metric", col="dataset", row="arch",
                       kind="bar", errorbar="sd", height=3.2, aspect=1.8)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("method", "accuracy (mean ± sd over seeds)")
    _save(grid.figure, out_dir, "accuracy")


FIGURES = {"accuracy": accuracy_figure}


def write_figures(summary_path: Path, out_dir: Path) -> None:
    sns.set_theme(style="whitegrid", context="paper")
    summary = pd.read_csv(summary_path)
    for build in FIGURES.values():
        build(summary, out_dir)
