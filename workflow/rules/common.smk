import json
import os
import shutil
import sys

from certbench.config import RunId, resolve_run, runs

# Jobs run the Python that runs Snakemake (`python -m certbench …`): its folder comes first on the
# PATH they inherit, whether or not its environment is activated.
os.environ.update(PATH=os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath))))

RESULTS = CONFIG["results_dir"]
FIGURES = CONFIG["figures_dir"]
RUN_DIR = os.path.join(RESULTS, "{dataset}", "{name}", "{arch}", "seed{seed}")
RUNS = runs(CONFIG)


def gpus_per_job(wildcards=None):
    """GPUs each train/certify/attack job requests: one config decision (`resources.gpus_per_job`).

    Unset, it follows `device`: 1 for `cuda`, 0 for `cpu`. `auto` asks for the GPUs of the machine
    that runs Snakemake only when the jobs run on that machine too; jobs that run elsewhere (a
    cluster executor, and the cluster job's own Snakemake process) ask for none, whatever the
    submitting host has. Called when a job is made, after Snakemake has chosen its executor.
    """
    wanted = CONFIG["resources"]["gpus_per_job"]
    if wanted is not None:
        return wanted
    if CONFIG["device"] != "auto":
        return int(CONFIG["device"] == "cuda")
    if workflow.remote_exec or workflow.non_local_exec:
        return 0
    return 1 if shutil.which("nvidia-smi") else 0


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    name=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    arch=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    seed=r"\d+",


def result(*parts):
    """A file under `results_dir`."""
    return os.path.join(RESULTS, *parts)


def run_file(filename):
    """A file of one run (wildcards dataset, name, arch, seed)."""
    return os.path.join(RUN_DIR, filename)


def run_files(filename):
    """The file of every run of the config."""
    return [result(run.path, filename) for run in RUNS]


def log_file(rule_name):
    """The log of a rule's job: stderr of its `certbench` command."""
    return result("logs", f"{rule_name}.log")


def run_log(rule_name):
    """The log of a per-run rule's job."""
    return result("logs", "{dataset}", "{name}", "{arch}", "seed{seed}", f"{rule_name}.log")


def run_id(wildcards):
    return RunId(wildcards.dataset, wildcards.name, wildcards.arch, int(wildcards.seed))


def job_resources(rule_name):
    """Scheduler requests of a train/certify/attack job (see `resources` in the config schema)."""
    wanted = CONFIG["resources"]

    def partition(wildcards):
        # GPU jobs go to `gpu_partition` when set; "" leaves the choice to the cluster's default
        return (gpus_per_job() and wanted["gpu_partition"]) or wanted["partition"] or ""

    requests = {
        "gpu": gpus_per_job,
        "mem_mb": wanted["mem_mb"],
        "runtime": wanted["runtime_minutes"][rule_name],
    }
    if wanted["partition"] or wanted["gpu_partition"]:
        requests["slurm_partition"] = partition
    if wanted["account"]:
        requests["slurm_account"] = wanted["account"]
    return requests
