"""Seconds to plan the DAG and to re-run it when nothing changed (goal: a no-op re-run ≤ 10 s).

Runs the smoke config to completion in a temporary folder, then times a no-op re-run and a dry
run of the default config (both without importing torch while the DAG is built).

    python benchmarks/dag_noop.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
GOAL_SECONDS = 10.0


def timed(*args: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), *args], cwd=cwd, check=True, capture_output=True
    )
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        smoke = (
            "--cores",
            "2",
            "--configfile",
            str(REPO / "config/smoke.yaml"),
            "--config",
            f"results_dir={work}/results",
            f"figures_dir={work}/figures",
        )
        full = timed(*smoke, cwd=work)
        noop = [timed(*smoke, cwd=work) for _ in range(3)]
        dry = [timed("-n", "--cores", "8", "--resources", "gpu=2", cwd=REPO) for _ in range(2)]
    print(f"{'what':<40} {'seconds':>8} {'goal':>6}")
    print(f"{'smoke DAG, first run':<40} {full:8.1f} {'':>6}")
    print(
        f"{'smoke DAG, no-op re-run (best of 3)':<40} {min(noop):8.1f} {GOAL_SECONDS:6.0f} "
        f"{'ok' if min(noop) <= GOAL_SECONDS else 'MISSED'}"
    )
    print(
        f"{'default config, dry run (cached check)':<40} {min(dry):8.1f} {GOAL_SECONDS:6.0f} "
        f"{'ok' if min(dry) <= GOAL_SECONDS else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
