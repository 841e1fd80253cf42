from certbench.outputs import FIGURE_NAMES, TABLE_NAMES


localrules:
    published,
    config_snapshot,
    history,
    front_page,


# The report's first page: once the DAG has run, the front page that `front_page` writes (the
# overview below plus the audit verdict and the runs' status); before that, the overview alone.
FRONT_PAGE = result("report", "front_page.rst")
TABLE_LABELS = {
    "linf": "Zhang et al. 2021, Table 1",
    "l2": "certbench (no paper table)",
    "lmt": "Tsuzuku et al. 2018, §5",
    "cost": "Zhang et al. 2021, Table 4",
    "cross": "certbench (no paper table)",
    "audit": "certbench (no paper table)",
}


report: os.path.abspath(FRONT_PAGE) if os.path.exists(FRONT_PAGE) else "../report/workflow.rst"


rule config_snapshot:
    """The validated configuration, every default filled in, for the report."""
    output:
        report(result("config.yaml"), caption="../report/config.rst", category="Configuration"),
    log:
        log_file("config_snapshot"),
    params:
        config=json.dumps(CONFIG),
    shell:
        "python -m certbench config-snapshot --config {params.config:q} --out {output:q} 2> {log:q}"


rule collect:
    """summary.csv (one row per run and metric, every status kept) and radii.csv (per-sample radii and attacks)."""
    input:
        run_files("record.json"),
    output:
        summary=report(result("summary.csv"), caption="../report/summary.rst", category="Runs"),
        radii=result("radii.csv"),
    log:
        log_file("collect"),
    shell:
        "python -m certbench collect --out {output.summary:q} --radii {output.radii:q} {input:q} 2> {log:q}"


rule published:
    """The published figures given in the config, for the paper tables."""
    output:
        result("published.csv"),
    log:
        log_file("published"),
    params:
        experiments=json.dumps(CONFIG["experiments"]),
    shell:
        "python -m certbench published --experiments {params.experiments:q} --out {output:q} 2> {log:q}"


rule history:
    """history.csv: every run's per-epoch training log, for the training curves."""
    input:
        run_files("record.json"),
    output:
        result("history.csv"),
    log:
        log_file("history"),
    shell:
        "python -m certbench history --out {output:q} {input:q} 2> {log:q}"


rule tables:
    """Every paper table as CSV (column keys), Markdown, LaTeX and HTML (human headers). In the
    report, the label `inline` is a toggle: `yes` (the default) shows the HTML table, `no` the CSV
    to download."""
    input:
        summary=result("summary.csv"),
        audit=result("audit.csv"),
        published=result("published.csv"),
    output:
        [
            report(
                result("tables", f"{table}.html"),
                caption=f"../report/table_{table}.rst",
                category="Tables",
                labels={"table": table, "reproduces": TABLE_LABELS[table], "inline": "yes"},
            )
            for table in TABLE_NAMES
        ],
        [
            report(
                result("tables", f"{table}.csv"),
                caption=f"../report/table_{table}.rst",
                category="Tables",
                labels={"table": table, "reproduces": TABLE_LABELS[table], "inline": "no"},
            )
            for table in TABLE_NAMES
        ],
        expand(result("tables", "{table}.{ext}"), table=TABLE_NAMES, ext=["md", "tex"]),
    log:
        log_file("tables"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "python -m certbench tables --summary {input.summary:q} --audit {input.audit:q} "
        "--published {input.published:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule figures:
    input:
        summary=result("summary.csv"),
        radii=result("radii.csv"),
        history=result("history.csv"),
        published=result("published.csv"),
    output:
        [
            report(
                os.path.join(FIGURES, f"{figure}.png"),
                caption=f"../report/figure_{figure}.rst",
                category="Figures",
                labels={"figure": figure.replace("_", " ")},
            )
            for figure in FIGURE_NAMES + CONFIG["extra_figures"]
        ],
        expand(os.path.join(FIGURES, "{figure}.pdf"), figure=FIGURE_NAMES + CONFIG["extra_figures"]),
    log:
        log_file("figures"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        extra=" ".join(["--extra", *CONFIG["extra_figures"]]) if CONFIG["extra_figures"] else "",
    shell:
        "python -m certbench figures --summary {input.summary:q} --radii {input.radii:q} "
        "--history {input.history:q} --published {input.published:q} --out-dir {params.out_dir:q} "
        "{params.extra} 2> {log:q}"


rule front_page:
    """The report's first page: the overview, the audit verdict per certificate and the runs' status."""
    input:
        summary=result("summary.csv"),
        audit=result("audit.csv"),
        overview=os.path.join(workflow.basedir, "workflow", "report", "workflow.rst"),
    output:
        FRONT_PAGE,
    log:
        log_file("front_page"),
    shell:
        "python -m certbench front-page --overview {input.overview:q} --summary {input.summary:q} "
        "--audit {input.audit:q} --out {output:q} 2> {log:q}"
