"""Tables from ``summary.csv`` and ``audit.csv``: mean ± sd over seeds, as CSV, Markdown
(tabulate), LaTeX and HTML.

The spread is the sample standard deviation (``ddof=1``), as in the figures; a cell with a single
finished seed shows the value alone. Runs that did not finish (``status`` other than ``ok``,
e.g. ``diverged``) stay in every table as rows marked with their status instead of being dropped.
Each table selects its rows of the tidy ``summary.csv`` (:func:`certbench.collect.select`) and
gives each a column; the CSV keeps those column keys (``median_radius_norm:lipschitz-l2``,
``cert:ibp@0.1``) for programs; Markdown, LaTeX and HTML show the human headers each table
builds from the same rows (:mod:`certbench.labels`).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from certbench.collect import ANY, read_summary, runs, select
from certbench.config import format_eps
from certbench.labels import (
    COLUMNS,
    accuracy_label,
    certified_by_label,
    difference_label,
    errors_label,
    published_label,
    radius_label,
)
from certbench.storage import atomic_write_bytes

KEYS = ["dataset", "name", "arch"]


def _fmt(values: pd.Series, percent: bool) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    scale = 100.0 if percent else 1.0
    mean = values.mean() * scale
    digits = 2 if percent or abs(mean) >= 1 else 4
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {values.std(ddof=1) * scale:.{digits}f}"


def aggregate(
    summary: pd.DataFrame, columns: Sequence[str], percent: Sequence[str] = (), counts: Sequence[str] = ()
) -> pd.DataFrame:
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


def _evaluated(summary: pd.DataFrame, metric: str, **equal: object) -> list[tuple[str, str, float]]:
    """The (evaluation, norm, ε) with a row of ``metric`` where each column of ``equal`` has its value,
    sorted by evaluation and ε."""
    chosen = summary["metric"] == metric
    for column, value in equal.items():
        chosen &= summary[column] == value
    found = summary.loc[chosen, ["evaluation", "norm", "eps"]].drop_duplicates(["evaluation", "eps"])
    return sorted(found.itertuples(index=False, name=None), key=lambda e: (e[0], e[2]))


def _labelled(table: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """``table`` with the human headers of its columns (``attrs["labels"]``, read by :func:`human`)."""
    table.attrs["labels"] = dict(labels)
    return table


def _by_run(summary: pd.DataFrame, columns: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run with a column per entry of ``columns`` (each a :func:`~certbench.collect.select`)."""
    frame = runs(summary)
    for key, selected in columns.items():
        frame[key] = selected["value"].to_numpy()
    return frame


#: The attacks with columns in the accuracy tables, per norm: (column key, attack, header), where evaluated.
ATTACK_COLUMNS = {
    "linf": [("pgd", "pgd-linf", "PGD accuracy"), ("autoattack", "autoattack-linf", "AutoAttack accuracy")],
    "l2": [("pgd", "pgd-l2", "PGD accuracy"), ("autoattack", "autoattack-l2", "AutoAttack accuracy")],
}


def _accuracy_columns(summary: pd.DataFrame, norm: str) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Clean accuracy, then the accuracy under each attack of :data:`ATTACK_COLUMNS` and the certified
    accuracy (any certificate, radii of the other norm converted) at each ``norm`` ε."""
    columns = {"clean": select(summary, "clean_accuracy")}
    labels = {"clean": COLUMNS["clean"]}
    for key, attack, what in ATTACK_COLUMNS[norm]:
        for _, _, eps in _evaluated(summary, "robust_accuracy", evaluation=attack):
            columns[f"{key}@{format_eps(eps)}"] = select(
                summary, "robust_accuracy", evaluation=attack, eps=eps
            )
            labels[f"{key}@{format_eps(eps)}"] = accuracy_label(what, norm, eps)
    for _, _, eps in _evaluated(summary, "certified_accuracy", evaluation=ANY, norm=norm):
        columns[f"certified@{format_eps(eps)}"] = select(
            summary, "certified_accuracy", evaluation=ANY, norm=norm, eps=eps
        )
        labels[f"certified@{format_eps(eps)}"] = accuracy_label("certified accuracy", norm, eps)
    return columns, labels


def l2_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ℓ2 counterpart of :func:`linf_table`: clean / PGD / AutoAttack / certified accuracy (%) at each
    ℓ2 ε (no paper has this table; published figures are not merged)."""
    columns, labels = _accuracy_columns(summary, "l2")
    return _labelled(aggregate(_by_run(summary, columns), list(columns), percent=list(columns)), labels)


def linf_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ℓ∞-dist paper's Table 1 layout: clean / PGD / AutoAttack / certified accuracy (%) at each ℓ∞ ε.

    ``certified`` counts a point certified by any certificate (ℓ2 radii converted); with a paper
    config, the published figures of each row stand in adjacent columns with our difference.
    """
    columns, labels = _accuracy_columns(summary, "linf")
    table = aggregate(_by_run(summary, columns), list(columns), percent=list(columns))
    if published is None or published.empty:
        return _labelled(table, labels)
    table = table.merge(published, on=KEYS, how="left")
    order = [c for c in table.columns if not c.startswith("paper:")]
    for ours in columns:
        paper = f"paper:{ours}"
        if paper not in table:
            continue
        mean = pd.to_numeric(table[ours].str.split(" ± ").str[0], errors="coerce")
        table[f"Δ {ours}"] = (mean - table[paper]).map(lambda v: f"{v:+.2f}" if np.isfinite(v) else "–")
        at = order.index(ours) + 1
        order[at:at] = [paper, f"Δ {ours}"]
        table[paper] = pd.to_numeric(table[paper], errors="coerce").map(
            lambda v: f"{v:.2f}" if np.isfinite(v) else "–"
        )
        labels.update({paper: published_label(labels[ours]), f"Δ {ours}": difference_label(labels[ours])})
    return _labelled(table[order], labels)


def lmt_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The LMT paper's table: clean accuracy, mean and median normalised ℓ2 radius per certificate."""
    radii, labels = {}, {"clean_accuracy": COLUMNS["clean_accuracy"]}
    for statistic in ("mean", "median"):
        metric = f"{statistic}_radius_norm"
        for name, norm, _ in _evaluated(summary, metric):
            radii[f"{metric}:{name}"] = select(summary, metric, evaluation=name)
            labels[f"{metric}:{name}"] = radius_label(statistic, name, norm, normalised=True)
    columns = {"clean_accuracy": select(summary, "clean_accuracy"), **radii}
    return _labelled(aggregate(_by_run(summary, columns), list(columns), percent=["clean_accuracy"]), labels)


def cost_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ℓ∞-dist paper's Table 4 layout: seconds per epoch, peak memory, ratio to ``standard``."""
    every_run = runs(summary)
    table = aggregate(every_run, ["seconds_per_epoch", "peak_memory_mb", "parameters", "epochs"])
    mean = every_run[every_run["status"] == "ok"].groupby(KEYS)["seconds_per_epoch"].mean()
    ratios = []
    for row in table.itertuples():
        base = mean.get((row.dataset, "standard", row.arch), np.nan)
        ours = mean.get((row.dataset, row.name, row.arch), np.nan)
        ratios.append(f"{ours / base:.2f}×" if np.isfinite(base) and np.isfinite(ours) else "–")
    table["time_vs_standard"] = ratios
    return table


def cross_table(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Certified accuracy (%) of every method's models under every certificate at each ε."""
    evaluated = [
        (name, norm, eps)
        for name, norm, eps in _evaluated(summary, "certified_accuracy", kind="certificate")
        if name != ANY
    ]
    certified = {
        f"cert:{name}@{format_eps(eps)}": select(summary, "certified_accuracy", evaluation=name, eps=eps)
        for name, _, eps in evaluated
    }
    with_errors_column = [name for name, _, _ in _evaluated(summary, "errors", kind="certificate")]
    errors = {
        f"cert_errors:{name}": select(summary, "errors", kind="certificate", evaluation=name)
        for name in with_errors_column
    }
    labels = {
        **{
            f"cert:{name}@{format_eps(eps)}": certified_by_label(name, norm, eps)
            for name, norm, eps in evaluated
        },
        **{f"cert_errors:{name}": errors_label(name) for name in with_errors_column},
    }
    table = aggregate(
        _by_run(summary, {**certified, **errors}),
        [*certified, *errors],
        percent=list(certified),
        counts=list(errors),
    )
    for name, _, _ in _evaluated(summary, "applicable"):
        applicable = select(summary, "applicable", evaluation=name)
        never = applicable.groupby(KEYS)["value"].apply(lambda v: not (v.fillna(0) > 0).any())
        for index, row in table.iterrows():
            if never.get((row["dataset"], row["name"], row["arch"]), True):
                for target in [f"cert:{name}@{format_eps(eps)}" for at, _, eps in evaluated if at == name]:
                    table.at[index, target] = "n/a"
    return _labelled(table, labels)


def audit_table(audit: pd.DataFrame) -> pd.DataFrame:
    """Per (data set, method, architecture, certificate): checks, violations and the worst ratio
    adversarial norm / certified radius (≥ 1 for a sound certificate)."""
    if audit.empty:
        return pd.DataFrame(
            columns=["dataset", "name", "arch", "certificate", "checks", "violations", "worst_ratio"]
        )
    grouped = audit.groupby(["dataset", "name", "arch", "certificate"], sort=True)
    return grouped.agg(
        method=("method", "first"),
        runs=("seed", "count"),
        checks=("checks", "sum"),
        violations=("violations", "sum"),
        worst_ratio=("worst_ratio", "min"),
    ).reset_index()


TABLES: dict[str, Callable[..., pd.DataFrame]] = {
    "linf": linf_table,
    "l2": l2_table,
    "lmt": lmt_table,
    "cost": cost_table,
    "cross": cross_table,
}


TITLES = {
    "linf": "Clean, PGD, AutoAttack and certified ℓ∞ accuracy",
    "l2": "Clean, PGD, AutoAttack and certified ℓ2 accuracy",
    "lmt": "Certified ℓ2 radii (LMT)",
    "cost": "Training cost",
    "cross": "Certified accuracy under every certificate",
    "audit": "Soundness audit of the certificates",
}
CAPTIONS = {
    "linf": "Reproduces Table 1 of Zhang et al. (2021), “Towards certifying ℓ∞ robustness using neural "
    "networks with ℓ∞-dist neurons”: clean, PGD and certified accuracy (%) at each ℓ∞ ε, and AutoAttack "
    "accuracy (Croce & Hein 2020) where it was run; with a paper "
    "configuration, the published numbers and our difference stand beside ours.",
    "l2": "No paper table (the ℓ2 counterpart of the ℓ∞ table): clean, PGD-ℓ2 and certified accuracy (%) "
    "at each ℓ2 ε (any certificate, ℓ∞ radii converted), and AutoAttack-ℓ2 accuracy where it was run.",
    "lmt": "Reproduces the certified-radius comparison of Tsuzuku et al. (2018), “Lipschitz-margin training” "
    "(§5): clean accuracy and the mean and median certified ℓ2 radius divided by √n (n the input size), "
    "per certificate.",
    "cost": "Reproduces Table 4 of Zhang et al. (2021): seconds per training epoch, peak memory and "
    "parameters, and the time relative to standard training on the same data set and architecture.",
    "cross": "No paper table (certbench's cross-evaluation): certified accuracy (%) of every model under "
    "every certificate at each ε; n/a where the certificate does not apply; errors: points whose verifier "
    "failed.",
    "audit": "No paper table (certbench's soundness audit): per certificate, the (point, attack) pairs "
    "checked, the points an attack broke inside the certified radius (must be 0) and the smallest ratio "
    "attack norm / certified radius (≥ 1 for a sound certificate).",
}
SPREAD_NOTE = (
    "Cells: mean ± sample standard deviation (ddof = 1) over the seeds that finished; a single value "
    "where one seed finished; – where nothing was measured."
)
HTML_STYLE = (
    'body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:14px;margin:1em;'
    """color:#222}
p{max-width:60em;line-height:1.4}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0;text-align:center;white-space:normal;min-width:5em;max-width:12em}
tr:hover td{background:#fafafa}"""
)


def human(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with human column headers: those its builder gave (``attrs["labels"]``), else the fixed
    ones of :data:`certbench.labels.COLUMNS`; keys kept where there is no better name."""
    labels = {**COLUMNS, **table.attrs.get("labels", {})}
    return table.rename(columns={c: labels.get(str(c), c) for c in table.columns})


def _numeric(column: pd.Series) -> bool:
    """Whether a column holds numbers (formatted ones included: ``85.00 ± 7.07``, ``2.00×``, ``–``)."""
    text = column.dropna().astype(str)
    return bool(len(text)) and text.str.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?( ± [\d.,]+)?×?|–|n/a|nan").all()


def to_html(table: pd.DataFrame, title: str, caption: str = "", note: str = SPREAD_NOTE) -> str:
    """A standalone HTML page with ``table`` (human headers), its title, caption and a note."""
    body = human(table).to_html(
        index=False, border=0, na_rep="–", escape=True, float_format=lambda v: f"{v:.4g}"
    )
    text_columns = [i for i, c in enumerate(table.columns, start=1) if not _numeric(table[c])]
    style = HTML_STYLE + "".join(f"\ntd:nth-child({i}){{text-align:left}}" for i in text_columns)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n<h3>{html.escape(title)}</h3>\n"
        f"<p>{html.escape(caption)}</p>\n<p>{html.escape(note)}</p>\n{body}\n</body></html>\n"
    )


def write_table(table: pd.DataFrame, out_dir: Path, name: str) -> None:
    """``name`` as ``.csv`` (column keys), ``.md``, ``.tex`` and ``.html`` (human headers)."""
    atomic_write_bytes(out_dir / f"{name}.csv", table.to_csv(index=False).encode())
    shown = human(table)
    atomic_write_bytes(
        out_dir / f"{name}.md", shown.to_markdown(index=False, disable_numparse=True).encode() + b"\n"
    )
    latex = (
        shown.to_latex(index=False, escape=True)
        .replace("±", r"$\pm$")
        .replace("×", r"$\times$")
        .replace("–", "--")
    )
    for symbol, command in (
        ("Δ", r"$\Delta$"),
        ("ℓ∞", r"$\ell_\infty$"),
        ("ℓ2", r"$\ell_2$"),
        ("ε", r"$\varepsilon$"),
        ("√", r"$\surd$"),
        ("−", "-"),
        ("≥", r"$\geq$"),
    ):
        latex = latex.replace(symbol, command)
    atomic_write_bytes(out_dir / f"{name}.tex", latex.encode())
    title = TITLES.get(name, f"Table {name}")
    note = "Sums over runs; the worst ratio is the minimum." if name == "audit" else SPREAD_NOTE
    atomic_write_bytes(out_dir / f"{name}.html", to_html(table, title, CAPTIONS.get(name, ""), note).encode())


def write_tables(
    summary_path: Path, audit_path: Path, out_dir: Path, published_path: Path | None = None
) -> None:
    """Every table of :data:`certbench.outputs.TABLE_NAMES` (Snakemake checks that all are made)."""
    summary = read_summary(summary_path)
    published = pd.read_csv(published_path) if published_path is not None else None
    for name, build in TABLES.items():
        write_table(build(summary, published), out_dir, name)
    write_table(audit_table(pd.read_csv(audit_path, dtype={"samples": str})), out_dir, "audit")


def published_table(experiments: Sequence[dict]) -> pd.DataFrame:
    """The ``published`` figures of the config's experiments, one row per (data set, name, arch)."""
    rows = [
        {
            "dataset": dataset,
            "name": entry["name"],
            "arch": entry["arch"],
            **{f"paper:{key}": value for key, value in figures.items()},
        }
        for entry in experiments
        for dataset, figures in entry.get("published", {}).items()
    ]
    return pd.DataFrame(rows, columns=KEYS if not rows else None)
