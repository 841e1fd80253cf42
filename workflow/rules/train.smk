localrules:
    run_config,


rule run_config:
    """The resolved configuration of one run; re-written (and the run redone) when it changes."""
    output:
        RUN_DIR + "/run.json",
    params:
        resolved=lambda wc: resolve_run(CONFIG, run_id(wc)),
    log:
        LOG_DIR + "/run_config.log",
    run:
        from certbench.storage import write_json

        write_json(output[0], params.resolved)
        with open(log[0], "w") as handle:
            print(f"wrote {output[0]}", file=handle)


rule train:
    """Train one run; resumes from its last epoch checkpoint if it was interrupted."""
    input:
        RUN_DIR + "/run.json",
    output:
        model=RUN_DIR + "/model.pt",
        record=RUN_DIR + "/train.json",
    log:
        LOG_DIR + "/train.log",
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("train"),
    params:
        out_dir=RUN_DIR,
    shell:
        "{PYTHON:q} -m certbench.cli train --run-config {input:q} --out-dir {params.out_dir:q} "
        "--threads {threads} 2> {log:q}"
