import shutil
import sys

from certbench.config import RunId, resolve_run, runs

PYTHON = sys.executable
RESULTS = CONFIG["results_dir"]
FIGURES = CONFIG["figures_dir"]
RUN_DIR = RESULTS + "/{dataset}/{name}/{arch}/seed{seed}"
LOG_DIR = RESULTS + "/logs/{dataset}/{name}/{arch}/seed{seed}"
RUNS = runs(CONFIG)

# Jobs that run on CUDA request the `gpu` resource, so `--resources gpu=N` caps them.
GPU = 1 if CONFIG["device"] == "cuda" or (CONFIG["device"] == "auto" and shutil.which("nvidia-smi")) else 0


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    name=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    arch=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    seed=r"\d+",


def job_resources(rule_name):
    """Scheduler requests of a train/certify/attack job (see `resources` in the config schema)."""
    wanted = CONFIG["resources"]
    requests = {"gpu": GPU, "mem_mb": wanted["mem_mb"], "runtime": wanted["runtime_minutes"][rule_name]}
    partition = (GPU and wanted["gpu_partition"]) or wanted["partition"]
    if partition:
        requests["slurm_partition"] = partition
    return requests


def run_id(wildcards):
    return RunId(wildcards.dataset, wildcards.name, wildcards.arch, int(wildcards.seed))


def run_files(filename):
    return [f"{RESULTS}/{run.path}/{filename}" for run in RUNS]

