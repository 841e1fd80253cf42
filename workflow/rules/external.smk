# Models trained elsewhere (the config's `external:` list) join the runs: each gets the directory
# layout of a trained run (<results>/<dataset>/<name>/external/seed0), its run.json and an import
# step in place of training, then the certify, attack and record rules every run has; its record
# goes into the audit, the summary, the tables and the figures. Included before the rules that
# read RUNS (evaluate.smk, report.smk, integrity.smk).
from certbench.config import runs
from certbench.external import EXTERNAL, SEED, external_entries, model_file, resolve_external

try:
    EXTERNAL_MODELS = external_entries(CONFIG)
except ConfigError as error:
    sys.exit(f"certbench: config error: {error}")
TRAINED = runs(CONFIG)
RUNS.extend(sorted(EXTERNAL_MODELS))
EXTERNAL_DIR = os.path.join(RESULTS, "{dataset}", "{name}", EXTERNAL, f"seed{SEED}")


localrules:
    external_run_config,


ruleorder: external_run_config > run_config
ruleorder: external_import > train


rule external_run_config:
    """The resolved configuration of an external model (its source under `external`)."""
    output:
        os.path.join(EXTERNAL_DIR, "run.json"),
    log:
        result("logs", "{dataset}", "{name}", EXTERNAL, f"seed{SEED}", "run_config.log"),
    params:
        resolved=lambda wildcards: json.dumps(
            resolve_external(CONFIG, RunId(wildcards.dataset, wildcards.name, EXTERNAL, SEED))
        ),
    shell:
        "python -m certbench run-config --resolved {params.resolved:q} --out {output:q} 2> {log:q}"


rule external_import:
    """Read and check an external model (ONNX: converted and compared with onnxruntime); a model
    that cannot be used is recorded as `refused`, with one line naming the file, and skipped."""
    input:
        config=os.path.join(EXTERNAL_DIR, "run.json"),
        model=lambda wildcards: model_file(
            EXTERNAL_MODELS[RunId(wildcards.dataset, wildcards.name, EXTERNAL, SEED)]
        ),
    output:
        model=os.path.join(EXTERNAL_DIR, "model.pt"),
        record=os.path.join(EXTERNAL_DIR, "train.json"),
    log:
        result("logs", "{dataset}", "{name}", EXTERNAL, f"seed{SEED}", "import.log"),
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    shell:
        "python -m certbench import --run-config {input.config:q} --out-dir {params.out_dir:q} 2> {log:q}"


rule export:
    """Every trained run as ONNX plus VNN-LIB properties of its test points (VNN-COMP's layout);
    not part of `all`: `snakemake --cores 2 export`."""
    input:
        [result(run.path, name) for run in TRAINED for name in ("run.json", "model.pt", "train.json")],
    output:
        directory(result("export")),
    log:
        log_file("export"),
    params:
        run_dirs=[result(run.path) for run in TRAINED],
    shell:
        "python -m certbench export --out-dir {output:q} {params.run_dirs:q} 2> {log:q}"
