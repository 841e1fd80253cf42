localrules:
    record,
    audit_check,


rule certify:
    """Every applicable certificate on the run's test points."""
    input:
        config=run_file("run.json"),
        model=run_file("model.pt"),
        train=run_file("train.json"),
    output:
        run_file("certify.json"),
    log:
        run_log("certify"),
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("certify"),
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.model),
    shell:
        "python -m certbench certify --run-config {input.config:q} --run-dir {params.run_dir:q} "
        "--out {output:q} --threads {threads} --gpus {resources.gpu} 2> {log:q}"


rule attack:
    """Every configured attack on the run's test points."""
    input:
        config=run_file("run.json"),
        model=run_file("model.pt"),
        train=run_file("train.json"),
    output:
        run_file("attack.json"),
    log:
        run_log("attack"),
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("attack"),
    params:
        run_dir=lambda wildcards, input: os.path.dirname(input.model),
    shell:
        "python -m certbench attack --run-config {input.config:q} --run-dir {params.run_dir:q} "
        "--out {output:q} --threads {threads} --gpus {resources.gpu} 2> {log:q}"


rule record:
    """One record per run: training, certificates and attacks joined, plus its per-sample table."""
    input:
        config=run_file("run.json"),
        train=run_file("train.json"),
        certify=run_file("certify.json"),
        attack=run_file("attack.json"),
    output:
        record=run_file("record.json"),
        samples=run_file("samples.csv"),
    log:
        run_log("record"),
    shell:
        "python -m certbench record --run-config {input.config:q} --train {input.train:q} "
        "--certify {input.certify:q} --attack {input.attack:q} --out {output.record:q} "
        "--samples {output.samples:q} 2> {log:q}"


rule audit:
    """Every certificate of every run against every attack; written even when it finds violations."""
    input:
        run_files("record.json"),
    output:
        result("audit.csv"),
    log:
        log_file("audit"),
    shell:
        "python -m certbench audit --out {output:q} {input:q} 2> {log:q}"


rule audit_check:
    """Fails the DAG, naming method, certificate and samples, when the audit found a violation."""
    input:
        result("audit.csv"),
    output:
        result("audit.ok"),
    log:
        log_file("audit_check"),
    shell:
        "python -m certbench audit-check --audit {input:q} --out {output:q} 2> {log:q}"
