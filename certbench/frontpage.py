"""The first page of the Snakemake report: the overview, the audit verdict and the runs' status.

Written as reStructuredText (what Snakemake renders as the report's front page) from
``audit.csv`` and ``summary.csv``; torch-free. The page is narrow, so the audit is summarised
per certificate (the full audit table is in the report's *Tables* category).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from certbench.collect import runs
from certbench.labels import certificate_label
from certbench.storage import atomic_write_bytes

# Snakemake's report centres its content pane vertically, so a first page taller than the window
# loses its top (the audit verdict) out of scroll reach; this aligns the pane to the top instead.
TOP_ALIGN = """.. raw:: html

   <style>div.grow.flex.items-center.justify-center.h-screen.overflow-auto{align-items:flex-start}</style>
"""


def _rst_table(header: list[str], rows: list[list[str]], widths: str = "") -> str:
    """A ``list-table`` directive."""
    lines = [".. list-table::", "   :header-rows: 1", *([f"   :widths: {widths}"] if widths else []), ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return "\n".join(lines) + "\n"


def _plain(text: object) -> str:
    """Text safe inside reStructuredText and the Jinja pass Snakemake makes over the page."""
    return str(text).replace("{", "(").replace("}", ")").replace("*", "×").replace("`", "'").replace("|", "/")


def audit_section(audit: pd.DataFrame) -> str:
    """The audit verdict and, per certificate, the checks, violations and worst ratio."""
    if audit.empty:
        return "**Audit: no certificate was audited** (no finished runs).\n"
    violations = int(pd.to_numeric(audit["violations"], errors="coerce").fillna(0).sum())
    checks = int(pd.to_numeric(audit["checks"], errors="coerce").fillna(0).sum())
    if violations:
        broken = audit[pd.to_numeric(audit["violations"], errors="coerce").fillna(0) > 0]
        where = "; ".join(
            f"{r.certificate} on {r.name} / {r.arch} seed {r.seed} ({int(r.violations)})"
            for r in broken.itertuples()
        )
        head = (
            f"**Audit: {violations} VIOLATION(S)** — an attack broke a point inside its certified radius: "
            f"{_plain(where)}. These certificates are not sound as run; see the audit table.\n"
        )
    elif checks:
        head = (
            f"**Audit: no violations** in {checks} checks: no attack broke a point inside its certified "
            "radius (a check: an adversarial example an attack found for a correctly classified point, "
            "compared with that point's certificate).\n"
        )
    else:
        head = (
            "**Audit: nothing was checked** — no attack found an adversarial example for a correctly "
            "classified point, so no certificate was put to the test.\n"
        )
    rows = []
    for certificate, group in audit.groupby("certificate", sort=True):
        ratio = pd.to_numeric(group["worst_ratio"], errors="coerce").min()
        rows.append(
            [
                _plain(certificate_label(str(certificate))),
                str(len(group)),
                str(int(pd.to_numeric(group["checks"], errors="coerce").fillna(0).sum())),
                str(int(pd.to_numeric(group["violations"], errors="coerce").fillna(0).sum())),
                f"{ratio:.3g}" if pd.notna(ratio) else "–",
            ]
        )
    note = (
        "Worst ratio: the smallest adversarial norm / certified radius over the checked pairs (≥ 1 for a "
        "sound certificate; – where the certificate gives no radius (fixed ε) or no attack found an "
        "adversarial example for a point with a positive radius).\n"
    )
    table = _rst_table(["certificate", "runs", "checks", "violations", "worst ratio"], rows, "40 12 16 16 16")
    return head + "\n" + table + "\n" + note


def runs_section(summary: pd.DataFrame) -> str:
    """How many runs finished, and every run that did not, with its message (``summary``: tidy, one row
    per run and metric)."""
    if summary.empty:
        return "**Runs:** none.\n"
    summary = runs(summary)
    counts = summary["status"].value_counts()
    text = f"**Runs:** {len(summary)} — " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".\n"
    failed = summary[summary["status"] != "ok"]
    if not failed.empty:
        text += (
            "\n"
            + "\n".join(
                f"- {_plain(r.name)} / {_plain(r.arch)} on {_plain(r.dataset)}, seed {r.seed}: "
                f"{_plain(r.status)} — {_plain(r.message)}"
                for r in failed.itertuples()
            )
            + "\n"
        )
    return text


def write_front_page(overview: Path, summary_path: Path, audit_path: Path, out: Path) -> str:
    """``out``: the overview's title, the audit and runs summaries, then the overview; returns the text."""
    summary = pd.read_csv(summary_path) if summary_path.stat().st_size > 1 else pd.DataFrame()
    audit = pd.read_csv(audit_path) if audit_path.stat().st_size > 1 else pd.DataFrame()
    lines = overview.read_text().rstrip().splitlines()
    titled = len(lines) > 1 and set(lines[1]) == {"="}
    title, body = (lines[:2], lines[2:]) if titled else (["certbench", "========="], lines)
    text = "\n".join(
        [
            *title,
            "",
            TOP_ALIGN,
            audit_section(audit),
            runs_section(summary),
            (
                "The tables are under Tables_, each with a caption that says which paper table it "
                "reproduces (the *inline* toggle: *yes* shows the table, *no* its CSV to download); "
                "the figures are under Figures_.\n"
            ),
            "About this report",
            "-----------------",
            "\n".join(body).strip() + "\n",
        ]
    )
    atomic_write_bytes(out, text.encode())
    return text
