"""Figures from ``summary.csv`` and ``radii.csv``, as PNG and PDF (seaborn).

- ``radius_vs_error_<norm>``: upper bound of the test error from certificates (solid) and lower
  bound from attacks (dashed) against the perturbation size, one colour per method — the LMT
  paper's figure. At size s the upper bound counts points not certified at s (misclassified ones
  included), the lower bound points that an attack broke with a perturbation ≤ s.
- ``certified_accuracy_<norm>``: certified (solid) and attacked (dashed) accuracy against ε.
- ``cost``: seconds per epoch per method.
- ``lipschitz_vs_accuracy``: the Lipschitz bound each certificate computed against clean accuracy.
- ``radius_distribution``: per-sample certified ℓ2 radii per method.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

GRID_POINTS = 60


def _save(figure: plt.Figure, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        figure.savefig(out_dir / f"{name}.{suffix}", bbox_inches="tight", dpi=150)
    plt.close(figure)


def _placeholder(out_dir: Path, name: str, why: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    _save(figure, out_dir, name)


def error_curves(radii: pd.DataFrame, norm: str) -> pd.DataFrame:
    """Upper and lower bounds of the error at a grid of sizes, per run."""
    part = radii[radii["norm"] == norm]
    finite = np.concatenate([part["certified_radius"].to_numpy(), part["adversarial_norm"].to_numpy()])
    finite = finite[np.isfinite(finite)]
    top = float(np.quantile(finite, 0.98)) * 1.05 if finite.size and finite.max() > 0 else 1.0
    sizes = np.linspace(0.0, top, GRID_POINTS)
    rows = []
    for (dataset, label, arch, seed), run in part.groupby(["dataset", "name", "arch", "seed"]):
        certified = run["certified_radius"].to_numpy()[:, None]
        adversarial = run["adversarial_norm"].to_numpy()[:, None]
        upper = (certified <= sizes[None, :]).mean(axis=0)
        lower = (adversarial <= sizes[None, :]).mean(axis=0)
        for bound, values in (("upper (certified)", upper), ("lower (attacks)", lower)):
            rows.append(pd.DataFrame({"dataset": dataset, "method": f"{label} / {arch}", "seed": seed,
                                      "size": sizes, "bound": bound, "error": values}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def curve_figure(radii: pd.DataFrame, norm: str, out_dir: Path, accuracy: bool) -> None:
    name = f"{'certified_accuracy' if accuracy else 'radius_vs_error'}_{norm}"
    curves = error_curves(radii, norm) if not radii.empty else pd.DataFrame()
    if curves.empty:
        _placeholder(out_dir, name, "no finished runs")
        return
    y = "error"
    if accuracy:
        curves["accuracy"] = 1.0 - curves["error"]
        y = "accuracy"
    grid = sns.relplot(data=curves, x="size", y=y, hue="method", style="bound", col="dataset", kind="line",
                       errorbar="sd", height=3.4, aspect=1.3, facet_kws={"sharex": False})
    label = "ℓ2" if norm == "l2" else "ℓ∞"
    grid.set_axis_labels(f"perturbation size ({label}, pixel units)", f"{y} ({'bound' if not accuracy else 'at ε'})")
    _save(grid.figure, out_dir, name)


def cost_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    ok = summary[summary["status"] == "ok"]
    if ok.empty:
        _placeholder(out_dir, "cost", "no finished runs")
        return
    grid = sns.catplot(data=ok, x="name", y="seconds_per_epoch", hue="arch", col="dataset", kind="bar",
                       errorbar="sd", height=3.2, aspect=1.6)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("method", "seconds per epoch")
    _save(grid.figure, out_dir, "cost")


def lipschitz_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    ok = summary[summary["status"] == "ok"]
    columns = [c for c in ok.columns if c.startswith("lipschitz_bound:")]
    long = ok.melt(id_vars=["dataset", "name", "arch", "seed", "clean_accuracy"], value_vars=columns,
                   var_name="certificate", value_name="lipschitz_bound").dropna(subset=["lipschitz_bound"])
    if long.empty:
        _placeholder(out_dir, "lipschitz_vs_accuracy", "no Lipschitz bounds were computed")
        return
    long["certificate"] = long["certificate"].str.split(":").str[1]
    grid = sns.relplot(data=long, x="lipschitz_bound", y="clean_accuracy", hue="name", style="certificate",
                       col="dataset", height=3.4, aspect=1.2, s=60)
    for axis in grid.axes.flat:
        axis.set_xscale("log")
    grid.set_axis_labels("Lipschitz bound of the logit map", "clean accuracy")
    _save(grid.figure, out_dir, "lipschitz_vs_accuracy")


def radius_distribution_figure(radii: pd.DataFrame, out_dir: Path) -> None:
    part = radii[radii["norm"] == "l2"] if not radii.empty else radii
    if part.empty:
        _placeholder(out_dir, "radius_distribution", "no finished runs")
        return
    part = part.assign(method=part["name"] + " / " + part["arch"])
    grid = sns.catplot(data=part, x="method", y="certified_radius", col="dataset", kind="box", height=3.4,
                       aspect=1.6, sharey=False)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("method", "certified ℓ2 radius per test point")
    _save(grid.figure, out_dir, "radius_distribution")


def write_figures(summary_path: Path, radii_path: Path, out_dir: Path) -> None:
    sns.set_theme(style="whitegrid", context="paper")
    summary = pd.read_csv(summary_path)
    radii = pd.read_csv(radii_path) if radii_path.stat().st_size > 1 else pd.DataFrame()
    for norm in ("l2", "linf"):
        curve_figure(radii, norm, out_dir, accuracy=False)
        curve_figure(radii, norm, out_dir, accuracy=True)
    cost_figure(summary, out_dir)
    lipschitz_figure(summary, out_dir)
    radius_distribution_figure(radii, out_dir)
