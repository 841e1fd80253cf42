"""Command-line entry points that the Snakemake rules call (and a person can run by hand).

    certbench train   --run-config run.json --out-dir DIR
    certbench certify --run-config run.json --run-dir DIR --out certify.json
    certbench attack  --run-config run.json --run-dir DIR --out attack.json
    certbench audit   --out results/audit.csv RUN_DIR...
    certbench collect --out results/summary.csv --radii results/radii.csv RECORD...
    certbench tables  --summary results/summary.csv --audit results/audit.csv --out-dir results/tables
    certbench figures --summary results/summary.csv --radii results/radii.csv --out-dir figures
    certbench check-config CONFIG.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="certbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "certify", "attack"):
        sub = commands.add_parser(name)
        sub.add_argument("--run-config", type=Path, required=True)
        sub.add_argument("--threads", type=int, default=1)
        if name == "train":
            sub.add_argument("--out-dir", type=Path, required=True)
        else:
            sub.add_argument("--run-dir", type=Path, required=True)
            sub.add_argument("--out", type=Path, required=True)
    audit = commands.add_parser("audit")
    audit.add_argument("--out", type=Path, required=True)
    audit.add_argument("records", type=Path, nargs="*")
    collect = commands.add_parser("collect")
    collect.add_argument("--out", type=Path, required=True)
    collect.add_argument("--radii", type=Path, required=True)
    collect.add_argument("records", type=Path, nargs="+")
    tables = commands.add_parser("tables")
    tables.add_argument("--summary", type=Path, required=True)
    tables.add_argument("--audit", type=Path, required=True)
    tables.add_argument("--published", type=Path)
    tables.add_argument("--out-dir", type=Path, required=True)
    figures = commands.add_parser("figures")
    figures.add_argument("--summary", type=Path, required=True)
    figures.add_argument("--radii", type=Path, required=True)
    figures.add_argument("--out-dir", type=Path, required=True)
    check = commands.add_parser("check-config")
    check.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from certbench.config import ConfigError

    try:
        return _dispatch(args)
    except ConfigError as error:
        print(f"certbench: config error: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from certbench.storage import read_json

    if args.command in ("train", "certify", "attack"):
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
        audit(args.records, args.out)
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
        write_figures(args.summary, args.radii, args.out_dir)
        return 0
    from certbench import config as cfg
    cfg.validate(cfg.load(args.config))
    print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
