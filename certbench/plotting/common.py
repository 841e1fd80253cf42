"""Shared plumbing of the figures: saving, placeholders, per-experiment styles, seed statistics.

One convention for the spread over seeds, in every figure and table: the sample standard
deviation (``ddof=1``); with a single seed there is no spread to show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from certbench.labels import FAMILY_LABELS, Style, styles

EXPERIMENT = ["name", "arch"]
SD_NOTE = "±1 sd over seeds (ddof = 1)"


def sd_entry(kind: str = "band") -> tuple[Line2D | Patch, str]:
    """The legend entry that explains the spread: a shaded band or error bars."""
    if kind == "band":
        return Patch(color="0.3", alpha=0.18), SD_NOTE
    return Line2D([], [], color="0.3", marker="|", markersize=10, linestyle="none"), f"error bars: {SD_NOTE}"


def save(figure: plt.Figure, out_dir: Path, name: str) -> None:
    """``name.png`` (150 dpi) and ``name.pdf`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in ("png", "pdf"):
        figure.savefig(out_dir / f"{name}.{suffix}", bbox_inches="tight", dpi=150)
    plt.close(figure)


def placeholder(out_dir: Path, name: str, why: str) -> None:
    """A small figure that says why there is nothing to plot (so the DAG's outputs always exist)."""
    figure, axis = plt.subplots(figsize=(5, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    save(figure, out_dir, name)


def experiment_styles(frame: pd.DataFrame) -> dict[tuple[str, str], Style]:
    """The style of every (name, arch) in ``frame`` (columns ``name``, ``method``, ``arch``)."""
    triples = frame[["name", "method", "arch"]].drop_duplicates().itertuples(index=False, name=None)
    return styles((str(n), str(m), str(a)) for n, m, a in triples)


def ordered(
    all_styles: dict[tuple[str, str], Style], keys: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``keys`` in legend order (by family, then name)."""
    order = list(all_styles)
    return sorted(set(keys), key=lambda k: order.index(k) if k in order else len(order))


def family_legend(
    target: plt.Figure | plt.Axes,
    all_styles: dict[tuple[str, str], Style],
    keys: Sequence[tuple[str, str]],
    line: bool = False,
    extra: Sequence[tuple[Line2D, str]] = (),
    **kwargs: object,
) -> None:
    """A legend of ``keys`` grouped by method family (a bold family heading before its members),
    followed by ``extra`` entries (how to read line styles and markers)."""
    handles: list[Line2D] = []
    labels: list[str] = []
    headings: list[int] = []
    current = None
    for key in keys:
        style = all_styles[key]
        if style.family != current:
            current = style.family
            headings.append(len(labels))
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(FAMILY_LABELS[current])
        handles.append(
            Line2D(
                [],
                [],
                color=style.color,
                marker=style.marker,
                linestyle="-" if line else "none",
                markersize=7,
                markeredgecolor="white",
            )
        )
        labels.append(style.label)
    if extra:
        headings.append(len(labels))
        handles.append(Line2D([], [], linestyle="none"))
        labels.append("how to read")
        for handle, label in extra:
            handles.append(handle)
            labels.append(label)
    options = {
        "frameon": False,
        "fontsize": "small",
        "alignment": "left",
        "title": "experiment",
        "title_fontsize": "small",
        **kwargs,
    }
    legend = target.legend(handles, labels, **options)
    for index in headings:
        legend.get_texts()[index].set_fontweight("bold")


def label_points(axis: plt.Axes, points: Sequence[tuple[float, float, str]]) -> None:
    """Each ``(x, y, text)`` point named beside itself, the names pushed apart so that none covers
    another or a point (adjustText), with a thin leader line to the point: a figure whose experiments
    outnumber the distinguishable shades of their family still says which point is which. The axis
    gets room at its ends for the names of the points there."""
    from adjustText import adjust_text

    if not points:
        return
    axis.margins(x=0.12, y=0.2)
    texts = [axis.text(x, y, text, color="0.15", fontsize="x-small") for x, y, text in points]
    adjust_text(
        texts,
        x=[x for x, _, _ in points],
        y=[y for _, y, _ in points],
        force_static=(0.5, 1.0),  # away from the markers, not only off their centres
        ax=axis,
        expand=(1.15, 1.6),
        force_explode=(0.3, 1.0),
        expand_axes=True,
        min_arrow_len=0,
        arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
    )


def seed_stats(frame: pd.DataFrame, by: Sequence[str], column: str, scale: float = 1.0) -> pd.DataFrame:
    """Mean, sample sd (ddof = 1, NaN for one seed) and count of ``column`` over the seeds of each group."""
    values = pd.to_numeric(frame[column], errors="coerce") * scale
    grouped = values.groupby([frame[b] for b in by])
    return pd.DataFrame(
        {"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.count()}
    ).reset_index()


def grid(
    count: int,
    columns: int,
    width: float = 3.3,
    height: float = 2.7,
    sharex: bool = True,
    sharey: bool = True,
) -> tuple[plt.Figure, list[plt.Axes]]:
    """``count`` panels in rows of ``columns``; unused panels are hidden."""
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(width * columns, height * rows), squeeze=False, sharex=sharex, sharey=sharey
    )
    flat = list(axes.flat)
    for axis in flat[count:]:
        axis.set_visible(False)
    return figure, flat[:count]


def finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]
