"""The SLURM profile on a real one-node SLURM cluster, brought up from Debian's packages.

A dry run cannot see what a cluster refuses (a GPU request where there is no GPU), where jobs go
(the partition) or whether Snakemake ever learns that a job ended (job accounting). This test
installs ``slurm-wlm`` (slurmctld, slurmd, the client commands), ``munge``, ``slurmdbd`` and
``mariadb-server`` when they are missing, starts every daemon itself in the foreground with all
its state in a temporary directory and on free ports, and runs the README's cluster lines
through ``workflow/profiles/slurm`` on two clusters in turn, one after the other:

1. a GPU cluster with job accounting (slurmdbd on MariaDB; one fake GPU, a GRES backed by a
   character device): the README's GPU line; ``sacct`` shows every job, the GPU jobs with a GPU;
2. a CPU-only cluster without accounting (slurmctld restarted without slurmdbd and without the
   GPU), submitted to from a host whose ``nvidia-smi`` lists a GPU (a fake one on the PATH): the
   README's no-accounting line; ``squeue`` shows every job. Its train job is killed
   with ``scancel`` after its first epoch checkpoint: Snakemake submits it again (the profile's
   ``retries``) and training resumes from the checkpoint.

Each run checks the outputs and the audit. The daemons it started, and only those, are stopped
by pid when it ends, passed or failed. One test function, so that pytest-xdist runs it in one
worker: it brings up one cluster at a time. It needs root and apt-get; elsewhere it is skipped.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from repo_copy import REPO, copy_of_the_repository

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm-cluster")]

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
COMMANDS = [
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "srun",
    "squeue",
    "sacct",
    "sacctmgr",
    "scancel",
    "scontrol",
    "sinfo",
    "munged",
    "mungekey",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
    "mariadb-admin",
]
BIN = Path(sys.executable).parent  # snakemake and the jobs' python: this environment's
DAG_SECONDS = 420  # one DAG through the cluster takes 1–2 minutes; `timeout -k` stops a hung one
INIT_STATUS_CHECK = "--slurm-init-seconds-before-status-checks=5"  # the plugin's default is 40 s
RUN_DIR = Path("results/digits/standard/mlp/seed0")
RESUME_EPOCHS = 400  # a few seconds of training: time to kill it between two epochs


def readme_cluster_lines() -> dict[str, str]:
    """The README's SLURM lines, keyed by their comment: what a user types."""
    block = (REPO / "README.md").read_text().split("### GPU box, cluster, report")[1].split("```")[1]
    lines = {}
    for line in block.splitlines():
        command, _, comment = line.partition("  # ")
        if "workflow/profiles/slurm" in command:
            lines[comment.strip()] = command.strip()
    return lines


def _run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def install_or_skip() -> float:
    """Install the packages when a command is missing; the seconds it took."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs Debian's SLURM packages and starts SLURM's daemons")
    started = time.monotonic()
    if all(shutil.which(command) for command in COMMANDS):
        return 0.0
    if not shutil.which("apt-get"):
        pytest.skip("needs apt-get to install " + " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120"]  # waits for another apt, a while
    install = [*apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    # Installing must not start the packages' own services: a policy-rc.d that refuses them,
    # for the install only, where the machine has none.
    policy = Path("/usr/sbin/policy-rc.d")
    placed = not policy.exists()
    if placed:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        result = _run(install, env, timeout=600)
        if result.returncode != 0:  # a stale package list: update it once, then try again
            _run([*apt, "update"], env, timeout=300)
            result = _run(install, env, timeout=600)
    finally:
        if placed:
            policy.unlink()
    if result.returncode != 0:
        pytest.skip(f"apt-get could not install the SLURM packages: {result.stderr.strip()[-500:]}")
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """SLURM's daemons, each started here in the foreground, each stopped by its own pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.conf.parent.mkdir(mode=0o700)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.munge_socket = root / "munge" / "munge.socket"
        self.ports = {name: free_port() for name in ("slurmctld", "slurmd", "slurmdbd", "mariadb")}
        self.timings: dict[str, float] = {}

    # -- processes ------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], ready, timeout: float = 60) -> None:
        output = (self.root / f"{name}.out").open("ab")
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=self.env)
        output.close()
        self.daemons[name] = process
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up:\n{self.log_tail(name)}")
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        process = self.daemons.pop(name)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)

    def stop_all(self) -> None:
        if "slurmctld" in self.daemons:
            self.cancel_all_jobs()
        for name in reversed(list(self.daemons)):
            self.stop(name)

    def log_tail(self, name: str) -> str:
        texts = [path.read_text(errors="replace")[-2000:] for path in sorted(self.root.glob(f"{name}*.log"))]
        out = self.root / f"{name}.out"
        return "\n".join([*texts, out.read_text(errors="replace")[-2000:] if out.exists() else ""])

    def dag_env(self, *, nvidia_smi: bool = False) -> dict[str, str]:
        """Snakemake's environment: this cluster's, this environment's commands first.

        The cluster job's Snakemake starts the job with ``srun`` after dropping every ``SLURM_*``
        variable, ``SLURM_CONF`` included (snakemake-executor-plugin-slurm-jobstep), so ``srun``
        looks for the configuration where a real cluster has it, ``/etc/slurm``. This one lives in
        a temporary directory: an ``srun`` first on the PATH points the real one at it.
        """
        wrappers = self.root / "bin"
        if not wrappers.exists():
            wrappers.mkdir()
            srun = wrappers / "srun"
            srun.write_text(
                f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.conf))} exec {shutil.which("srun")} "$@"\n'
            )
            srun.chmod(0o755)
        path = [str(BIN), str(wrappers), self.env["PATH"]]
        if nvidia_smi:  # a login node with a GPU: what it has must not change what jobs ask for
            login = self.root / "login-node-gpu"
            login.mkdir(exist_ok=True)
            (login / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: a login node GPU'\n")
            (login / "nvidia-smi").chmod(0o755)
            path.insert(0, str(login))
        return {**self.env, "PATH": os.pathsep.join(path)}

    def slurm(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return _run(list(argv), self.env, timeout=timeout)

    def cancel_all_jobs(self) -> None:
        """Jobs still queued or running (a failed run's) end before the daemons do."""
        self.slurm("scancel", "--user", "root")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queued = self.slurm("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING")
            if queued.returncode != 0 or not queued.stdout.strip():
                return
            time.sleep(0.5)

    # -- munge --------------------------------------------------------------------------
    def start_munge(self) -> None:
        directory = self.munge_socket.parent
        directory.mkdir(mode=0o700)
        key = directory / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30)
        self.start(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={directory / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={directory / 'munged.seed'}",
            ],
            ready=self.munge_socket.exists,
        )

    # -- accounting: MariaDB and slurmdbd -----------------------------------------------------
    def start_accounting(self) -> None:
        data, db_socket = self.root / "mariadb", self.root / "mariadb.sock"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.start(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={db_socket}",
                f"--port={self.ports['mariadb']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--user=root",
                f"--pid-file={self.root / 'mariadbd.pid'}",
                f"--log-error={self.root / 'mariadbd.log'}",
                "--innodb-buffer-pool-size=32M",
            ],
            ready=lambda: _run(["mariadb-admin", "--no-defaults", f"--socket={db_socket}", "ping"]).returncode
            == 0,
            timeout=120,
        )
        sql = (
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'certbench';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={db_socket}", "-e", sql], check=True, timeout=60
        )
        dbd_conf = self.conf.with_name("slurmdbd.conf")
        dbd_conf.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.ports['slurmdbd']}",
                    "SlurmUser=root",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.ports['mariadb']}",
                    "StorageUser=slurm",
                    "StoragePass=certbench",
                    "StorageLoc=slurm_acct_db",
                    f"LogFile={self.root / 'slurmdbd.log'}",
                    f"PidFile={self.root / 'slurmdbd.pid'}",
                    "",
                ]
            )
        )
        dbd_conf.chmod(0o600)  # slurmdbd refuses a readable one: it holds the database password
        self.start(
            "slurmdbd", ["slurmdbd", "-D"], ready=lambda: listening(self.ports["slurmdbd"]), timeout=120
        )

    # -- slurmctld and slurmd -------------------------------------------------------------------
    def write_slurm_conf(self, *, accounting: bool, gpus: int, state: str) -> None:
        cpus = os.cpu_count() or 1
        free_mb = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) // 1024
        memory = max(1000, int(free_mb * 0.9))  # a little under what is free
        gres = ""
        if gpus:
            devices = []
            for index in range(gpus):  # SLURM takes a GPU for a character device: a regular file is refused
                device = self.root / f"fake-gpu{index}"
                if not device.exists():
                    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
                devices.append(str(device))
            self.conf.with_name("gres.conf").write_text(
                f"NodeName={self.host} Name=gpu File={devices[0] if gpus == 1 else ','.join(devices)}\n"
            )
            gres = f" Gres=gpu:{gpus}"
        elif self.conf.with_name("gres.conf").exists():
            self.conf.with_name("gres.conf").unlink()
        spool = self.root / "spool"
        spool.mkdir(exist_ok=True)
        (self.root / state).mkdir(exist_ok=True)
        lines = [
            "ClusterName=certbench",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}",
            f"SlurmdPort={self.ports['slurmd']}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={self.root / state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "MinJobAge=900",  # finished jobs stay visible to squeue for the status checks
            "ReturnToService=2",
            "MailProg=/bin/true",
            "GresTypes=gpu",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory}{gres} State=UNKNOWN",
            "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        if gpus:
            lines.append("PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP")
        if accounting:
            lines += [
                "AccountingStorageType=accounting_storage/slurmdbd",
                f"AccountingStoragePass={self.munge_socket}",  # for slurmdbd: the munge socket to use
                "AccountingStorageHost=localhost",
                f"AccountingStoragePort={self.ports['slurmdbd']}",
                "AccountingStoreFlags=job_comment",  # sacct shows the plugin's comment: the rule
                "AccountingStorageTRES=gres/gpu",  # sacct shows the GPUs a job was given
            ]
        else:
            lines.append("AccountingStorageType=accounting_storage/none")
        self.conf.write_text("\n".join(lines) + "\n")

    def start_slurm(self, *, accounting: bool, gpus: int, state: str) -> None:
        self.write_slurm_conf(accounting=accounting, gpus=gpus, state=state)
        if accounting:
            self.slurm("sacctmgr", "--immediate", "add", "cluster", "certbench")
        self.start(
            "slurmctld",
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            ready=lambda: "UP" in self.slurm("scontrol", "ping").stdout,
        )
        self.start(
            "slurmd",
            ["slurmd", "-D", "-N", self.host, "-f", str(self.conf)],
            ready=lambda: self.slurm("sinfo", "--noheader", "--format=%T").stdout.split()[:1] == ["idle"],
        )

    def restart_without_accounting(self) -> None:
        """The same machine as a CPU-only cluster without slurmdbd: a fresh controller state."""
        self.cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd"):
            self.stop(name)
        self.start_slurm(accounting=False, gpus=0, state="state-no-accounting")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    install_seconds = install_or_skip()
    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)
    cluster = Cluster(root)
    cluster.timings["install"] = install_seconds
    started = time.monotonic()
    try:
        cluster.start_munge()
        cluster.start_accounting()
        cluster.start_slurm(accounting=True, gpus=1, state="state")
        cluster.timings["bring-up"] = time.monotonic() - started
        yield cluster
    finally:
        cluster.stop_all()


def run_line(line: str, cluster: Cluster, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """A README line (snakemake from this environment), with a config file, under `timeout -k`."""
    argv = shlex.split(line)
    assert argv[0] == "snakemake"
    argv = [str(BIN / "snakemake"), *argv[1:], *extra, INIT_STATUS_CHECK]
    return subprocess.run(
        ["timeout", "-k", "30", str(DAG_SECONDS), *argv],
        cwd=cwd,
        env=cluster.dag_env(),
        capture_output=True,
        text=True,
        timeout=DAG_SECONDS + 60,
        check=False,
    )


def check_outputs(workdir: Path) -> None:
    """The DAG's results: a record per run and an audit that every certificate passed."""
    record = json.loads((workdir / RUN_DIR / "record.json").read_text())
    assert record["status"] == "ok" and record["certify"] and record["attack"]
    assert (workdir / "results" / "audit.ok").exists()
    with (workdir / "results" / "audit.csv").open() as handle:
        audit = list(csv.DictReader(handle))
    assert audit and all(row["violations"] == "0" for row in audit), audit
    assert (workdir / "results" / "summary.csv").exists()


def accounted_jobs(cluster: Cluster) -> list[dict[str, str]]:
    fields = ["JobID", "JobName", "Comment", "State", "Partition", "AllocTRES"]
    listing = cluster.slurm(
        "sacct", "--allusers", "--allocations", "--parsable2", "--noheader", f"--format={','.join(fields)}"
    )
    assert listing.returncode == 0, listing.stderr
    return [dict(zip(fields, row.split("|"), strict=True)) for row in listing.stdout.splitlines() if row]


def queued_jobs(cluster: Cluster) -> list[dict[str, str]]:
    listing = cluster.slurm("squeue", "--states=all", "--noheader", "--format=%i|%k|%T|%P")
    assert listing.returncode == 0, listing.stderr
    rows = [row.split("|") for row in listing.stdout.splitlines() if row]
    return [{"JobID": i, "Comment": k, "State": t, "Partition": p} for i, k, t, p in rows]


def kill_training_after_first_checkpoint(cluster: Cluster, workdir: Path, dag: subprocess.Popen) -> str:
    """scancel the train job once its first epoch checkpoint is on disk; its SLURM id."""
    checkpoint = workdir / RUN_DIR / "checkpoint.pt"
    deadline = time.monotonic() + DAG_SECONDS
    while time.monotonic() < deadline and dag.poll() is None:
        running = [
            job
            for job in queued_jobs(cluster)
            if "rule_train" in job["Comment"] and job["State"] == "RUNNING"
        ]
        if running and checkpoint.exists():
            cluster.slurm("scancel", running[0]["JobID"])
            return running[0]["JobID"]
        time.sleep(0.2)
    raise AssertionError("the train job never ran with a checkpoint on disk")


def smoke_config_with(workdir: Path, name: str, **changes: dict) -> str:
    """config/smoke.yaml with some sections changed, as a config file in ``workdir``."""
    config = yaml.safe_load((workdir / "config" / "smoke.yaml").read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    (workdir / "config" / name).write_text(yaml.safe_dump(config))
    return f"config/{name}"


def test_the_slurm_profile_runs_the_dag_on_a_real_cluster(cluster: Cluster, tmp_path: Path) -> None:
    lines = readme_cluster_lines()
    gpu_line, no_accounting_line = lines["SLURM: a GPU cluster"], lines["SLURM without job accounting"]
    timings = cluster.timings

    # 1. a GPU cluster with accounting: the README's GPU line; the partitions in the config file
    gpu_dir = copy_of_the_repository(tmp_path / "gpu")
    config = smoke_config_with(
        gpu_dir, "smoke-partitions.yaml", resources={"partition": "cpu", "gpu_partition": "gpu"}
    )
    started = time.monotonic()
    result = run_line(gpu_line, cluster, gpu_dir, "--configfile", config)
    timings["DAG, GPU cluster with accounting"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:] + cluster.log_tail("slurmctld")
    check_outputs(gpu_dir)
    jobs = accounted_jobs(cluster)
    by_rule = {re.sub(r"_wildcards.*", "", job["Comment"]): job for job in jobs}
    for rule in ("rule_train", "rule_certify", "rule_attack", "rule_audit", "rule_collect"):
        assert by_rule[rule]["State"] == "COMPLETED", (rule, jobs)  # went through sbatch and ended well
    for rule in ("rule_train", "rule_certify", "rule_attack"):  # the config's GPU decision
        assert "gres/gpu=1" in by_rule[rule]["AllocTRES"] and by_rule[rule]["Partition"] == "gpu", by_rule[
            rule
        ]
    assert "gres/gpu" not in by_rule["rule_audit"]["AllocTRES"], by_rule["rule_audit"]
    assert "rule_run_config" not in by_rule  # a local rule: run by Snakemake itself
    train_log = (gpu_dir / "results" / "logs" / RUN_DIR.relative_to("results") / "train.log").read_text()
    assert "using the GPUs assigned by the scheduler: CUDA_VISIBLE_DEVICES=0" in train_log

    # 2. a CPU-only cluster without accounting: the README's line for it; training killed once
    started = time.monotonic()
    cluster.restart_without_accounting()
    timings["restart without accounting"] = time.monotonic() - started
    assert "accounting storage is disabled" in cluster.slurm("sacct").stderr.lower()
    cpu_dir = copy_of_the_repository(tmp_path / "cpu")
    config = smoke_config_with(cpu_dir, "smoke-long.yaml", training={"epochs": RESUME_EPOCHS})
    argv = [
        str(BIN / "snakemake"),
        *shlex.split(no_accounting_line)[1:],
        "--configfile",
        config,
        INIT_STATUS_CHECK,
    ]
    started = time.monotonic()
    with (tmp_path / "cpu.err").open("w") as err:
        dag = subprocess.Popen(
            ["timeout", "-k", "30", str(DAG_SECONDS), *argv],
            cwd=cpu_dir,
            env=cluster.dag_env(nvidia_smi=True),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            killed = kill_training_after_first_checkpoint(cluster, cpu_dir, dag)
            returncode = dag.wait(timeout=DAG_SECONDS + 60)
        finally:
            if dag.poll() is None:  # SIGTERM: `timeout` passes it on, then kills after its 30 s
                dag.terminate()
                try:
                    dag.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    dag.kill()
                    dag.wait()
    timings["DAG, CPU cluster without accounting, scancel"] = time.monotonic() - started
    assert returncode == 0, (tmp_path / "cpu.err").read_text()[-4000:] + cluster.log_tail("slurmctld")
    check_outputs(cpu_dir)
    jobs = queued_jobs(cluster)
    trains = {job["JobID"]: job["State"] for job in jobs if job["Comment"].startswith("rule_train")}
    assert trains.pop(killed) == "CANCELLED", jobs
    assert list(trains.values()) == ["COMPLETED"], jobs  # submitted once more (retries), and it finished
    for rule in ("rule_certify", "rule_attack", "rule_audit"):
        assert [job["State"] for job in jobs if job["Comment"].startswith(rule)] == ["COMPLETED"], (
            rule,
            jobs,
        )
    assert {job["Partition"] for job in jobs} == {"cpu"}, jobs
    # `device: auto` on a cluster asks for no GPU, though Snakemake's host lists one (sbatch would
    # refuse a GPU request here); the job's own Snakemake agrees
    for log in (cpu_dir / ".snakemake" / "slurm_logs" / "rule_train").rglob("*.log"):
        assert " --gpus 0 " in log.read_text(), log
    train_log = (cpu_dir / "results" / "logs" / RUN_DIR.relative_to("results") / "train.log").read_text()
    resumed = re.search(rf"resuming after epoch (\d+) of {RESUME_EPOCHS} from ", train_log)
    assert resumed, train_log[-2000:]
    record = json.loads((cpu_dir / RUN_DIR / "train.json").read_text())
    assert record["resumed_from_epoch"] == int(resumed[1]) > 0
    assert record["epochs_completed"] == RESUME_EPOCHS
    print("timings (s):", json.dumps({name: round(seconds, 1) for name, seconds in timings.items()}))
