import os

from certbench.outputs import FIGURE_NAMES, TABLE_NAMES

localrules:
    published,
    config_snapshot,
    history,
    front_page,


# The report's first page: once the DAG has run, the front page that `front_page` writes (the
# overview below plus the audit verdict and the runs' status); before that, the overview alone.
FRONT_PAGE = RESULTS + "/report/front_page.rst"
TABLE_LABELS = {
    "linf": "Zhang et al. 2021, Table 1",
    "lmt": "Tsuzuku et al. 2018, §5",
    "cost": "Zhang et al. 2021, Table 4",
    "cross": "certbench (no paper table)",
    "audit": "certbench (no paper table)",
}


report: os.path.abspath(FRONT_PAGE) if os.path.exists(FRONT_PAGE) else "../report/workflow.rst"


rule config_snapshot:
    """The validated configuration, every default filled in, for the report."""
    output:
        report(RESULTS + "/config.yaml", caption="../report/config.rst", category="Configuration"),
    params:
        config=CONFIG,
    log:
        RESULTS + "/logs/config_snapshot.log",
    run:
        import yaml

        from certbench.storage import atomic_write_bytes

        atomic_write_bytes(output[0], yaml.safe_dump(params.config, sort_keys=False).encode())
        with open(log[0], "w") as handle:
            print(f"wrote {output[0]}", file=handle)


rule collect:
    """summary.csv (one row per run, whatever its status) and radii.csv (per-sample radii and attacks)."""
    input:
        run_files("record.json"),
    output:
        summary=report(RESULTS + "/summary.csv", caption="../report/summary.rst", category="Runs"),
        radii=RESULTS + "/radii.csv",
    log:
        RESULTS + "/logs/collect.log",
    shell:
        "{PYTHON:q} -m certbench.cli collect --out {output.summary:q} --radii {output.radii:q} {input:q} 2> {log:q}"


rule published:
    """The published figures given in the config, for the paper tables."""
    output:
        RESULTS + "/published.csv",
    params:
        experiments=CONFIG["experiments"],
    log:
        RESULTS + "/logs/published.log",
    run:
        from certbench.storage import atomic_write_bytes
        from certbench.tables import published_table

        atomic_write_bytes(output[0], published_table(params.experiments).to_csv(index=False).encode())
        with open(log[0], "w") as handle:
            print(f"wrote {output[0]}", file=handle)


rule history:
    """history.csv: every run's per-epoch training log, for the training curves."""
    input:
        run_files("record.json"),
    output:
        RESULTS + "/history.csv",
    log:
        RESULTS + "/logs/history.log",
    run:
        from pathlib import Path

        from certbench.collect import history

        table = history([Path(p) for p in input], Path(output[0]))
        with open(log[0], "w") as handle:
            print(f"wrote {output[0]}: {len(table)} epochs", file=handle)


rule tables:
    """Every paper table as CSV (column keys), Markdown, LaTeX and HTML (human headers). In the
    report, the label `inline` is a toggle: `yes` (the default) shows the HTML table, `no` the CSV
    to download."""
    input:
        summary=RESULTS + "/summary.csv",
        audit=RESULTS + "/audit.csv",
        published=RESULTS + "/published.csv",
    output:
        [report(RESULTS + f"/tables/{table}.html", caption=f"../report/table_{table}.rst", category="Tables",
                labels={"table": table, "reproduces": TABLE_LABELS[table], "inline": "yes"})
         for table in TABLE_NAMES],
        [report(RESULTS + f"/tables/{table}.csv", caption=f"../report/table_{table}.rst", category="Tables",
                labels={"table": table, "reproduces": TABLE_LABELS[table], "inline": "no"})
         for table in TABLE_NAMES],
        expand(RESULTS + "/tables/{table}.{ext}", table=TABLE_NAMES, ext=["md", "tex"]),
    log:
        RESULTS + "/logs/tables.log",
    params:
        out_dir=RESULTS + "/tables",
    shell:
        "{PYTHON:q} -m certbench.cli tables --summary {input.summary:q} --audit {input.audit:q} "
        "--published {input.published:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule figures:
    input:
        summary=RESULTS + "/summary.csv",
        radii=RESULTS + "/radii.csv",
        history=RESULTS + "/history.csv",
        published=RESULTS + "/published.csv",
    output:
        [report(FIGURES + f"/{figure}.png", caption=f"../report/figure_{figure}.rst", category="Figures",
                labels={"figure": figure.replace("_", " ")})
         for figure in FIGURE_NAMES],
        expand(FIGURES + "/{figure}.pdf", figure=FIGURE_NAMES),
    log:
        RESULTS + "/logs/figures.log",
    params:
        out_dir=FIGURES,
    shell:
        "{PYTHON:q} -m certbench.cli figures --summary {input.summary:q} --radii {input.radii:q} "
        "--history {input.history:q} --published {input.published:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule front_page:
    """The report's first page: the overview, the audit verdict per certificate and the runs' status."""
    input:
        summary=RESULTS + "/summary.csv",
        audit=RESULTS + "/audit.csv",
        overview=os.path.join(workflow.basedir, "workflow", "report", "workflow.rst"),
    output:
        FRONT_PAGE,
    log:
        RESULTS + "/logs/front_page.log",
    run:
        from pathlib import Path

        from certbench.frontpage import write_front_page

        write_front_page(Path(input.overview), Path(input.summary), Path(input.audit), Path(output[0]))
        with open(log[0], "w") as handle:
            print(f"wrote {output[0]}", file=handle)
