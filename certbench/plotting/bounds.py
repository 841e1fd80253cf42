"""Robust accuracy (or error) bounds against the perturbation size, one panel per experiment.

In every panel, at perturbation size ε, the robust accuracy of the model lies between

* the **certified accuracy** — a *lower* bound: the share of test points that a certificate
  proves correct for every perturbation of size ≤ ε — and
* the **accuracy under attack** — an *upper* bound: the share of test points that no attack
  broke with a perturbation of size ≤ ε.

Radius certificates (Lipschitz margins, LipSDP, ℓ∞-dist margins) give a radius per point, so
their bound is a curve (solid). Fixed-ε certificates (IBP, CROWN, CROWN-IBP, the interval bound
of ℓ∞-dist nets with a head) only answer at the evaluated ε, so they are markers there, not a
staircase that would falsely fall to 0 beyond the last ε; the markers give the accuracy that
any certificate proved at that ε. Radii are converted between norms (an ℓ∞ radius r certifies
the ℓ2 radius r, an ℓ2 radius r the ℓ∞ radius r/√n, n the input size), so each model's curve
uses the larger. Curves and markers are means over seeds with ±1 sd (ddof = 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from certbench.collect import ANY, select
from certbench.labels import dataset_label, norm_label
from certbench.plotting.common import (
    SD_NOTE,
    experiment_styles,
    finite,
    grid,
    ordered,
    placeholder,
    save,
)

GRID_POINTS = 400
COLUMNS = 4


def evaluated_eps(summary: pd.DataFrame, norm: str, dataset: str) -> list[float]:
    """The ε of ``norm`` evaluated on ``dataset`` (those with a certified accuracy of a finished run)."""
    rows = summary[
        (summary["dataset"] == dataset)
        & (summary["status"] == "ok")
        & (summary["metric"] == "certified_accuracy")
        & (summary["evaluation"] == ANY)
        & (summary["norm"] == norm)
        & summary["value"].notna()
    ]
    return sorted(set(rows["eps"]))


def size_grid(part: pd.DataFrame, eps: list[float]) -> np.ndarray:
    """Perturbation sizes from 0 to past the largest evaluated ε (1.25–2.5 times it) or, without
    one, to most of the radii and attacks."""
    values = finite(
        np.concatenate(
            [part["radius_bound"].to_numpy(dtype=float), part["adversarial_norm"].to_numpy(dtype=float)]
        )
    )
    values = values[values > 0]
    top = float(np.quantile(values, 0.98)) if values.size else 0.0
    if eps:
        top = min(max(top, 1.25 * max(eps)), 2.5 * max(eps))
    return np.linspace(0.0, top if top > 0 else 1.0, GRID_POINTS)


def run_curves(part: pd.DataFrame, sizes: np.ndarray) -> pd.DataFrame:
    """Per run (seed): the certified accuracy (radius certificates, NaN if it has none) and the
    accuracy under attack at each size. Certified at s iff radius > s; broken at s iff an attack
    found a perturbation of size ≤ s (misclassified points count as broken at 0)."""
    rows = []
    for seed, run in part.groupby("seed"):
        radius = run["radius_bound"].to_numpy(dtype=float)
        adversarial = run["adversarial_norm"].to_numpy(dtype=float)
        certified = (
            (radius[:, None] > sizes[None, :]).mean(axis=0)
            if not np.isnan(radius).all()
            else np.full(sizes.size, np.nan)
        )
        attacked = (adversarial[:, None] > sizes[None, :]).mean(axis=0)
        rows.append(pd.DataFrame({"seed": seed, "size": sizes, "certified": certified, "attacked": attacked}))
    return pd.concat(rows, ignore_index=True)


def _band(axis, sizes: np.ndarray, values: pd.DataFrame, column: str, color: str, style: str) -> None:
    stats = values.groupby("size")[column].agg(["mean", "std", "count"]).reindex(sizes)
    if stats["mean"].isna().all():
        return
    axis.plot(sizes, stats["mean"], color=color, linestyle=style, drawstyle="steps-post", linewidth=1.6)
    if (stats["count"] > 1).any():
        low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
        axis.fill_between(
            sizes, low.clip(0), high.clip(upper=100), step="post", color=color, alpha=0.18, linewidth=0
        )


def bounds_figure(summary: pd.DataFrame, radii: pd.DataFrame, norm: str, out_dir: Path, error: bool) -> None:
    """``certified_accuracy_<norm>`` (``error=False``) or ``radius_vs_error_<norm>`` (``error=True``)."""
    name = f"{'radius_vs_error' if error else 'certified_accuracy'}_{norm}"
    part = radii[radii["norm"] == norm] if not radii.empty else radii
    if part.empty:
        placeholder(out_dir, name, "no finished runs")
        return
    all_styles = experiment_styles(part)
    panels = [
        (dataset, key)
        for dataset in sorted(part["dataset"].unique())
        for key in ordered(
            all_styles,
            part.loc[part["dataset"] == dataset, ["name", "arch"]].itertuples(index=False, name=None),
        )
    ]
    figure, axes = grid(len(panels), COLUMNS, width=3.3 if len(panels) > 2 else 4.6, height=2.9, sharex=False)
    grids = {
        dataset: size_grid(part[part["dataset"] == dataset], evaluated_eps(summary, norm, dataset))
        for dataset in part["dataset"].unique()
    }
    for axis, (dataset, key) in zip(axes, panels):
        style = all_styles[key]
        sizes = grids[dataset]
        run = part[(part["dataset"] == dataset) & (part["name"] == key[0]) & (part["arch"] == key[1])]
        curves = run_curves(run, sizes)
        for column in ("certified", "attacked"):
            curves[column] = 100 * (1 - curves[column] if error else curves[column])
        _band(axis, sizes, curves, "certified", style.color, "-")
        _band(axis, sizes, curves, "attacked", style.color, "--")
        for eps in evaluated_eps(summary, norm, dataset):
            certified = select(summary, "certified_accuracy", evaluation=ANY, norm=norm, eps=eps)
            rows = certified[
                (certified["status"] == "ok")
                & (certified["dataset"] == dataset)
                & (certified["name"] == key[0])
                & (certified["arch"] == key[1])
            ]
            values = pd.to_numeric(rows["value"], errors="coerce").dropna() * 100
            if values.empty:
                continue
            values = 100 - values if error else values
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            axis.errorbar(
                [eps],
                [values.mean()],
                yerr=[sd],
                color=style.color,
                marker=style.marker,
                markersize=7,
                markeredgecolor="black",
                markeredgewidth=0.8,
                capsize=3,
                linestyle="none",
                zorder=5,
            )
        axis.set_title(
            f"{style.label}\n{dataset_label(dataset)}" if grids.keys() - {dataset} else style.label,
            fontsize="small",
            color=style.color,
            fontweight="bold",
        )
        axis.set_xlim(0, sizes[-1])
        axis.set_ylim(-2, 102)
    what = "error (%)" if error else "accuracy (%)"
    for axis in axes:
        axis.set_xlabel(f"{norm_label(norm)} perturbation size ε (inputs in [0, 1])", fontsize="small")
        axis.set_ylabel(what, fontsize="small")
        if len(grids) == 1:
            axis.label_outer()
    lower, upper = ("upper", "lower") if error else ("lower", "upper")
    noun = what.split()[0]
    extra = [
        (
            Line2D([], [], color="black", linestyle="-"),
            f"certified {noun}, radius certificates: {lower} bound",
        ),
        (
            Line2D([], [], color="black", marker="o", markeredgecolor="black", linestyle="none"),
            f"certified {noun} at an evaluated ε, any certificate\n"
            f"(fixed-ε IBP / CROWN included): {lower} bound;"
            "\nmarker shape: architecture",
        ),
        (Line2D([], [], color="black", linestyle="--"), f"{noun} under attack: {upper} bound"),
        (Patch(color="black", alpha=0.18), SD_NOTE),
    ]
    figure.suptitle(f"Robust {noun} lies between the bounds ({norm_label(norm)})", fontsize="medium")
    figure.tight_layout()
    figure.legend(
        [h for h, _ in extra],
        [text for _, text in extra],
        loc="upper center",
        frameon=False,
        ncol=2 if len(axes) > 2 else 1,
        fontsize="small",
        bbox_to_anchor=(0.5, 0.0),
    )
    save(figure, out_dir, name)
