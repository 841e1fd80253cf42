"""Certified accuracy and seconds of ``crown`` against ``alpha-crown`` on trained models.

Reads the trained runs of a finished DAG (``<results>/<dataset>/<method>/<arch>/seed<k>``, each with
``run.json`` and ``model.pt``), evaluates both certificates on the run's own test points and ε list
(``dataset.test_size`` points, ``dataset.eps_linf``) and prints one row per run and ε: certified
accuracy of each, the samples α-CROWN certifies beyond CROWN (and the reverse, which must be 0 up
to errors) and the seconds of each certificate (CPU wall time, all ε together).

Usage: ``python benchmarks/alpha_crown.py RESULTS [--runs digits/ibp/cnn-small/seed0,...]
[--iterations 20] [--lr 0.5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from certbench.certificates import CERTIFICATES, CERTIFIED, ERROR
from certbench.evaluate import load_model, test_points
from certbench.storage import read_json

DEFAULT_RUNS = "digits/ibp/cnn-small/seed0,digits/standard/mlp/seed0,digits/lmt/cnn-small/seed0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results directory of a finished DAG")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated run directories under results")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns = ["run", "ε", "crown cert. acc.", "alpha-crown cert. acc.", "gained", "lost", "errors"]
    columns += ["crown s", "alpha-crown s"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        run_dir = args.results / run
        config = read_json(run_dir / "run.json")
        model = load_model(config, run_dir, torch.device("cpu"))
        _, x, y = test_points(config)
        eps = list(config["dataset"]["eps_linf"])
        results, seconds = {}, {}
        for name, params in (("crown", {}), ("alpha-crown", {"iterations": args.iterations, "lr": args.lr})):
            started = time.perf_counter()
            results[name] = CERTIFICATES.get(name)(**params).certify(model, x, y, eps)
            seconds[name] = time.perf_counter() - started
        for e in eps:
            crown = results["crown"].status[e] == CERTIFIED
            alpha = results["alpha-crown"].status[e] == CERTIFIED
            errors = int((results["alpha-crown"].status[e] == ERROR).sum())
            print(
                f"| {run} | {e:g} | {crown.mean():.3f} | {alpha.mean():.3f} | {int((alpha & ~crown).sum())} "
                f"| {int((crown & ~alpha).sum())} | {errors} | {seconds['crown']:.1f} "
                f"| {seconds['alpha-crown']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
