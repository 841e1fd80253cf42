localrules:
    record,
    audit_check,


rule certify:
    """Every applicable certificate on the run's test points."""
    input:
        config=RUN_DIR + "/run.json",
        model=RUN_DIR + "/model.pt",
        train=RUN_DIR + "/train.json",
    output:
        RUN_DIR + "/certify.json",
    log:
        LOG_DIR + "/certify.log",
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("certify"),
    params:
        run_dir=RUN_DIR,
    shell:
        "{PYTHON:q} -m certbench.cli certify --run-config {input.config:q} --run-dir {params.run_dir:q} "
        "--out {output:q} --threads {threads} 2> {log:q}"


rule attack:
    """Every configured attack on the run's test points."""
    input:
        config=RUN_DIR + "/run.json",
        model=RUN_DIR + "/model.pt",
        train=RUN_DIR + "/train.json",
    output:
        RUN_DIR + "/attack.json",
    log:
        LOG_DIR + "/attack.log",
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("attack"),
    params:
        run_dir=RUN_DIR,
    shell:
        "{PYTHON:q} -m certbench.cli attack --run-config {input.config:q} --run-dir {params.run_dir:q} "
        "--out {output:q} --threads {threads} 2> {log:q}"


rule record:
    """One record per run: training, certificates and attacks joined, plus its per-sample table."""
    input:
        config=RUN_DIR + "/run.json",
        train=RUN_DIR + "/train.json",
        certify=RUN_DIR + "/certify.json",
        attack=RUN_DIR + "/attack.json",
    output:
        record=RUN_DIR + "/record.json",
        samples=RUN_DIR + "/samples.csv",
    log:
        LOG_DIR + "/record.log",
    run:
        from pathlib import Path

        from certbench.collect import assemble

        assemble(*(Path(p) for p in (input.config, input.train, input.certify, input.attack,
                                     output.record, output.samples)))
        with open(log[0], "w") as handle:
            print(f"wrote {output.record}", file=handle)


rule audit:
    """Every certificate of every run against every attack; written even when it finds violations."""
    input:
        run_files("record.json"),
    output:
        RESULTS + "/audit.csv",
    log:
        RESULTS + "/logs/audit.log",
    shell:
        "{PYTHON:q} -m certbench.cli audit --out {output:q} {input:q} 2> {log:q}"


rule audit_check:
    """Fails the DAG, naming method, certificate and samples, when the audit found a violation."""
    input:
        RESULTS + "/audit.csv",
    output:
        RESULTS + "/audit.ok",
    log:
        RESULTS + "/logs/audit_check.log",
    run:
        from certbench.audit import verdict

        message = verdict(input[0])
        with open(log[0], "w") as handle:
            print(message or "no violations", file=handle)
        if message:
            raise RuntimeError(message)
        with open(output[0], "w") as handle:
            print("no violations", file=handle)
