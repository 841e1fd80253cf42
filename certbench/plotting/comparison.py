"""Figures that compare experiments with each other (and with published numbers).

Every point is the mean over seeds with ±1 sd (ddof = 1) error bars; colour says the experiment
(hues by method family), the marker its architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from certbench.collect import ANY, runs, select
from certbench.config import format_eps
from certbench.labels import (
    certificate_label,
    dataset_label,
    experiment_label,
    norm_label,
)
from certbench.plotting.common import (
    SD_NOTE,
    experiment_styles,
    family_legend,
    grid,
    ordered,
    placeholder,
    save,
    sd_entry,
    seed_stats,
)

KEY = ["dataset", "name", "arch"]


def _ok(summary: pd.DataFrame) -> pd.DataFrame:
    return summary[summary["status"] == "ok"]


def _keys(frame: pd.DataFrame, styles: dict) -> list[tuple[str, str]]:
    return ordered(styles, frame[["name", "arch"]].itertuples(index=False, name=None))


def tradeoff_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    """``tradeoff``: clean accuracy against certified accuracy at each evaluated ε, per data set.

    A vertical line rises from each point (certified accuracy, a lower bound of the robust
    accuracy) to the accuracy under all attacks (an upper bound): robust accuracy lies on it.
    """
    name = "tradeoff"
    ok = _ok(runs(summary))
    certified_rows = summary[
        (summary["metric"] == "certified_accuracy")
        & (summary["evaluation"] == ANY)
        & (summary["status"] == "ok")
        & summary["value"].notna()
    ]
    targets = sorted(set(certified_rows[["norm", "eps"]].itertuples(index=False, name=None)))
    if ok.empty or not targets:
        placeholder(out_dir, name, "no finished runs")
        return
    styles = experiment_styles(ok)
    datasets = sorted(ok["dataset"].unique())
    columns = 2 if len(targets) % 2 == 0 or len(targets) > 3 else len(targets)
    figure, axes = grid(len(targets) * len(datasets), columns, width=3.6, height=3.4)
    clean = seed_stats(_ok(select(summary, "clean_accuracy")), KEY, "value", 100)
    for row, dataset in enumerate(datasets):
        for col, (norm, eps) in enumerate(targets):
            axis = axes[row * len(targets) + col]
            axis.plot([0, 100], [0, 100], color="0.7", linestyle=":", linewidth=1)
            at = {"evaluation": ANY, "norm": norm, "eps": eps}
            certified = seed_stats(_ok(select(summary, "certified_accuracy", **at)), KEY, "value", 100)
            empirical = seed_stats(_ok(select(summary, "robust_accuracy", **at)), KEY, "value", 100)
            for key in _keys(ok[ok["dataset"] == dataset], styles):
                style = styles[key]
                where = (clean["dataset"] == dataset) & (clean["name"] == key[0]) & (clean["arch"] == key[1])
                x = clean[where].iloc[0]
                y = certified[where.to_numpy()].iloc[0]
                if not np.isfinite(y["mean"]):
                    continue
                top = empirical[where.to_numpy()].iloc[0]["mean"]
                if np.isfinite(top):
                    axis.plot(
                        [x["mean"]] * 2,
                        [y["mean"], top],
                        color=style.color,
                        linewidth=6,
                        alpha=0.25,
                        solid_capstyle="butt",
                    )
                axis.errorbar(
                    [x["mean"]],
                    [y["mean"]],
                    xerr=[np.nan_to_num(x["sd"])],
                    yerr=[np.nan_to_num(y["sd"])],
                    color=style.color,
                    marker=style.marker,
                    markersize=8,
                    markeredgecolor="white",
                    capsize=2,
                    linestyle="none",
                    zorder=5,
                )
            axis.set_title(
                f"{norm_label(norm)} ε = {eps:g}"
                + (f" — {dataset_label(dataset)}" if len(datasets) > 1 else ""),
                fontsize="small",
            )
            axis.set_xlabel("clean accuracy (%)")
            axis.set_ylabel("certified accuracy (%)")
            axis.set_xlim(-2, 102)
            axis.set_ylim(-2, 102)
            axis.label_outer()
    extra = [
        (Line2D([], [], color="0.3", marker="o", linestyle="none"), "certified accuracy (lower bound)"),
        (
            Line2D([], [], color="0.3", linewidth=6, alpha=0.25),
            "range up to the accuracy under attack (upper bound)",
        ),
        (Line2D([], [], color="0.7", linestyle=":"), "certified = clean"),
        sd_entry("bars"),
    ]
    family_legend(
        figure, styles, _keys(ok, styles), extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    figure.tight_layout()
    save(figure, out_dir, name)


# A published figure ``<kind>[@<ε>]`` (the config's ``published`` keys) and the summary rows it compares with.
PUBLISHED_METRICS = {
    "clean": ("clean_accuracy", {}),
    "pgd": ("robust_accuracy", {"evaluation": "pgd-linf"}),
    "certified": ("certified_accuracy", {"evaluation": ANY, "norm": "linf"}),
}
METRIC_LABELS = {"clean": "clean", "pgd": "PGD ℓ∞", "certified": "certified ℓ∞"}


def published_long(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """One row per (experiment, published metric): ours (mean, sd over ok seeds, %) and the paper's."""
    rows = []
    for record in published.to_dict("records"):
        for column, paper in record.items():
            if not str(column).startswith("paper:") or pd.isna(paper):
                continue
            kind, _, eps = column.split(":", 1)[1].partition("@")
            metric, equal = PUBLISHED_METRICS.get(kind, (kind, {}))
            chosen = summary[summary["metric"] == metric]
            for key, value in equal.items():
                chosen = chosen[chosen[key] == value]
            # the published ε is text in the config: the evaluated ε that prints the same
            chosen = chosen[chosen["eps"].map(format_eps) == eps] if eps else chosen[chosen["eps"].isna()]
            chosen = _ok(chosen)
            mine = chosen[
                (chosen["dataset"] == record["dataset"])
                & (chosen["name"] == record["name"])
                & (chosen["arch"] == record["arch"])
            ]
            values = pd.to_numeric(mine["value"], errors="coerce").dropna() * 100
            rows.append(
                {
                    "dataset": record["dataset"],
                    "name": record["name"],
                    "arch": record["arch"],
                    "method": mine["method"].iloc[0] if len(mine) else record["name"],
                    "metric": f"{METRIC_LABELS.get(kind, kind)}" + (f" @ ε = {eps}" if eps else ""),
                    "ours": values.mean() if len(values) else np.nan,
                    "sd": values.std(ddof=1) if len(values) > 1 else np.nan,
                    "paper": float(paper),
                }
            )
    return pd.DataFrame(rows)


def published_figure(summary: pd.DataFrame, published: pd.DataFrame | None, out_dir: Path) -> None:
    """``ours_vs_published``: our accuracy next to the published one, per experiment and metric."""
    name = "ours_vs_published"
    long = (
        published_long(summary, published)
        if published is not None and not published.empty
        else pd.DataFrame()
    )
    if long.empty:
        placeholder(
            out_dir,
            name,
            "this configuration gives no published numbers\n"
            "(the paper configurations under config/paper/ do)",
        )
        return
    styles = experiment_styles(long)
    long["row"] = [
        f"{experiment_label(n, a)} — {m}"
        + (f" ({dataset_label(d)})" if long["dataset"].nunique() > 1 else "")
        for d, n, a, m in long[["dataset", "name", "arch", "metric"]].itertuples(index=False)
    ]
    figure, axes = grid(1, 1, width=7.5, height=0.45 * len(long) + 1.2)
    axis = axes[0]
    for y, item in enumerate(long.itertuples()):
        style = styles[(item.name, item.arch)]
        axis.plot([item.paper, item.ours], [y, y], color="0.75", linewidth=1.2, zorder=1)
        axis.scatter([item.paper], [y], marker="D", facecolors="none", edgecolors="black", s=45, zorder=3)
        if np.isfinite(item.ours):
            axis.errorbar(
                [item.ours],
                [y],
                xerr=[np.nan_to_num(item.sd)],
                color=style.color,
                marker=style.marker,
                markersize=8,
                markeredgecolor="white",
                capsize=2,
                linestyle="none",
                zorder=4,
            )
            right = max(item.ours + float(np.nan_to_num(item.sd)), item.paper)
            axis.annotate(
                f"{item.ours - item.paper:+.1f}",
                (right, y),
                xytext=(8, 0),
                textcoords="offset points",
                va="center",
                fontsize="x-small",
                color="0.3",
            )
        else:
            axis.annotate(
                "not run",
                (item.paper, y),
                xytext=(8, 0),
                textcoords="offset points",
                va="center",
                fontsize="x-small",
                color="0.3",
            )
    axis.set_yticks(range(len(long)))
    axis.set_yticklabels(long["row"], fontsize="small")
    axis.set_ylim(len(long) - 0.5, -0.5)
    axis.set_xlabel("accuracy (%)")
    axis.set_xlim(0, 105)
    extra = [
        (
            Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="none"),
            "published",
        ),
        (Line2D([], [], marker="o", color="0.4", linestyle="none"), "ours (mean over seeds)"),
        sd_entry("bars"),
        (Line2D([], [], linestyle="none"), "numbers: ours − published (points)"),
    ]
    family_legend(
        figure, styles, _keys(long, styles), extra=extra, loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    figure.tight_layout()
    save(figure, out_dir, name)


def cost_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    """``cost``: seconds per training epoch per experiment (a dot plot: the axis may be logarithmic)."""
    ok = _ok(runs(summary))
    if ok.empty:
        placeholder(out_dir, "cost", "no finished runs")
        return
    styles = experiment_styles(ok)
    datasets = sorted(ok["dataset"].unique())
    stats = seed_stats(ok, KEY, "seconds_per_epoch")
    figure, axes = grid(
        len(datasets),
        2,
        width=5.5,
        height=0.38 * ok[["name", "arch"]].drop_duplicates().shape[0] + 1.2,
        sharex=False,
        sharey=False,
    )
    for axis, dataset in zip(axes, datasets):
        keys = _keys(ok[ok["dataset"] == dataset], styles)
        for y, key in enumerate(keys):
            item = stats[
                (stats["dataset"] == dataset) & (stats["name"] == key[0]) & (stats["arch"] == key[1])
            ].iloc[0]
            sd = float(np.nan_to_num(item["sd"]))
            axis.errorbar(
                [item["mean"]],
                [y],
                xerr=[[min(sd, 0.95 * item["mean"])], [sd]],
                color=styles[key].color,
                marker=styles[key].marker,
                markersize=8,
                markeredgecolor="white",
                capsize=2,
                linestyle="none",
            )
        axis.set_yticks(range(len(keys)))
        axis.set_yticklabels([styles[k].label for k in keys], fontsize="small")
        axis.set_ylim(len(keys) - 0.5, -0.5)
        values = stats.loc[stats["dataset"] == dataset, "mean"].dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 30:
            axis.set_xscale("log")
        else:
            axis.set_xlim(left=0)
        axis.set_xlabel(f"seconds per training epoch (mean, {SD_NOTE})", fontsize="small")
        if len(datasets) > 1:
            axis.set_title(dataset_label(dataset), fontsize="small")
    figure.tight_layout()
    save(figure, out_dir, "cost")


def lipschitz_figure(summary: pd.DataFrame, out_dir: Path) -> None:
    """``lipschitz_vs_accuracy``: each certificate's Lipschitz bound against clean accuracy, one
    point per run, one panel per certificate."""
    bounds = summary[
        (summary["metric"] == "lipschitz_bound") & (summary["status"] == "ok") & summary["value"].notna()
    ]
    certificates = list(dict.fromkeys(bounds["evaluation"]))
    clean = select(summary, "clean_accuracy")
    ok = _ok(clean)
    if ok.empty or not certificates:
        placeholder(out_dir, "lipschitz_vs_accuracy", "no Lipschitz bounds were computed")
        return
    styles = experiment_styles(ok)
    datasets = sorted(ok["dataset"].unique())
    figure, axes = grid(
        len(certificates) * len(datasets), len(certificates), width=3.8, height=3.2, sharex=False
    )
    for row, dataset in enumerate(datasets):
        for col, certificate in enumerate(certificates):
            axis = axes[row * len(certificates) + col]
            # select() gives every run in the same order: the columns line up
            bound = select(summary, "lipschitz_bound", evaluation=certificate)["value"]
            part = _ok(clean.assign(bound=bound))
            part = part[part["dataset"] == dataset]
            for key in _keys(part, styles):
                mine = part[(part["name"] == key[0]) & (part["arch"] == key[1])]
                axis.scatter(
                    mine["bound"],
                    mine["value"] * 100,
                    color=styles[key].color,
                    marker=styles[key].marker,
                    s=45,
                    edgecolors="white",
                )
            axis.set_xscale("log")
            axis.set_xlabel(
                f"Lipschitz bound of the logits ({certificate_label(certificate)})", fontsize="small"
            )
            axis.set_ylabel("clean accuracy (%)")
            if len(datasets) > 1:
                axis.set_title(dataset_label(dataset), fontsize="small")
    family_legend(
        figure,
        styles,
        _keys(ok, styles),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="experiment (one point per seed)",
    )
    figure.tight_layout()
    save(figure, out_dir, "lipschitz_vs_accuracy")


def radius_distribution_figure(radii: pd.DataFrame, out_dir: Path) -> None:
    """``radius_distribution``: per test point, the largest certified radius (any certificate,
    radii converted between norms, 0 for misclassified or uncertified points), pooled over seeds."""
    name = "radius_distribution"
    if radii.empty:
        placeholder(out_dir, name, "no finished runs")
        return
    styles = experiment_styles(radii)
    datasets = sorted(radii["dataset"].unique())
    panels = [(dataset, norm) for dataset in datasets for norm in ("l2", "linf")]
    count = radii[["name", "arch"]].drop_duplicates().shape[0]
    figure, axes = grid(len(panels), 2, width=4.2, height=0.4 * count + 1.4, sharex=False, sharey=False)
    for index, (axis, (dataset, norm)) in enumerate(zip(axes, panels)):
        part = radii[(radii["dataset"] == dataset) & (radii["norm"] == norm)]
        keys = _keys(part, styles)
        data = [
            part.loc[(part["name"] == k[0]) & (part["arch"] == k[1]), "certified_radius"].to_numpy(
                dtype=float
            )
            for k in keys
        ]
        boxes = axis.boxplot(
            data,
            orientation="horizontal",
            patch_artist=True,
            widths=0.6,
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
            medianprops={"color": "black"},
        )
        for patch, key in zip(boxes["boxes"], keys):
            patch.set_facecolor(styles[key].color)
            patch.set_alpha(0.75)
        for y, values in enumerate(data, start=1):
            share = float(np.mean(values > 0)) if values.size else 0.0
            axis.annotate(
                f"{share:.0%} > 0",
                (1.0, y),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize="x-small",
                color="0.3",
            )
        axis.set_yticks(range(1, len(keys) + 1))
        axis.set_yticklabels([styles[k].label for k in keys] if index % 2 == 0 else [], fontsize="small")
        axis.invert_yaxis()
        axis.set_xlabel(f"certified {norm_label(norm)} radius per test point", fontsize="small")
        axis.set_title(
            f"{norm_label(norm)}" + (f" — {dataset_label(dataset)}" if len(datasets) > 1 else ""),
            fontsize="small",
        )
    figure.tight_layout()
    save(figure, out_dir, name)
