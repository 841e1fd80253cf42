"""The Snakemake report: every table inline as HTML with its caption, every figure, the audit
verdict on the first page; and `make run` ends with the report."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from certbench.frontpage import audit_section, runs_section, write_front_page
from certbench.outputs import FIGURE_NAMES, TABLE_NAMES

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def tiny_config(tmp_path: Path) -> Path:
    """The smoke config made smaller still (16 test points, two certificates), with a published
    figure so that the ours-vs-published figure has something to draw."""
    config = yaml.safe_load((REPO / "config/smoke.yaml").read_text())
    config.update(results_dir=str(tmp_path / "results"), figures_dir=str(tmp_path / "figures"), device="cpu")
    config["datasets"]["digits"]["test_size"] = 16
    config["experiments"][0]["published"] = {"digits": {"clean": 90.0}}
    config["evaluation"].update(
        batch_size=16,
        certificates=["lipschitz-l2", "ibp"],
        attack_params={"deepfool-l2": {"steps": 5}, "pgd-linf": {"steps": 3}},
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--cores", "2", "--resources", "gpu=0", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def embedded(html: str, variable: str) -> object:
    """The JSON value the report assigns to ``var <variable> = …``."""
    match = re.search(rf"var {variable} = (?=[{{\"])", html)  # not the report's own JavaScript variables
    assert match is not None, variable
    return json.JSONDecoder().raw_decode(html, match.end())[0]


def decoded(entry: dict) -> str:
    return base64.b64decode(entry["data_uri"].split("base64,", 1)[1]).decode()


@pytest.mark.slow
def test_report_shows_every_table_inline_every_figure_and_the_audit_first(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    run = snakemake("--configfile", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = tmp_path / "report.html"
    made = snakemake("--configfile", str(config), "--report", str(report), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    html = report.read_text()
    results = {Path(path).name: entry for path, entry in embedded(html, "results").items()}
    for table in TABLE_NAMES:
        page = results[f"{table}.html"]
        assert page["mime_type"] == "text/html" and page["labels"]["inline"] == "yes"  # the toggle's default
        assert "Reproduces" in page["caption"] or "No paper table" in page["caption"]
        body = decoded(page)
        assert "<table" in body and "_" not in re.sub(r"<[^>]+>", "", body.split("<table")[1])
        assert table == "audit" or "ddof = 1" in body
        assert f"{table}.csv" in results  # the CSV stays as a download
    assert "clean accuracy (%)" in decoded(results["linf.html"])
    assert "published clean accuracy (%)" in decoded(results["linf.html"])
    for figure in FIGURE_NAMES:
        entry = results[f"{figure}.png"]
        assert entry["mime_type"] == "image/png" and entry["caption"].strip(), figure
    front = embedded(html, "workflow_desc")
    assert "Audit:" in front and "Runs:" in front and "<em>lower</em> bound" in front


def test_make_run_ends_with_the_report() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe is not None
    assert "--report $(REPORT)" in recipe.group(1).strip().splitlines()[-1]
    assert re.search(r"^REPORT \?= results/report\.html$", makefile, re.MULTILINE)


def audit_rows(violations: int, checks: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "dataset": "digits",
                "name": "lmt",
                "method": "lmt",
                "arch": "mlp",
                "seed": 0,
                "certificate": "lipschitz-l2",
                "norm": "l2",
                "checks": checks,
                "violations": violations,
                "worst_ratio": 1.5 if checks else None,
                "samples": "",
                "attacks": "",
            }
        ]
    )


def test_front_page_says_what_the_audit_found(tmp_path: Path) -> None:
    assert "no violations** in 7 checks" in audit_section(audit_rows(0, 7))
    assert "VIOLATION" in audit_section(
        audit_rows(2, 7)
    ) and "lipschitz-l2 on lmt / mlp seed 0" in audit_section(audit_rows(2, 7))
    assert "nothing was checked" in audit_section(audit_rows(0, 0))
    finished = {"dataset": "digits", "name": "lmt", "arch": "mlp", "seed": 0, "status": "ok", "message": ""}
    summary = pd.DataFrame(
        [
            {**finished, "metric": "clean_accuracy", "kind": "clean", "value": 0.9},
            {
                **finished,
                "metric": "certified_accuracy",
                "kind": "certificate",
                "evaluation": "any",
                "norm": "l2",
                "eps": 0.5,
                "value": 0.4,
            },
            {
                "dataset": "digits",
                "name": "ibp",
                "arch": "mlp",
                "seed": 1,
                "status": "diverged",
                "message": "loss is {nan}",
            },
        ]
    )
    runs = runs_section(summary)  # a tidy summary: a run counts once, whatever its number of metric rows
    assert "**Runs:** 2 — 1 ok, 1 diverged." in runs and "diverged — loss is (nan)" in runs
    overview = tmp_path / "overview.rst"
    overview.write_text("title\n=====\n\nintro\n")
    audit_rows(0, 3).to_csv(tmp_path / "audit.csv", index=False)
    summary.to_csv(tmp_path / "summary.csv", index=False)
    text = write_front_page(
        overview, tmp_path / "summary.csv", tmp_path / "audit.csv", tmp_path / "front.rst"
    )
    from docutils.core import publish_parts

    links = "\n.. _Tables: #tables\n.. _Figures: #figures\n"  # Snakemake adds these targets
    body = publish_parts(text + links, writer="html", settings_overrides={"halt_level": 2})["html_body"]
    assert "<table" in body and "Lipschitz margin" in body
