rule collect:
    """summary.csv: one row per run, whatever its status."""
    input:
        run_files("record.json"),
    output:
        RESULTS + "/summary.csv",
    log:
        RESULTS + "/logs/collect.log",
    shell:
        "{PYTHON:q} -m certbench.cli collect --out {output:q} {input:q} 2> {log:q}"


rule tables:
    input:
        RESULTS + "/summary.csv",
    output:
        expand(RESULTS + "/tables/{table}.{ext}", table=["accuracy", "lmt", "cost"], ext=["csv", "md", "tex"]),
    log:
        RESULTS + "/logs/tables.log",
    params:
        out_dir=RESULTS + "/tables",
    shell:
        "{PYTHON:q} -m certbench.cli tables --summary {input:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule figures:
    input:
        RESULTS + "/summary.csv",
    output:
        expand(FIGURES + "/{figure}.{ext}", figure=["accuracy"], ext=["png", "pdf"]),
    log:
        RESULTS + "/logs/figures.log",
    params:
        out_dir=FIGURES,
    shell:
        "{PYTHON:q} -m certbench.cli figures --summary {input:q} --out-dir {params.out_dir:q} 2> {log:q}"
