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

Conventions (see :mod:`certbench.plotting`): colour per experiment in the hues of its method
family, marker per architecture; means over seeds with ±1 sample sd (ddof = 1); human labels
from :mod:`certbench.labels`. ``python -m certbench.figures --help`` runs it by hand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from certbench.collect import SUMMARY_COLUMNS, SUMMARY_DTYPES
from certbench.plotting.bounds import bounds_figure
from certbench.plotting.common import placeholder
from certbench.plotting.comparison import (
    cost_figure,
    lipschitz_figure,
    published_figure,
    radius_distribution_figure,
    tradeoff_figure,
)
from certbench.plotting.training import training_figure


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
) -> None:
    """Every figure of :data:`certbench.outputs.FIGURE_NAMES` into ``out_dir`` (a placeholder
    that says why where there is nothing to draw, so that every output exists)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m certbench.figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--summary", type=Path, required=True, help="summary.csv from `certbench collect`")
    parser.add_argument("--radii", type=Path, required=True, help="radii.csv from `certbench collect`")
    parser.add_argument("--history", type=Path, help="history.csv (per-epoch training logs)")
    parser.add_argument("--published", type=Path, help="published.csv (published figures of the config)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for the PNG and PDF files")
    args = parser.parse_args(argv)
    for path in (args.summary, args.radii, args.history, args.published):
        if path is not None and not path.exists():
            print(f"certbench figures: no such file: {path}", file=sys.stderr)
            return 2
    write_figures(args.summary, args.radii, args.out_dir, args.history, args.published)
    return 0


if __name__ == "__main__":
    sys.exit(main())
