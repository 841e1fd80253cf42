"""The Snakemake DAG: plans, refuses bad config in one line, runs end to end on the smoke config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_building_the_dag_does_not_import_torch() -> None:
    """The modules the Snakefile imports, and those of the CLI's bookkeeping steps (record, audit,
    collect, tables, …), stay free of torch: fast dry runs and fast local jobs."""
    code = (
        "import sys; import certbench.config, certbench.storage, certbench.outputs, certbench.collect, "
        "certbench.audit, certbench.tables, certbench.frontpage, certbench.cli; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# The one lint the workflow does not follow, on purpose: every job runs in the project's one
# environment (scripts/install.sh or environment.yml, then auto-LiRPA installed with --no-deps,
# which a per-rule conda environment cannot express), not in a per-rule conda env or container.
ONE_ENVIRONMENT = "Specify a conda environment or container for each rule."


def test_snakemake_lint_finds_nothing_else(tmp_path: Path) -> None:
    """`snakemake --lint` (a parse, no jobs) on the default config: no finding about a Snakefile
    (paths, '+'), and none about a rule but the per-rule environment. Snakemake 9.27 prints the
    findings as text whatever --lint's format argument, one `    * <title>:` line each."""
    result = snakemake(
        "--lint", "--config", f"results_dir={tmp_path}/results", f"figures_dir={tmp_path}/figures"
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Error" not in output, output[-2000:]
    assert "Lints for snakefile" not in output, output[-3000:]
    titles = re.findall(r"^    \* (.+):$", output, flags=re.MULTILINE)
    assert set(titles) <= {ONE_ENVIRONMENT}, output[-3000:]
    assert len(titles) == output.count("Lints for rule ")  # every finding was read
    assert result.returncode == (1 if titles else 0)


def test_every_rule_runs_a_certbench_command_and_logs_its_stderr() -> None:
    """No `run:` block: each job is a `certbench` subcommand a person can run by hand, its stderr in
    the rule's log."""
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    rules = "\n".join(path.read_text() for path in files)
    assert not re.search(r"^\s+run:", rules, flags=re.MULTILINE)
    commands = re.findall(r"^\s+shell:\n((?:\s+\".*\"\n)+)", rules, flags=re.MULTILINE)
    assert len(commands) == len(re.findall(r"^rule \w+:", rules, flags=re.MULTILINE)) - 1  # all: runs nothing
    for command in commands:
        text = "".join(line.strip().strip('"') for line in command.splitlines())
        assert text.startswith("python -m certbench ") and text.endswith(" 2> {log:q}"), text


def test_default_dag_plans_with_gpu_resources(tmp_path: Path) -> None:
    # Into an empty results_dir: the plan is the whole DAG whatever `make run` left in results/.
    result = snakemake(
        "-n",
        "--cores",
        "8",
        "--resources",
        "gpu=2",
        "--config",
        f"results_dir={tmp_path}/results",
        f"figures_dir={tmp_path}/figures",
    )
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "audit_check" in result.stdout


def test_cuda_device_makes_jobs_request_a_gpu(tmp_path: Path) -> None:
    result = snakemake(
        "-n",
        "--cores",
        "8",
        "--resources",
        "gpu=2",
        "--configfile",
        str(REPO / "config/smoke.yaml"),
        "--config",
        "device=cuda",
        f"results_dir={tmp_path}/results",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    train_job = result.stdout.split("rule train:")[1].split("\n\n")[0]
    assert "gpu=1" in train_job


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training={'epochs': 0}", "certbench: config error: training.epochs: "),
        (
            "datasets={'imagenet': {}}",
            "certbench: config error: datasets.imagenet: unknown data set; allowed:",
        ),
        (
            "experiments=[{'method': 'nope', 'arch': 'mlp'}]",
            "certbench: config error: method: unknown method 'nope'",
        ),
    ],
)
def test_bad_config_fails_fast_with_one_line(tmp_path: Path, override: str, message: str) -> None:
    result = snakemake(
        "-n",
        "--cores",
        "1",
        "--configfile",
        str(REPO / "config/smoke.yaml"),
        "--config",
        override,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "config error" in line]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_smoke_dag_end_to_end(tmp_path: Path) -> None:
    args = (
        "--cores",
        "2",
        "--resources",
        "gpu=0",
        "--configfile",
        str(REPO / "config/smoke.yaml"),
        "--config",
        f"results_dir={tmp_path}/results",
        f"figures_dir={tmp_path}/figures",
    )
    result = snakemake(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "results"
    from certbench.collect import read_samples, read_summary, select

    summary = read_summary(results / "summary.csv")  # tidy: one row per run and metric
    clean = select(summary, "clean_accuracy")
    assert clean["status"].tolist() == ["ok"] and 0 <= clean["value"].iloc[0] <= 1
    from certbench.outputs import FIGURE_NAMES, TABLE_NAMES

    for table in TABLE_NAMES:
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in FIGURE_NAMES:
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 1000
    assert (results / "audit.ok").exists()
    run = results / "digits/standard/mlp/seed0"
    samples = read_samples(run / "samples.csv")  # tidy: one row per test point, evaluation and ε
    assert (samples["kind"] == "clean").sum() == 48
    assert {"index", "label", "prediction", "margin", "kind", "evaluation", "norm", "eps"} <= set(samples)
    deepfool = samples[(samples["evaluation"] == "deepfool-l2") & (samples["norm"] == "l2")]
    assert len(deepfool) == 48 and deepfool["eps"].isna().all()  # a minimum-norm attack: no ε
    again = snakemake(*args, cwd=tmp_path)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    report = snakemake(*args, "--report", str(tmp_path / "report.html"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "radius_vs_error_l2.png" in html and "audit.csv" in html and "config.yaml" in html
    shutil.rmtree(results)


@pytest.mark.parametrize(
    "path", sorted((REPO / "config").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_paper_and_cpu_configs_dry_run_to_the_expected_jobs(tmp_path: Path, path: Path) -> None:
    import re

    import yaml

    from certbench import config as cfg
    from certbench.catalogue import check_config

    expected = len(cfg.runs(check_config(yaml.safe_load(path.read_text()))))
    result = snakemake(
        "-n",
        "--cores",
        "8",
        "--resources",
        "gpu=2",
        "--configfile",
        str(path),
        "--config",
        f"results_dir={tmp_path}/results",
        f"figures_dir={tmp_path}/figures",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    for rule in ("run_config", "train", "certify", "attack", "record"):
        assert int(counts[rule]) == expected, (rule, counts)
    assert int(counts["audit"]) == int(counts["tables"]) == 1
    for figure in yaml.safe_load(path.read_text()).get("extra_figures", []):  # drawn by the figures rule
        assert f"{tmp_path}/figures/{figure}.png" in result.stdout, figure


@pytest.mark.parametrize(
    ("overrides", "requests", "gpus"),
    [
        (
            ["resources={gpus_per_job: 1, partition: cpu, gpu_partition: gpu, account: lab}"],
            "gpu=1, slurm_partition=gpu, slurm_account=lab",
            1,
        ),
        (["device=cuda"], "gpu=1", 1),
        (["device=cpu", "resources={partition: cpu, gpu_partition: gpu}"], "gpu=0, slurm_partition=cpu", 0),
    ],
)
def test_slurm_profile_asks_for_what_the_config_decides(
    tmp_path: Path, overrides: list[str], requests: str, gpus: int
) -> None:
    """The profile forces no GPU: `resources.gpus_per_job` (unset: from `device`) decides the `gpu`
    request and the partition (tests/test_slurm_cluster.py submits them to a real cluster)."""
    result = snakemake(
        "-n",
        "--profile",
        str(REPO / "workflow/profiles/slurm"),
        "--configfile",
        str(REPO / "config/smoke.yaml"),
        "--config",
        f"results_dir={tmp_path}/results",
        *overrides,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    train_job = result.stdout.split("rule train:")[1].split("rule ")[0]
    resources = next(line for line in train_job.splitlines() if line.strip().startswith("resources:"))
    assert resources.endswith(f"runtime=240, {requests}"), resources
    assert f"--gpus {gpus} " in train_job
