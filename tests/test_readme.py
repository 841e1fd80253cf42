"""Every shell command in the README, taken from its ```bash blocks, is exercised here.

The commands run in a sandbox: a copy of the workflow (Snakefile, workflow/, config/, Makefile,
scripts/) with `.venv` pointing at this interpreter's environment, so nothing depends on, or
touches, the results of the user's own runs. `snakemake` and `certbench run` commands run as dry
runs (`-n`), `make TARGET` through `make -n TARGET` and then each recipe line the same way, other
`certbench` commands for real. A command that cannot run dry is mapped in COVERED_ELSEWHERE to the
test that runs it; a command no rule handles fails the test, so README and tests cannot drift.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
VENV = Path(sys.prefix)

#: Commands that cannot run dry (they need finished results), by a word they contain, and the test
#: that runs them for real (it must contain that word too).
COVERED_ELSEWHERE = {
    "--report": "tests/test_workflow.py::test_smoke_dag_end_to_end",
}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def readme_commands() -> list[str]:
    """Each command of the README's ```bash blocks (continuation lines joined, comments kept)."""
    commands = []
    for block in fenced_blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def words_of(command: str) -> list[str]:
    return shlex.split(command, comments=True)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    for name in ("Snakefile", "Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    for name in ("workflow", "config", "scripts"):
        shutil.copytree(REPO / name, root / name)
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    # The registry checks' cache (keyed by config and source, written atomically): one for the
    # session's workers, seeded with the checks already made in the checkout.
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "registry-cache"
    shared.mkdir(exist_ok=True)
    seed = REPO / ".snakemake" / "certbench"
    for path in seed.glob("config-*.json") if seed.is_dir() else []:
        if not (shared / path.name).exists():
            tmp = shared / f"{path.name}.{os.getpid()}.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, shared / path.name)
    (root / ".snakemake").mkdir()
    (root / ".snakemake" / "certbench").symlink_to(shared, target_is_directory=True)
    return root


def run(words: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


_PLANNED: dict[tuple[Path, tuple[str, ...]], dict[str, int]] = {}


def dry_run(words: tuple[str, ...], sandbox: Path) -> dict[str, int]:
    """Jobs per rule that a dry run plans; it must plan the whole DAG (the sandbox has no results).
    The same argument list is planned once (`snakemake -n …` and `snakemake … ` + `-n` are one)."""
    key = (sandbox, tuple(w for w in words if w not in ("-n", "--dry-run")))
    if key not in _PLANNED:
        result = run(list(words), sandbox)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        counts = {
            rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE)
        }
        assert counts.get("train", 0) >= 1 and counts.get("audit_check") == 1, result.stdout[-2000:]
        _PLANNED[key] = counts
    return _PLANNED[key]


def exercise(command: str, sandbox: Path) -> None:
    """Run ``command`` as the README means it, dry where the real thing is long."""
    words = words_of(command)
    for operator in ("&&", "||", ";"):  # `a && b` (a make recipe, say): each part on its own
        if operator in words:
            at = words.index(operator)
            exercise(shlex.join(words[:at]), sandbox)
            exercise(shlex.join(words[at + 1 :]), sandbox)
            return
    for word, test in COVERED_ELSEWHERE.items():
        if word in words:
            path, _, name = test.partition("::")
            source = (REPO / path).read_text()
            functions = [
                node
                for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.FunctionDef) and node.name == name
            ]
            assert functions, f"{test}, which should run {command!r}, is gone"
            assert word in ast.get_source_segment(source, functions[0]), f"{test} no longer runs {word}"
            return
    program = Path(words[0]).name
    if program == "make":
        recipe = run(["make", "-n", *words[1:]], sandbox)
        assert recipe.returncode == 0, recipe.stderr
        lines = [line for line in recipe.stdout.splitlines() if line.strip() and not line.startswith("make")]
        assert lines or "Nothing to be done" in recipe.stdout, recipe.stdout
        for line in lines:
            exercise(line, sandbox)
    elif program == "source":
        if not (sandbox / words[1]).is_file():
            pytest.skip(f"the tests run outside a virtualenv ({VENV} has no {Path(words[1]).name})")
        found = run(["bash", "-c", f"{shlex.join(words)} && command -v snakemake certbench"], sandbox)
        assert found.returncode == 0, found.stderr
        assert len(found.stdout.split()) == 2
    elif program == "snakemake":
        dry_run((words[0], "-n", *words[1:]), sandbox)
    elif program == "certbench" and words[1] == "run":
        dry_run((words[0], "run", "-n", *words[2:]), sandbox)
    elif program == "certbench":
        result = run(words, sandbox)
        assert result.returncode == 0, result.stderr
    elif program.startswith("python") and words[1:3] == ["-m", "pytest"]:
        # `make test` itself: the options parse (pytest-xdist present); the suite is what runs this file.
        result = run([*words, "--help", "-p", "no:cacheprovider"], sandbox)
        assert result.returncode == 0, result.stderr[-2000:]
    elif program in ("ruff", "snakefmt"):  # `make test`'s lint and format checks: read-only, seconds
        assert "--fix" not in words and (words[1] == "check" or "--check" in words), command
        result = run([program, *words[1:]], REPO)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    elif program == "bash" and words[1].endswith(".sh"):  # `make install`'s script: it parses
        result = run(["bash", "-n", words[1]], sandbox)
        assert result.returncode == 0, result.stderr
    else:
        pytest.fail(f"no rule exercises the README command {command!r}; add one to tests/test_readme.py")


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(words_of(c))[:60])
def test_readme_command(command: str, sandbox: Path) -> None:
    before = sorted(p.name for p in sandbox.iterdir())
    exercise(command, sandbox)
    # dry runs leave no results behind (the sandbox is shared by the commands of this module)
    assert not any(
        name.startswith(("results", "figures"))
        for name in sorted(p.name for p in sandbox.iterdir())
        if name not in before
    )


def test_the_readme_has_its_commands() -> None:
    commands = readme_commands()
    assert {"make run", "make test"} <= {" ".join(words_of(c)) for c in commands}
    assert any(words_of(c)[0] == "snakemake" for c in commands)
    assert any(words_of(c)[:2] == ["certbench", "run"] for c in commands)
    for word in COVERED_ELSEWHERE:
        assert any(word in words_of(c) for c in commands), f"no README command has {word}: drop its mapping"


def test_the_quoted_config_error_is_what_the_cli_prints(sandbox: Path) -> None:
    quoted = [
        block.strip() for block in fenced_blocks(README, "") if block.startswith("certbench: config error:")
    ]
    assert len(quoted) == 1
    match = re.fullmatch(r"certbench: config error: ([\w.]+): (-?\d+) is less than .*", quoted[0])
    assert match, quoted[0]
    key, value = match.groups()
    result = run(["certbench", "check-config", "config/config.yaml", "--config", f"{key}={value}"], sandbox)
    assert result.returncode == 2 and result.stderr.strip() == quoted[0]


# --- the --config forms the README states, end to end: the values reach the runs' resolved config


def test_config_values_are_typed_nested_and_dotted(sandbox: Path, tmp_path: Path) -> None:
    """`seeds=[1]` (a list Snakemake leaves as text), `training={lr: 1e-3}` (merged into the config
    file's training section) and `training.batch_size=32` (a dotted key, via certbench run)."""
    results = tmp_path / "results-1"
    result = run(
        [
            "certbench",
            "run",
            "--cores",
            "1",
            "--configfile",
            "config/smoke.yaml",
            "--until",
            "run_config",
            "--config",
            "seeds=[1]",
            f"results_dir={results}",
            "training={lr: 1e-3}",
            "training.batch_size=32",
            "training.lr_schedule.type=step",
            "training.lr_schedule.milestones=[2]",
            "resources={partition: null}",
        ],
        sandbox,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(path.read_text()) for path in sorted(results.rglob("run.json"))]
    assert [r["run"]["seed"] for r in runs] == [1]
    for resolved in runs:
        training = resolved["training"]
        assert training["lr"] == 0.001 and training["batch_size"] == 32
        assert training["epochs"] == 2  # smoke.yaml's value: the mapping was merged, not replaced
        assert training["lr_schedule"] == {"type": "step", "milestones": [2], "gamma": 0.1, "start_epoch": 0}
    assert not (results / "config.yaml").exists()  # --until run_config: nothing else ran


def test_a_missing_configfile_is_one_line_through_certbench_run(sandbox: Path) -> None:
    missing = run(["certbench", "run", "-n", "--configfile", "config/nope.yaml"], sandbox)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == "certbench: config error: config/nope.yaml: no such file"


def test_config_values_read_as_yaml_except_where_the_schema_wants_text() -> None:
    from certbench.config import parse_overrides, type_overrides

    # what Snakemake hands over for seeds=[0,1] results_dir=001 'training={lr: 1e-3, grad_clip: null}' …
    given = {
        "seeds": ["0", "1"],
        "results_dir": "001",
        "training": {"lr": "1e-3", "grad_clip": "null"},
        "resources": {"partition": "null", "gpu_partition": "gpu"},
        "experiments": [
            {"method": "lmt", "arch": "mlp", "name": "001", "params": {"c": "0.5", "loss": "v2"}}
        ],
    }
    assert type_overrides({"seeds": ["0", "1"], "device": "cpu"}, given) == {
        "seeds": [0, 1],
        "device": "cpu",
        "results_dir": "001",
        "training": {"lr": 0.001, "grad_clip": None},
        "resources": {"partition": None, "gpu_partition": "gpu"},
        "experiments": [{"method": "lmt", "arch": "mlp", "name": "001", "params": {"c": 0.5, "loss": "v2"}}],
    }
    assert parse_overrides(
        ["training.epochs=3", "results_dir=001", "data.download=true", "training.lr=1e-3"]
    ) == {"training": {"epochs": 3, "lr": 0.001}, "results_dir": "001", "data": {"download": True}}
