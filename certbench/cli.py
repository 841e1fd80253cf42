"""Command-line entry points that the Snakemake rules call (and a person can run by hand).

    certbench train   --run-config run.json --out-dir DIR
    certbench certify --run-config run.json --run-dir DIR --out certify.json
    certbench attack  --run-config run.json --run-dir DIR --out attack.json
    certbench audit   --out results/audit.csv RECORD_OR_RUN_DIR...
    certbench collect --out results/summary.csv --radii results/radii.csv RECORD...
    certbench tables  --summary results/summary.csv --audit results/audit.csv --out-dir results/tables
    certbench figures --summary results/summary.csv --radii results/radii.csv [--history results/history.csv]
                      [--published results/published.csv] --out-dir figures
    certbench check-config CONFIG.yaml [--config KEY=VALUE ...]
    certbench run [SNAKEMAKE OPTIONS ...]
    certbench evaluate --dataset NAME (--onnx FILE | --state-dict FILE --arch ARCH [--arch-params JSON])
                       --out-dir DIR [--name NAME] [--configfile CONFIG.yaml] [--config KEY=VALUE ...]
    certbench export  --out-dir DIR [--timeout SECONDS] RUN_DIR...

and the DAG's bookkeeping steps, one library call each:

    certbench run-config      --resolved JSON --out run.json
    certbench import          --run-config run.json --out-dir DIR   (an external model's model.pt, train.json)
    certbench record          --run-config run.json --train train.json --certify certify.json
                              --attack attack.json --out record.json --samples samples.csv
    certbench audit-check     --audit results/audit.csv --out results/audit.ok
    certbench config-snapshot --config JSON --out results/config.yaml
    certbench published       --experiments JSON --out results/published.csv
    certbench history         --out results/history.csv RECORD...
    certbench front-page      --overview workflow.rst --summary results/summary.csv --audit results/audit.csv
                              --out results/report/front_page.rst

Errors are one line on stderr, starting with "certbench: "; the exit status is 2 for a bad
argument, file or config and 1 when the work itself failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from certbench.outputs import OPTIONAL_FIGURE_NAMES

RUN_HELP = """\
Run the DAG: `snakemake` with the same options. Snakemake reads --configfile and parses --config
before it reads the workflow, so a missing config file or a dotted key ends there in a traceback.
`certbench run` first checks that every --configfile exists and is a YAML mapping (one-line error)
and turns dotted --config keys into nested ones: training.epochs=3 becomes training={"epochs": "3"},
which Snakemake merges key by key. The workflow types every --config value as in a config file.
Example: certbench run --cores 2 --configfile config/smoke.yaml --config training.epochs=3 seeds=[0]
"""


class UsageError(Exception):
    """A missing file or directory, or nothing to do: one line, exit status 2."""


def version() -> str:
    """The installed distribution's version, or the package's own when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("certbench")
    except metadata.PackageNotFoundError:
        from certbench import __version__

        return __version__


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certbench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"certbench {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "train": "train one run (resumes from its checkpoint)",
        "certify": "apply every applicable certificate to a trained run",
        "attack": "run every configured attack on a trained run",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--run-config",
            type=Path,
            required=True,
            metavar="RUN.JSON",
            help="the run's resolved config (run.json, written by the DAG's run_config rule)",
        )
        sub.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)")
        sub.add_argument(
            "--gpus",
            type=int,
            metavar="N",
            help="GPUs the job requested (the rule's resources.gpu): takes N free ones and "
            "sets CUDA_VISIBLE_DEVICES; 0 hides every GPU (default: leaves it as it is)",
        )
        if name == "train":
            sub.add_argument(
                "--out-dir",
                type=Path,
                required=True,
                metavar="DIR",
                help="run directory for model.pt, train.json and the checkpoint",
            )
        else:
            sub.add_argument(
                "--run-dir",
                type=Path,
                required=True,
                metavar="DIR",
                help="the trained run's directory (model.pt and train.json)",
            )
            sub.add_argument(
                "--out",
                type=Path,
                required=True,
                metavar="JSON",
                help=f"where to write the {name} results ({name}.json)",
            )
    text = "check that no attack beats a certified radius"
    audit = commands.add_parser("audit", help=text, description=text)
    audit.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="CSV",
        help="the audit table (one row per run and certificate)",
    )
    audit.add_argument(
        "records",
        type=Path,
        nargs="*",
        metavar="RECORD",
        help="record.json files of the runs, or their run directories (at least one)",
    )
    text = "join records into the summary and the radii table"
    collect = commands.add_parser("collect", help=text, description=text)
    collect.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="CSV",
        help="the summary (tidy: one row per run and metric)",
    )
    collect.add_argument(
        "--radii",
        type=Path,
        required=True,
        metavar="CSV",
        help="certified radii and attack distances per sample",
    )
    collect.add_argument(
        "records", type=Path, nargs="+", metavar="RECORD", help="record.json files of the runs"
    )
    text = "write the tables (CSV, Markdown, LaTeX)"
    tables = commands.add_parser("tables", help=text, description=text)
    tables.add_argument(
        "--summary", type=Path, required=True, metavar="CSV", help="the summary from `collect`"
    )
    tables.add_argument(
        "--audit", type=Path, required=True, metavar="CSV", help="the audit table from `audit`"
    )
    tables.add_argument("--published", type=Path, metavar="CSV", help="published figures to show beside ours")
    tables.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where to write the tables"
    )
    text = "draw the figures (PNG and PDF)"
    figures = commands.add_parser("figures", help=text, description=text)
    figures.add_argument(
        "--summary", type=Path, required=True, metavar="CSV", help="the summary from `collect`"
    )
    figures.add_argument(
        "--radii", type=Path, required=True, metavar="CSV", help="the radii table from `collect`"
    )
    figures.add_argument(
        "--history",
        type=Path,
        metavar="CSV",
        help="per-epoch training logs (history.csv) for the training curves",
    )
    figures.add_argument(
        "--published",
        type=Path,
        metavar="CSV",
        help="published figures (published.csv) for the ours-vs-published figure",
    )
    figures.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="where to write the figures"
    )
    figures.add_argument(
        "--extra",
        nargs="+",
        default=[],
        choices=OPTIONAL_FIGURE_NAMES,
        metavar="NAME",
        help=f"optional figures to draw too ({', '.join(OPTIONAL_FIGURE_NAMES)})",
    )
    _add_external(commands)
    _add_workflow_steps(commands)
    text = "validate a config file (schema and registries) as the DAG would"
    check = commands.add_parser("check-config", help=text, description=text)
    check.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the config file to check")
    check.add_argument(
        "--config",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides as for the DAG; dotted keys and YAML values (training.epochs=3 seeds=[0])",
    )
    commands.add_parser(
        "run",
        help="run the DAG: snakemake with its options, checked first (see run --help)",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="certbench run [SNAKEMAKE OPTIONS ...]",
    )
    return parser


def _json_value(text: str) -> object:
    """A JSON argument (the DAG passes values of its validated config this way)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None


def _add_external(commands: argparse._SubParsersAction) -> None:
    """`evaluate` (a model trained elsewhere) and `export` (trained runs for external verifiers)."""
    text = (
        "certify, attack and audit a model trained elsewhere (a state dict of a registered architecture, "
        "or an ONNX file) into a run directory with the files of a trained run"
    )
    evaluate = commands.add_parser("evaluate", help=text, description=text)
    evaluate.add_argument("--dataset", required=True, metavar="NAME", help="the data set it classifies")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--onnx", type=Path, metavar="FILE", help="an ONNX file (images in [0, 1] in, logits out)"
    )
    source.add_argument(
        "--state-dict",
        type=Path,
        metavar="FILE",
        help="a state dict (torch.save; loaded with weights_only=True)",
    )
    evaluate.add_argument("--arch", metavar="ARCH", help="the registered architecture of --state-dict")
    evaluate.add_argument(
        "--arch-params",
        type=_json_value,
        default={},
        metavar="JSON",
        help="the architecture's parameters as a JSON object (default: its defaults)",
    )
    evaluate.add_argument(
        "--name",
        metavar="NAME",
        help="its name in records and tables (default: the file's name without suffix)",
    )
    evaluate.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="the run directory to write"
    )
    evaluate.add_argument(
        "--configfile",
        type=Path,
        default=Path("config/config.yaml"),
        metavar="CONFIG.yaml",
        help="the config whose data set settings (ε, test points) and evaluation apply "
        "(default: config/config.yaml)",
    )
    evaluate.add_argument(
        "--config",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides as for the DAG (evaluation.attacks=[pgd-linf] datasets.digits.test_size=50)",
    )
    text = "write trained runs as ONNX and their test points as VNN-LIB properties (VNN-COMP's layout)"
    export = commands.add_parser("export", help=text, description=text)
    export.add_argument(
        "--out-dir", type=Path, required=True, metavar="DIR", help="the benchmark folder to write"
    )
    export.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the per-instance timeout written to instances.csv (default: 60)",
    )
    export.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (run.json, model.pt, train.json)",
    )
    for sub in (evaluate, export):
        sub.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)")
    evaluate.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPUs to take (sets CUDA_VISIBLE_DEVICES); 0 hides every GPU (default: leaves it as it is)",
    )


def _add_workflow_steps(commands: argparse._SubParsersAction) -> None:
    """The subcommands of the DAG's bookkeeping rules: each reads its inputs and writes its outputs."""
    text = "write a run's resolved config (run.json, with its hash)"
    run_config = commands.add_parser("run-config", help=text, description=text)
    run_config.add_argument(
        "--resolved",
        type=_json_value,
        required=True,
        metavar="JSON",
        help="the run's resolved config as a JSON object",
    )
    run_config.add_argument("--out", type=Path, required=True, metavar="JSON", help="where to write run.json")
    text = "read and check an external model (run.json's `external`): its model.pt and train.json"
    imported = commands.add_parser("import", help=text, description=text)
    imported.add_argument(
        "--run-config", type=Path, required=True, metavar="RUN.JSON", help="the external run's run.json"
    )
    imported.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the run directory for model.pt and train.json",
    )
    imported.add_argument(
        "--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)"
    )
    text = "join a run's config, training, certificates and attacks into its record and per-sample table"
    record = commands.add_parser("record", help=text, description=text)
    for option, name in (
        ("--run-config", "run"),
        ("--train", "train"),
        ("--certify", "certify"),
        ("--attack", "attack"),
    ):
        record.add_argument(option, type=Path, required=True, metavar="JSON", help=f"the run's {name}.json")
    record.add_argument("--out", type=Path, required=True, metavar="JSON", help="where to write record.json")
    record.add_argument(
        "--samples", type=Path, required=True, metavar="CSV", help="where to write samples.csv"
    )
    text = "fail (exit status 1, the verdict on stdout) when the audit found a beaten certificate"
    check = commands.add_parser("audit-check", help=text, description=text)
    check.add_argument(
        "--audit", type=Path, required=True, metavar="CSV", help="the audit table from `audit`"
    )
    check.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE",
        help='written ("no violations") only when the audit found none',
    )
    text = "write the validated config, every default filled in, as YAML"
    snapshot = commands.add_parser("config-snapshot", help=text, description=text)
    snapshot.add_argument(
        "--config",
        type=_json_value,
        required=True,
        metavar="JSON",
        help="the validated config as a JSON object",
    )
    snapshot.add_argument("--out", type=Path, required=True, metavar="YAML", help="where to write it")
    text = "write the published figures of the config's experiments, for the paper tables"
    published = commands.add_parser("published", help=text, description=text)
    published.add_argument(
        "--experiments",
        type=_json_value,
        required=True,
        metavar="JSON",
        help="the validated config's experiments as a JSON list",
    )
    published.add_argument(
        "--out", type=Path, required=True, metavar="CSV", help="where to write published.csv"
    )
    text = "join the runs' per-epoch training logs, for the training curves"
    history = commands.add_parser("history", help=text, description=text)
    history.add_argument("--out", type=Path, required=True, metavar="CSV", help="where to write history.csv")
    history.add_argument(
        "records", type=Path, nargs="+", metavar="RECORD", help="record.json files of the runs"
    )
    text = "write the report's first page: the overview, the audit verdict per certificate, the runs' status"
    front = commands.add_parser("front-page", help=text, description=text)
    front.add_argument("--overview", type=Path, required=True, metavar="RST", help="the workflow's overview")
    front.add_argument(
        "--summary", type=Path, required=True, metavar="CSV", help="the summary from `collect`"
    )
    front.add_argument(
        "--audit", type=Path, required=True, metavar="CSV", help="the audit table from `audit`"
    )
    front.add_argument("--out", type=Path, required=True, metavar="RST", help="where to write the front page")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from certbench.config import ConfigError

    if argv[:1] == ["run"] and not set(argv[1:2]) & {"-h", "--help"}:
        # Everything after `run` belongs to Snakemake, options included, so argparse never sees it.
        try:
            return run_snakemake(argv[1:])
        except ConfigError as error:
            print(f"certbench: config error: {error}", file=sys.stderr)
            return 2
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from certbench.gpu_slots import GpuRequestError
    from certbench.storage import CorruptFileError

    try:
        _check_paths(args)
        return _dispatch(args)
    except ConfigError as error:
        print(f"certbench: config error: {error}", file=sys.stderr)
        return 2
    except (UsageError, GpuRequestError) as error:
        print(f"certbench: {error}", file=sys.stderr)
        return 2
    except CorruptFileError as error:
        print(f"certbench: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"certbench: {where}{error.strerror or error}", file=sys.stderr)
        return 1


def _check_paths(args: argparse.Namespace) -> None:
    """The inputs a command reads exist, before any work (or a torch import) starts."""

    def need_file(option: str, path: Path | None) -> None:
        if path is not None and not path.is_file():
            raise UsageError(
                f"{option} {path}: no such file" if not path.exists() else f"{option} {path}: not a file"
            )

    def need_dir(option: str, path: Path) -> None:
        if not path.is_dir():
            raise UsageError(
                f"{option} {path}: no such directory"
                if not path.exists()
                else f"{option} {path}: not a directory"
            )

    if args.command in ("train", "certify", "attack"):
        need_file("--run-config", args.run_config)
        if args.command != "train":
            need_dir("--run-dir", args.run_dir)
            for name in ("train.json", "model.pt"):
                if not (args.run_dir / name).is_file():
                    raise UsageError(f"--run-dir {args.run_dir}: no {name} in it (is the run trained?)")
    elif args.command == "audit":
        if not args.records:
            raise UsageError(
                "audit: no records given; pass the record.json files (or run directories) to audit"
            )
        args.records = [path / "record.json" if path.is_dir() else path for path in args.records]
        for path in args.records:
            need_file("record", path)
    elif args.command in ("collect", "history"):
        for path in args.records:
            need_file("record", path)
    elif args.command == "record":
        for option in ("run_config", "train", "certify", "attack"):
            need_file(f"--{option.replace('_', '-')}", getattr(args, option))
    elif args.command == "import":
        need_file("--run-config", args.run_config)
    elif args.command == "evaluate":
        need_file("--onnx", args.onnx)
        need_file("--state-dict", args.state_dict)
        if (args.state_dict is None) != (args.arch is None):
            raise UsageError("evaluate: --arch goes with --state-dict (and only with it)")
    elif args.command == "export":
        for path in args.run_dirs:
            need_dir("run directory", path)
            for name in ("run.json", "train.json", "model.pt"):
                if not (path / name).is_file():
                    raise UsageError(f"{path}: no {name} in it (is the run trained?)")
    elif args.command == "audit-check":
        need_file("--audit", args.audit)
    elif args.command == "front-page":
        need_file("--overview", args.overview)
        need_file("--summary", args.summary)
        need_file("--audit", args.audit)
    elif args.command == "tables":
        need_file("--summary", args.summary)
        need_file("--audit", args.audit)
        need_file("--published", args.published)
    elif args.command == "figures":
        need_file("--summary", args.summary)
        need_file("--radii", args.radii)
        need_file("--history", args.history)
        need_file("--published", args.published)


def _dispatch(args: argparse.Namespace) -> int:
    from certbench.storage import read_json

    if args.command in ("train", "certify", "attack"):
        from certbench.gpu_slots import claim_gpus

        claim_gpus(args.gpus)  # before torch starts CUDA, which reads CUDA_VISIBLE_DEVICES once
        _threads(args.threads)
        run_config = read_json(args.run_config)
        if args.command == "train":
            from certbench.train import train

            record = train(run_config, args.out_dir)
            return 0 if record["status"] in ("ok", "diverged") else 1
        if args.command == "certify":
            from certbench.evaluate import certify

            certify(run_config, args.run_dir, args.out)
        else:
            from certbench.evaluate import attack

            attack(run_config, args.run_dir, args.out)
        return 0
    if args.command == "audit":
        from certbench.audit import audit

        frame = audit(args.records, args.out)
        if frame.empty:
            # Every run diverged or failed: nothing to audit, which the DAG reports in its tables.
            print(
                f"certbench: audit: nothing to audit in {len(args.records)} record(s) (no finished run with "
                f"an applicable certificate); {args.out} lists no certificate",
                file=sys.stderr,
            )
        return 0
    if args.command == "collect":
        from certbench.collect import collect

        collect(args.records, args.out, args.radii)
        return 0
    if args.command == "tables":
        from certbench.tables import write_tables

        write_tables(args.summary, args.audit, args.out_dir, args.published)
        return 0
    if args.command == "figures":
        from certbench.figures import write_figures

        write_figures(args.summary, args.radii, args.out_dir, args.history, args.published, args.extra)
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "export":
        return _export(args)
    if args.command in WORKFLOW_STEPS:
        return WORKFLOW_STEPS[args.command](args)
    from certbench import config as cfg

    cfg.validate(cfg.merge(cfg.read_config_file(args.config), cfg.parse_overrides(args.overrides)))
    print(f"{args.config}: valid")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """One external model through import, certificates, attacks, record and audit; a summary on stdout.
    The config's data set settings and evaluation apply; its own `external` list does not."""
    from certbench import config as cfg
    from certbench.gpu_slots import claim_gpus

    model_path = args.onnx if args.onnx is not None else args.state_dict
    source = (
        {"onnx": str(args.onnx)}
        if args.onnx is not None
        else {"state_dict": str(args.state_dict), "arch": args.arch, "arch_params": args.arch_params}
    )
    config = cfg.merge(cfg.read_config_file(args.configfile), cfg.parse_overrides(args.overrides))
    config = cfg.merge(config, {"datasets": {args.dataset: {}}})
    config["external"] = [{"name": args.name or model_path.stem, "dataset": args.dataset, **source}]
    claim_gpus(args.gpus)  # before torch starts CUDA
    _threads(args.threads)
    from certbench.catalogue import check_config
    from certbench.external import evaluate_model, external_runs, resolve_external

    checked = check_config(config)
    record = evaluate_model(resolve_external(checked, external_runs(checked)[0]), args.out_dir)
    if record["status"] != "ok":
        print(f"certbench: {record['message']}", file=sys.stderr)
        return 1
    return _report_evaluation(record, args.out_dir)


def _report_evaluation(record: dict[str, Any], out_dir: Path) -> int:
    """Print what ``certbench evaluate`` found; exit status 1 when the audit found a beaten certificate."""
    from certbench.audit import verdict
    from certbench.storage import read_json

    print(f"{out_dir / 'record.json'}: clean accuracy {record['certify']['clean_accuracy']:.4f}")
    conversion = read_json(out_dir / "train.json")["external"]["certificates"]
    if conversion is not None:  # the model runs as onnx2torch's modules, which no certificate knows
        print(f"  conversion: {conversion}")
    for name, entry in record["certify"]["certificates"].items():
        if not entry["applicable"]:
            print(f"  {name}: not applicable ({entry['reason']})")
            continue
        accuracy = [
            f"{row['norm']} {row['eps']:g}: {row['value']:.4f}"
            for row in record["metrics"]
            if row["metric"] == "certified_accuracy" and row["evaluation"] == name
        ]
        print(f"  {name}: certified accuracy at {', '.join(accuracy)}")
    message = verdict(out_dir / "audit.csv")
    print(f"  audit: {message or 'no violations'}")
    return 1 if message else 0


def _export(args: argparse.Namespace) -> int:
    """A run that cannot be exported faithfully is one line on stderr (and ``failed`` in export.json);
    the others are written all the same, and the exit status stays 0 so that the DAG keeps them."""
    _threads(args.threads)
    from certbench.export import export_runs

    result = export_runs(args.run_dirs, args.out_dir, args.timeout)
    for entry in result["runs"].values():
        if entry["status"] == "failed":
            print(f"certbench: {entry['message']}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    """A refused model is reported on stderr (one line) and recorded; the DAG goes on with the others."""
    from certbench.external import import_model
    from certbench.storage import read_json

    _threads(args.threads)
    record = import_model(read_json(args.run_config), args.out_dir)
    if record["status"] != "ok":
        print(f"certbench: {record['message']}", file=sys.stderr)
    return 0


def _run_config(args: argparse.Namespace) -> int:
    from certbench.storage import write_json

    write_json(args.out, args.resolved)
    return 0


def _record(args: argparse.Namespace) -> int:
    from certbench.collect import assemble

    assemble(args.run_config, args.train, args.certify, args.attack, args.out, args.samples)
    return 0


def _audit_check(args: argparse.Namespace) -> int:
    """The verdict goes to stdout, which Snakemake shows, so a failed DAG names what failed."""
    from certbench.audit import verdict

    message = verdict(args.audit)
    if message:
        print(message)
        return 1
    args.out.write_text("no violations\n")
    return 0


def _config_snapshot(args: argparse.Namespace) -> int:
    import yaml

    from certbench.storage import atomic_write_bytes

    atomic_write_bytes(args.out, yaml.safe_dump(args.config, sort_keys=False).encode())
    return 0


def _published(args: argparse.Namespace) -> int:
    from certbench.storage import atomic_write_bytes
    from certbench.tables import published_table

    atomic_write_bytes(args.out, published_table(args.experiments).to_csv(index=False).encode())
    return 0


def _history(args: argparse.Namespace) -> int:
    from certbench.collect import history

    history(args.records, args.out)
    return 0


def _front_page(args: argparse.Namespace) -> int:
    from certbench.frontpage import write_front_page

    write_front_page(args.overview, args.summary, args.audit, args.out)
    return 0


WORKFLOW_STEPS = {
    "run-config": _run_config,
    "import": _import,
    "record": _record,
    "audit-check": _audit_check,
    "config-snapshot": _config_snapshot,
    "published": _published,
    "history": _history,
    "front-page": _front_page,
}


# ---------------------------------------------------------------------------------------------
# certbench run: snakemake, with its --configfile and --config checked first
# ---------------------------------------------------------------------------------------------


def _option_values(args: list[str], start: int) -> int:
    """Index just past the values of the option at ``start - 1`` (they end at the next option)."""
    end = start
    while end < len(args) and not args[end].startswith("-"):
        end += 1
    return end


def snakemake_args(args: list[str]) -> list[str]:
    """Snakemake's arguments with every --configfile checked and dotted --config keys nested.

    ``training.epochs=3`` becomes ``training={"epochs": "3"}`` (Snakemake merges mappings key by key
    and the workflow types the text as in a config file); other entries pass unchanged.
    """
    import json

    from certbench import config as cfg

    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        name, eq, inline = arg.partition("=")
        if name in ("--configfile", "--configfiles") and eq:
            cfg.read_config_file(inline)
            out.append(arg)
            index += 1
            continue
        if arg in ("--configfile", "--configfiles", "--config", "-C"):
            end = _option_values(args, index + 1)
            values = args[index + 1 : end]
            if arg in ("--configfile", "--configfiles"):
                if not values:
                    raise cfg.ConfigError(f"{arg}: expected a file name")
                for path in values:
                    cfg.read_config_file(path)
            else:
                rewritten = []
                for entry in values:
                    key = entry.partition("=")[0]
                    if "." in key:
                        nested = cfg.parse_overrides([entry], typed=False)
                        top = next(iter(nested))
                        entry = f"{top}={json.dumps(nested[top])}"
                    else:
                        cfg.parse_overrides([entry], typed=False)  # the same one-line error for a bad entry
                    rewritten.append(entry)
                values = rewritten
            out += [arg, *values]
            index = end
            continue
        out.append(arg)
        index += 1
    return out


def _snakemake_command() -> list[str]:
    beside = Path(sys.executable).with_name("snakemake")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("snakemake")
    return [found] if found else [sys.executable, "-m", "snakemake"]


def run_snakemake(args: list[str]) -> int:
    """``snakemake ARGS`` after :func:`snakemake_args`; returns Snakemake's exit status."""
    command = [*_snakemake_command(), *snakemake_args(args)]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
