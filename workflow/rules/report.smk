from certbench.outputs import FIGURE_NAMES, TABLE_NAMES

localrules:
    published,
    config_snapshot,


report: "../report/workflow.rst"


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


rule tables:
    input:
        summary=RESULTS + "/summary.csv",
        audit=RESULTS + "/audit.csv",
        published=RESULTS + "/published.csv",
    output:
        [report(RESULTS + f"/tables/{table}.csv", caption=f"../report/table_{table}.rst", category="Tables")
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
    output:
        [report(FIGURES + f"/{figure}.png", caption=f"../report/figure_{figure}.rst", category="Figures")
         for figure in FIGURE_NAMES],
        expand(FIGURES + "/{figure}.pdf", figure=FIGURE_NAMES),
    log:
        RESULTS + "/logs/figures.log",
    params:
        out_dir=FIGURES,
    shell:
        "{PYTHON:q} -m certbench.cli figures --summary {input.summary:q} --radii {input.radii:q} "
        "--out-dir {params.out_dir:q} 2> {log:q}"
