"""The command line: --version, `python -m certbench`, help on every option, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import certbench
from certbench import cli
from certbench.storage import write_json

REPO = Path(__file__).resolve().parents[1]


def certbench_command(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "certbench", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def one_line_error(capsys: pytest.CaptureFixture, code: int, start: str = "certbench: ") -> str:
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in err
    return lines[0]


def test_python_dash_m_and_version() -> None:
    result = certbench_command("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"certbench {metadata.version('certbench')}"
    helped = certbench_command("--help")
    assert helped.returncode == 0
    for command in (
        "train",
        "certify",
        "attack",
        "audit",
        "collect",
        "tables",
        "figures",
        "check-config",
        "run",
        *cli.WORKFLOW_STEPS,
    ):
        assert command in helped.stdout


def test_version_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == certbench.__version__


def test_every_option_of_every_subcommand_has_help() -> None:
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {choice.dest for choice in subparsers._choices_actions} == set(subparsers.choices)
    for choice in subparsers._choices_actions:
        assert choice.help, choice.dest
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


@pytest.mark.parametrize("command", ["certify", "attack"])
def test_missing_run_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    run_config = tmp_path / "run.json"
    write_json(run_config, {})
    out = ["--out", str(tmp_path / "o")]
    code = cli.main([command, "--run-config", str(run_config), "--run-dir", "/nonexistent", *out])
    assert one_line_error(capsys, code) == "certbench: --run-dir /nonexistent: no such directory"
    code = cli.main([command, "--run-config", str(run_config), "--run-dir", str(tmp_path), *out])
    assert "no train.json in it" in one_line_error(capsys, code)
    code = cli.main([command, "--run-config", str(tmp_path / "nope.json"), "--run-dir", str(tmp_path), *out])
    assert one_line_error(capsys, code) == f"certbench: --run-config {tmp_path / 'nope.json'}: no such file"


def test_certify_run_dir_nonexistent_from_the_shell(tmp_path: Path) -> None:
    """The issue's example, as a person types it: no traceback about a missing hash file."""
    write_json(tmp_path / "run.json", {})
    result = certbench_command(
        "certify",
        "--run-config",
        str(tmp_path / "run.json"),
        "--run-dir",
        "/nonexistent",
        "--out",
        str(tmp_path / "certify.json"),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "certbench: --run-dir /nonexistent: no such directory"


def test_a_file_without_its_hash_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run.json").write_text("{}")  # no run.json.sha256 beside it
    code = cli.main(["train", "--run-config", str(tmp_path / "run.json"), "--out-dir", str(tmp_path / "out")])
    assert "no hash file run.json.sha256" in one_line_error(capsys, code)


def test_check_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["check-config", str(tmp_path / "nope.yaml")])
    assert one_line_error(capsys, code) == f"certbench: config error: {tmp_path / 'nope.yaml'}: no such file"
    (tmp_path / "bad.yaml").write_text("seeds: [0\n")
    code = cli.main(["check-config", str(tmp_path / "bad.yaml")])
    assert "not valid YAML (line " in one_line_error(capsys, code, "certbench: config error: ")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code = cli.main(["check-config", str(tmp_path / "list.yaml")])
    assert "must be a mapping" in one_line_error(capsys, code)
    code = cli.main(["check-config", str(REPO / "config/smoke.yaml"), "--config", "training.epochs=0"])
    assert (
        one_line_error(capsys, code)
        == "certbench: config error: training.epochs: 0 is less than the minimum of 1"
    )
    code = cli.main(["check-config", str(REPO / "config/smoke.yaml"), "--config", "training..epochs=1"])
    assert one_line_error(capsys, code).startswith(
        "certbench: config error: --config training..epochs=1: expected"
    )


def test_check_config_nope_from_the_shell() -> None:
    result = certbench_command("check-config", "nope.yaml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "certbench: config error: nope.yaml: no such file"


def test_check_config_accepts_typed_dotted_overrides(capsys: pytest.CaptureFixture) -> None:
    code = cli.main(
        ["check-config", str(REPO / "config/smoke.yaml"), "--config", "training.epochs=3", "seeds=[0, 1]"]
    )
    assert code == 0 and capsys.readouterr().out.strip().endswith("smoke.yaml: valid")


def test_audit_over_no_records_fails_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["audit", "--out", str(tmp_path / "audit.csv")])
    assert "audit: no records given" in one_line_error(capsys, code)
    assert code == 2 and not (tmp_path / "audit.csv").exists()
    code = cli.main(
        ["audit", "--out", str(tmp_path / "audit.csv"), str(tmp_path / "missing" / "record.json")]
    )
    assert "record.json: no such file" in one_line_error(capsys, code)


def test_audit_of_runs_that_all_diverged_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A DAG whose every run diverged goes on (the tables show it), but the audit says it checked nothing."""
    run = tmp_path / "run"
    write_json(run / "record.json", {"status": "diverged"})
    code = cli.main(["audit", "--out", str(tmp_path / "audit.csv"), str(run)])  # a run directory works too
    assert code == 0
    assert "nothing to audit in 1 record(s)" in capsys.readouterr().err
    assert (tmp_path / "audit.csv").read_text().startswith("dataset,")


def test_tables_and_figures_name_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(
        [
            "tables",
            "--summary",
            str(tmp_path / "s.csv"),
            "--audit",
            str(tmp_path / "a.csv"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert one_line_error(capsys, code) == f"certbench: --summary {tmp_path / 's.csv'}: no such file"
    code = cli.main(
        [
            "figures",
            "--summary",
            str(tmp_path),
            "--radii",
            str(tmp_path / "r.csv"),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert one_line_error(capsys, code) == f"certbench: --summary {tmp_path}: not a file"


def test_run_checks_configfiles_before_snakemake(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["run", "-n", "--configfile", "config/nope.yaml"])
    assert one_line_error(capsys, code) == "certbench: config error: config/nope.yaml: no such file"
    code = cli.main(["run", "-n", f"--configfile={tmp_path / 'nope.yaml'}"])
    assert one_line_error(capsys, code).endswith("nope.yaml: no such file")


def test_run_nests_dotted_config_keys() -> None:
    args = cli.snakemake_args(
        [
            "--cores",
            "2",
            "--configfile",
            str(REPO / "config/smoke.yaml"),
            "--config",
            "training.epochs=3",
            "seeds=[0]",
            "training.lr_schedule.type=step",
            "-n",
        ]
    )
    assert args[:4] == ["--cores", "2", "--configfile", str(REPO / "config/smoke.yaml")]
    assert args[4:] == [
        "--config",
        'training={"epochs": "3"}',
        "seeds=[0]",
        'training={"lr_schedule": {"type": "step"}}',
        "-n",
    ]
    assert json.loads(args[5].partition("=")[2]) == {"epochs": "3"}


def test_figures_takes_the_history_and_the_published_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`certbench figures` passes --history and --published on (training curves, ours vs published)
    and the optional figures of --extra, and names a missing file."""
    import certbench.figures

    calls = []
    monkeypatch.setattr(certbench.figures, "write_figures", lambda *args: calls.append(args))
    for name in ("summary", "radii", "history", "published"):
        (tmp_path / f"{name}.csv").write_text("dataset\n")
    inputs = ["--summary", str(tmp_path / "summary.csv"), "--radii", str(tmp_path / "radii.csv")]
    out = ["--out-dir", str(tmp_path / "figures")]
    assert (
        cli.main(
            [
                "figures",
                *inputs,
                "--history",
                str(tmp_path / "history.csv"),
                "--published",
                str(tmp_path / "published.csv"),
                "--extra",
                "lipsdp_tradeoff",
                *out,
            ]
        )
        == 0
    )
    assert cli.main(["figures", *inputs, *out]) == 0
    assert calls == [
        (
            tmp_path / "summary.csv",
            tmp_path / "radii.csv",
            tmp_path / "figures",
            tmp_path / "history.csv",
            tmp_path / "published.csv",
            ["lipsdp_tradeoff"],
        ),
        (tmp_path / "summary.csv", tmp_path / "radii.csv", tmp_path / "figures", None, None, []),
    ]
    code = cli.main(["figures", *inputs, "--history", str(tmp_path / "nope.csv"), *out])
    assert one_line_error(capsys, code) == f"certbench: --history {tmp_path / 'nope.csv'}: no such file"
    code = cli.main(["figures", *inputs, "--published", str(tmp_path / "nope.csv"), *out])
    assert one_line_error(capsys, code) == f"certbench: --published {tmp_path / 'nope.csv'}: no such file"
    assert len(calls) == 2


def test_run_config_writes_the_resolved_config_with_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from certbench.storage import read_json

    resolved = {"run": {"dataset": "digits", "seed": 0}, "training": {"lr": 0.001}, "note": "it's"}
    out = ["--out", str(tmp_path / "run.json")]
    assert cli.main(["run-config", "--resolved", json.dumps(resolved), *out]) == 0
    assert read_json(tmp_path / "run.json") == resolved
    with pytest.raises(SystemExit) as exited:
        cli.main(["run-config", "--resolved", "{'run': 0}", "--out", str(tmp_path / "bad.json")])
    assert exited.value.code == 2 and "--resolved: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_config_snapshot_is_the_validated_config_in_its_order(tmp_path: Path) -> None:
    import yaml

    from certbench import config as cfg

    config = cfg.validate(cfg.read_config_file(REPO / "config" / "smoke.yaml"))
    out = ["--out", str(tmp_path / "config.yaml")]
    assert cli.main(["config-snapshot", "--config", json.dumps(config), *out]) == 0
    snapshot = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert snapshot == config and list(snapshot) == list(config)


def test_published_writes_the_published_table(tmp_path: Path) -> None:
    from certbench.tables import published_table

    experiments = [
        {"name": "lmt", "arch": "mlp", "published": {"digits": {"clean": 90.0, "certified:l2@0.5": 41.5}}},
        {"name": "standard", "arch": "mlp"},
    ]
    out = tmp_path / "published.csv"
    assert cli.main(["published", "--experiments", json.dumps(experiments), "--out", str(out)]) == 0
    assert out.read_text() == published_table(experiments).to_csv(index=False)


@pytest.mark.parametrize("message", [None, "certificate soundness audit FAILED:\ndigits/lmt/mlp/seed0: …"])
def test_audit_check_writes_its_file_only_when_the_audit_found_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, message: str | None
) -> None:
    """A verdict (the audit's message) fails the step with exit status 1 and goes to stdout, which
    Snakemake shows, so a failed DAG names what failed; no verdict writes the file the DAG waits for."""
    import certbench.audit

    calls = []
    monkeypatch.setattr(certbench.audit, "verdict", lambda path: calls.append(path) or message)
    audit, ok = tmp_path / "audit.csv", tmp_path / "audit.ok"
    audit.write_text("dataset\n")
    code = cli.main(["audit-check", "--audit", str(audit), "--out", str(ok)])
    assert calls == [audit]
    if message is None:
        assert code == 0 and ok.read_text() == "no violations\n"
    else:
        assert code == 1 and capsys.readouterr().out == message + "\n" and not ok.exists()
    code = cli.main(["audit-check", "--audit", str(tmp_path / "nope.csv"), "--out", str(ok)])
    assert one_line_error(capsys, code) == f"certbench: --audit {tmp_path / 'nope.csv'}: no such file"


@pytest.mark.parametrize(
    ("command", "module", "function", "argv", "inputs", "call"),
    [
        (
            "record",
            "certbench.collect",
            "assemble",
            [
                "--run-config",
                "run.json",
                "--train",
                "train.json",
                "--certify",
                "certify.json",
                "--attack",
                "attack.json",
                "--out",
                "record.json",
                "--samples",
                "samples.csv",
            ],
            ["run.json", "train.json", "certify.json", "attack.json"],
            ("run.json", "train.json", "certify.json", "attack.json", "record.json", "samples.csv"),
        ),
        (
            "history",
            "certbench.collect",
            "history",
            ["--out", "history.csv", "a.json", "b.json"],
            ["a.json", "b.json"],
            (["a.json", "b.json"], "history.csv"),
        ),
        (
            "front-page",
            "certbench.frontpage",
            "write_front_page",
            [
                "--overview",
                "workflow.rst",
                "--summary",
                "summary.csv",
                "--audit",
                "audit.csv",
                "--out",
                "front.rst",
            ],
            ["workflow.rst", "summary.csv", "audit.csv"],
            ("workflow.rst", "summary.csv", "audit.csv", "front.rst"),
        ),
    ],
)
def test_workflow_steps_make_one_library_call(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    module: str,
    function: str,
    argv: list[str],
    inputs: list[str],
    call: tuple,
) -> None:
    """The subcommands of the DAG's bookkeeping rules pass their paths on, in order, to one library
    function, and name a missing input in one line before calling it."""
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda *args: calls.append(args))
    monkeypatch.chdir(tmp_path)
    for name in inputs:
        Path(name).write_text("{}")
    assert cli.main([command, *argv]) == 0
    assert calls == [tuple([Path(n) for n in arg] if isinstance(arg, list) else Path(arg) for arg in call)]
    Path(inputs[0]).unlink()
    assert one_line_error(capsys, cli.main([command, *argv])).endswith(f"{inputs[0]}: no such file")
    assert len(calls) == 1
