"""Training curves from the per-epoch history each run records (``history.csv``).

Loss and training accuracy per epoch, one line per experiment (mean over seeds, ±1 sd with
ddof = 1 as a band), one row of panels per data set. Losses are each method's own training
objective (a robust loss for robust methods), so they compare a method with itself over the
epochs, not methods with each other; the log scale is used when they span more than a decade.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from certbench.labels import dataset_label
from certbench.plotting.common import (
    experiment_styles,
    family_legend,
    finite,
    grid,
    ordered,
    placeholder,
    save,
    sd_entry,
)

PANELS = {
    "loss": "training loss (each method's objective)",
    "train_accuracy": "training accuracy (%)",
    "lr": "learning rate",
}


def training_figure(history: pd.DataFrame, out_dir: Path) -> None:
    """``training_curves``: loss, training accuracy and learning rate against the epoch."""
    name = "training_curves"
    if history.empty or "epoch" not in history:
        placeholder(out_dir, name, "no training history recorded")
        return
    columns = [c for c in PANELS if c in history and history[c].notna().any()]
    datasets = sorted(history["dataset"].unique())
    all_styles = experiment_styles(history)
    figure, axes = grid(len(columns) * len(datasets), len(columns), width=4.0, height=3.0, sharey=False)
    for row, dataset in enumerate(datasets):
        part = history[history["dataset"] == dataset]
        for col, column in enumerate(columns):
            axis = axes[row * len(columns) + col]
            scale = 100.0 if column == "train_accuracy" else 1.0
            for key in ordered(all_styles, part[["name", "arch"]].itertuples(index=False, name=None)):
                style = all_styles[key]
                runs = part[(part["name"] == key[0]) & (part["arch"] == key[1])]
                stats = (
                    (pd.to_numeric(runs[column], errors="coerce") * scale)
                    .groupby(runs["epoch"])
                    .agg(["mean", "std", "count"])
                )
                epochs = stats.index.to_numpy()
                every = max(1, len(epochs) // 8)
                axis.plot(
                    epochs,
                    stats["mean"],
                    color=style.color,
                    marker=style.marker,
                    markevery=every,
                    markersize=5,
                    linewidth=1.4,
                )
                if (stats["count"] > 1).any():
                    axis.fill_between(
                        epochs,
                        stats["mean"] - stats["std"],
                        stats["mean"] + stats["std"],
                        color=style.color,
                        alpha=0.15,
                        linewidth=0,
                    )
            values = finite(pd.to_numeric(part[column], errors="coerce"))
            if (
                column in ("loss", "lr")
                and values.size
                and values.min() > 0
                and values.max() / values.min() > 10
            ):
                axis.set_yscale("log")
            axis.set_xlabel("epoch")
            axis.set_ylabel(PANELS[column], fontsize="small")
            if len(datasets) > 1:
                axis.set_title(dataset_label(dataset), fontsize="small")
            if np.nanmax(history["epoch"].to_numpy(dtype=float)) <= 20:
                axis.set_xticks(
                    sorted(history["epoch"].unique())[:: max(1, int(history["epoch"].max()) // 10)]
                )
    keys = ordered(all_styles, history[["name", "arch"]].itertuples(index=False, name=None))
    family_legend(
        figure, all_styles, keys, line=True, extra=[sd_entry()], loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    figure.tight_layout()
    save(figure, out_dir, name)
