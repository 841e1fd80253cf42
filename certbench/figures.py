"""Figures from ``summary.csv``, ``radii.csv``, ``history.csv`` and ``published.csv``, as PNG and PDF.

- ``certified_accuracy_<norm>``: one panel per experiment: certified accuracy (a lower bound
  of the robust accuracy; radius certificates as a curve, fixed-ε certificates as markers at
  the evaluated ε) and accuracy under attack (an upper bound) against ε.
- ``radius_vs_error_<norm>``: the same bounds as test error — the figure of Tsuzuku et al. (2018).
- ``tradeoff``: clean against certified accuracy at each evaluated ε, a line up to the
  accuracy under attack.
- ``training_curves``: loss, training accuracy and learning rate per epoch.
- ``ours_vs_published``: our accuracy next to the published figures the config gives.
- ``cost``: seconds per training epoch.
- ``lipschitz_vs_accuracy``: the Lipschitz bound each certificate computed against clean accuracy.
- ``radius_distribution``: per-sample certified ℓ2 and ℓ∞ radii (any certificate, converted).
- ``lipsdp_tradeoff`` (optional: a config's ``extra_figures``, as in ``config/paper/pauli.yaml``): clean and
  certified accuracy against the verified LipSDP bound, as Pauli et al. (2021) present their sweep.

Conventions (see :mod:`certbench.plotting`): colour per experiment in the hues of its method
family, marker per architecture; means over seeds with ±1 sample sd (ddof = 1); human labels
from :mod:`certbench.labels`. ``certbench figures --help`` runs it by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from certbench.collect import SUMMARY_COLUMNS, SUMMARY_DTYPES, select
from certbench.labels import dataset_label, method_label
from certbench.plotting.bounds import bounds_figure
from certbench.plotting.common import (
    experiment_styles,
    family_legend,
    grid,
    label_points,
    ordered,
    placeholder,
    save,
)
from certbench.plotting.comparison import (
    cost_figure,
    lipschitz_figure,
    published_figure,
    radius_distribution_figure,
    tradeoff_figure,
)
from certbench.plotting.training import training_figure

if TYPE_CHECKING:
    import matplotlib.pyplot as plt


def _read(path: Path | None, dtype: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """A CSV as a frame; an absent or empty file (no rows, no header) as an empty frame."""
    if path is None or not path.exists() or path.stat().st_size <= 1:
        return pd.DataFrame()
    return pd.read_csv(path, dtype=dtype)


def write_figures(
    summary_path: Path,
    radii_path: Path,
    out_dir: Path,
    history_path: Path | None = None,
    published_path: Path | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Every figure of :data:`certbench.outputs.FIGURE_NAMES`, and those of ``extra`` (names of
    :data:`OPTIONAL_FIGURES`), into ``out_dir`` (a placeholder that says why where there is nothing to
    draw, so that every output exists)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    summary = _read(summary_path, SUMMARY_DTYPES)
    if summary.empty:
        summary = pd.DataFrame(columns=SUMMARY_COLUMNS)
    radii = _read(radii_path)
    if "radius_bound" not in radii and not radii.empty:  # radii.csv from before the column existed
        radii["radius_bound"] = radii["certified_radius"]
    for norm in ("l2", "linf"):
        bounds_figure(summary, radii, norm, out_dir, error=False)
        bounds_figure(summary, radii, norm, out_dir, error=True)
    tradeoff_figure(summary, out_dir)
    history = _read(history_path)
    if history_path is None:
        placeholder(out_dir, "training_curves", "no training history given")
    else:
        training_figure(history, out_dir)
    published_figure(summary, _read(published_path), out_dir)
    cost_figure(summary, out_dir)
    lipschitz_figure(summary, out_dir)
    radius_distribution_figure(radii, out_dir)
    for name in extra:
        OPTIONAL_FIGURES[name](summary, out_dir)


def lipsdp_tradeoff_figure(summary: pd.DataFrame, out_dir: Path, certificate: str = "lipsdp-l2") -> None:
    """``lipsdp_tradeoff``: per data set, clean accuracy and ``certificate``'s certified accuracy at
    each evaluated ε against its verified Lipschitz bound, one point per run (the accuracy/robustness
    trade-off of Pauli et al. 2021, Figs. 2–3: plain training, weight decay, LMT and the μ and L̄
    sweeps of both ADMM variants on the same MLPs). Every experiment is named beside its point (at
    its seeds' mean; on the certified panel beside the smallest ε's point): a sweep has more runs
    than its family has distinguishable shades."""
    figure = draw_lipsdp_tradeoff(summary, certificate)
    if figure is None:
        placeholder(out_dir, "lipsdp_tradeoff", f"no run has a {certificate} bound")
        return
    save(figure, out_dir, "lipsdp_tradeoff")


def draw_lipsdp_tradeoff(summary: pd.DataFrame, certificate: str = "lipsdp-l2") -> plt.Figure | None:
    """The figure of :func:`lipsdp_tradeoff_figure`, unsaved (``None`` when no run has a bound)."""
    certified = summary[(summary["metric"] == "certified_accuracy") & (summary["evaluation"] == certificate)]
    eps_values = sorted(certified["eps"].dropna().unique())
    # select() gives every run in the same order: the columns line up
    points = select(summary, "lipschitz_bound", evaluation=certificate).assign(
        clean=select(summary, "clean_accuracy")["value"],
        **{
            f"eps{i}": select(summary, "certified_accuracy", evaluation=certificate, eps=eps)["value"]
            for i, eps in enumerate(eps_values)
        },
    )
    points = points[(points["status"] == "ok") & points["value"].notna()]
    if points.empty:
        return None
    datasets = sorted(points["dataset"].unique())
    styles = experiment_styles(points)
    figure, axes = grid(2 * len(datasets), 2, width=4.0, height=3.2, sharex=False, sharey=False)
    for row, dataset in enumerate(datasets):
        mine = points[points["dataset"] == dataset]
        shown = [i for i in range(len(eps_values)) if mine[f"eps{i}"].notna().any()]
        clean_axis, cert_axis = axes[2 * row], axes[2 * row + 1]
        names: dict[plt.Axes, list[tuple[float, float, str]]] = {clean_axis: [], cert_axis: []}
        for key in ordered(styles, mine[["name", "arch"]].itertuples(index=False, name=None)):
            run, style = mine[(mine["name"] == key[0]) & (mine["arch"] == key[1])], styles[key]
            clean_axis.scatter(run["value"], run["clean"] * 100, color=style.color, marker=style.marker, s=45)
            at = math.exp(np.log(run["value"]).mean())  # the seeds' mean on the log axis
            text = method_label(key[0])
            names[clean_axis].append((at, run["clean"].mean() * 100, text))
            if shown:
                names[cert_axis].append((at, run[f"eps{shown[0]}"].mean() * 100, text))
            for shade, i in enumerate(shown):
                alpha = 1.0 - 0.6 * shade / max(1, len(shown) - 1)
                cert_axis.scatter(
                    run["value"],
                    run[f"eps{i}"] * 100,
                    color=style.color,
                    marker=style.marker,
                    s=45,
                    alpha=alpha,
                )
        for axis, label in ((clean_axis, "clean accuracy (%)"), (cert_axis, "certified accuracy (%)")):
            axis.set_xscale("log")
            # plain numbers, at 1, 2 and 5 per decade over two decades or less: there the default
            # labels every sub-decade tick as 2×10⁰, 3×10⁰, … and they overlap
            decades = math.log10(mine["value"].max() / mine["value"].min())
            axis.xaxis.set_major_locator(
                LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,))
            )
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel(f"verified Lipschitz bound ({certificate})", fontsize="small")
            axis.set_ylabel(label)
        for axis, named in names.items():
            label_points(axis, named)
        clean_axis.set_title(dataset_label(dataset), fontsize="small")
        at = ", ".join(f"{eps_values[i]:g}" for i in shown)
        cert_axis.set_title(f"{dataset_label(dataset)}, ε = {at} (fainter: larger)", fontsize="small")
    family_legend(
        figure,
        styles,
        ordered(styles, points[["name", "arch"]].itertuples(index=False, name=None)),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="experiment (one point per seed)",
    )
    figure.tight_layout()
    return figure


#: The optional figures by name (:data:`certbench.outputs.OPTIONAL_FIGURE_NAMES`).
OPTIONAL_FIGURES: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    "lipsdp_tradeoff": lipsdp_tradeoff_figure
}
