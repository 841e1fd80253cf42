localrules:
    run_config,


rule run_config:
    """The resolved configuration of one run; re-written (and the run redone) when it changes."""
    output:
        run_file("run.json"),
    log:
        run_log("run_config"),
    params:
        resolved=lambda wildcards: json.dumps(resolve_run(CONFIG, run_id(wildcards))),
    shell:
        "python -m certbench run-config --resolved {params.resolved:q} --out {output:q} 2> {log:q}"


rule train:
    """Train one run; resumes from its last epoch checkpoint if it was interrupted."""
    input:
        run_file("run.json"),
    output:
        model=run_file("model.pt"),
        record=run_file("train.json"),
    log:
        run_log("train"),
    threads: CONFIG["resources"]["threads"]
    resources:
        **job_resources("train"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    shell:
        "python -m certbench train --run-config {input:q} --out-dir {params.out_dir:q} "
        "--threads {threads} --gpus {resources.gpu} 2> {log:q}"
