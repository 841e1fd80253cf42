"""The GPU check script end to end on the CPU (``--cpu-dry``): every row of its one table is there,
no part failed, the DAG pass audited and certified in strict float32. Timings are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_cpu_dry_prints_every_row(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
        import linf_dist_layer
    finally:  # gpu_check puts its folder on the path too
        while str(SCRIPT.parent) in sys.path:
            sys.path.remove(str(SCRIPT.parent))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry", "--keep", str(tmp_path / "dag")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.rindex("\npart   item") :].splitlines()[3:]  # the table printed last
    rows = [line for line in table if line.startswith(("layer ", "epoch ", "dag "))]
    printed = {(line.split()[0], line[7:41].strip()) for line in rows}  # (part, item) columns
    expected = (
        {("layer", "nn.Linear (TF32 off)")}
        | {("layer", f"p={p:g} {impl}") for p in linf_dist_layer.CUDA_PS for impl in ("triton", "chunked")}
        | {("epoch", row[0]) for row in gpu_check.EPOCH_ROWS}
        | {("dag", item) for item in gpu_check.DAG_ROWS}
    )
    assert printed == expected, (sorted(expected - printed), sorted(printed - expected))
    assert "FAILED" not in done.stdout
    audit = next(line for line in rows if line[7:41].strip() == "dag audit")
    assert "audit passed" in audit
    assert (tmp_path / "dag" / "results" / "audit.ok").exists()
    # every job records its peak memory (CUDA: max_memory_allocated of its device; CPU: peak RSS)
    from certbench.storage import read_json

    run_dir = next((tmp_path / "dag" / "results" / "digits").glob("*/*/seed0"))
    assert read_json(run_dir / "train.json")["cost"]["peak_memory_mb"] > 0
    assert read_json(run_dir / "certify.json")["peak_memory_mb"] > 0
    assert read_json(run_dir / "attack.json")["peak_memory_mb"] > 0
    # the published figures stand beside the paper rows that have one
    linf = next(line for line in rows if line[7:41].strip() == "linf-dist cifar10")
    assert "19.7" in linf.split()
    assert "certify.json precision: tf32 False" in done.stdout
