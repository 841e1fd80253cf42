"""Seconds of the ``cascade`` certificate against each of its stages alone on the samples it needed.

The cascade runs IBP, CROWN-IBP, CROWN and α-CROWN, each on the (sample, ε) pairs the cheaper
ones left unproven. For each stage this script runs that stage's own certificate on exactly the
pairs that reached it in the cascade, and prints its seconds (CPU and wall, all ε together)
next to the cascade's. Goal: the cascade costs no more than 1.2× the most expensive stage on the
pairs that needed it. It also checks that the cascade certified the union of its stages, each
stage's certificate run alone on all the points.

The model is a run of a finished DAG (``--results RESULTS --run digits/ibp/cnn-small/seed0``: its
test points and ε list) or, without ``--results``, cnn-small after a short IBP training
(``benchmarks/ibp_crown.py``: Fashion-MNIST, or sklearn digits upsampled when it is missing).

Usage: ``python benchmarks/cascade.py [--results RESULTS --run RUN] [--samples 128]
[--eps 0.02,0.05,0.1] [--steps 150] [--iterations 20] [--threads 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from certbench.certificates import CERTIFICATES, CERTIFIED
from certbench.certificates.cascade import STAGES
from certbench.evaluate import load_model, test_points
from certbench.storage import read_json

GOAL = 1.2


def trained_model(args: argparse.Namespace) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, list]:
    if args.results is not None:
        run_dir = args.results / args.run
        config = read_json(run_dir / "run.json")
        _, x, y = test_points(config)
        eps = [float(e) for e in args.eps.split(",")] if args.eps else list(config["dataset"]["eps_linf"])
        return args.run, load_model(config, run_dir, torch.device("cpu")), x, y, eps
    sys.path.insert(0, str(Path(__file__).parent))
    from ibp_crown import data, quick_ibp_model

    source, x_train, y_train, x_test, y_test = data()
    model = quick_ibp_model(x_train, y_train, steps=args.steps)
    eps = [float(e) for e in (args.eps or "0.02,0.05,0.1").split(",")]
    return f"cnn-small, {args.steps} IBP steps on {source}", model, x_test, y_test, eps


def timed_certify(name: str, params: dict, model, x, y, eps) -> tuple[dict, float, float]:  # type: ignore[no-untyped-def]
    """Statuses per ε, CPU and wall seconds of certificate ``name`` on (x, y)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = CERTIFICATES.get(name)(**params).certify(model, x, y, eps)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="results directory of a finished DAG")
    parser.add_argument("--run", default="digits/ibp/cnn-small/seed0", help="run directory under results")
    parser.add_argument("--samples", type=int, default=128, help="test points (at most)")
    parser.add_argument("--eps", default="", help="comma-separated ε (default: the run's, or 0.02,0.05,0.1)")
    parser.add_argument("--steps", type=int, default=150, help="IBP training steps (no --results)")
    parser.add_argument("--iterations", type=int, default=20, help="α-CROWN iterations")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    what, model, x, y, eps = trained_model(args)
    x, y = x[: args.samples], y[: args.samples]
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"model: {what}; {len(x)} points, clean accuracy {accuracy:.3f}; ε {eps}; threads {args.threads}")

    params = {name: {} for name in STAGES}
    params["alpha-crown"] = {"iterations": args.iterations}
    cascade, cascade_cpu, cascade_wall = timed_certify(
        "cascade", {"alpha_iterations": args.iterations, "time_limit": None}, model, x, y, eps
    )
    print("\n| stage | pairs reaching it | certified there | alone on those pairs: s CPU | s wall |")
    print("|---|---|---|---|---|")
    costs = {}
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).numpy()
    reached = {e: correct.copy() for e in eps}  # misclassified points reach no stage
    for name in STAGES:
        cpu = wall = 0.0
        count = certified_here = 0
        for e in eps:
            here = np.flatnonzero(reached[e])
            count += len(here)
            certified_here += int((cascade.verifier[e] == name).sum())
            if len(here):
                _, c, w = timed_certify(name, params[name], model, x[here], y[here], [e])
                cpu, wall = cpu + c, wall + w
            reached[e] &= cascade.verifier[e] != name  # the next stage sees what this one left
        costs[name] = cpu
        print(f"| {name} | {count} | {certified_here} | {cpu:.2f} | {wall:.2f} |", flush=True)
    worst = max(costs, key=costs.get)
    ratio = cascade_cpu / costs[worst]
    print(
        f"\ncascade: {cascade_cpu:.2f} s CPU ({cascade_wall:.2f} s wall; stages "
        + ", ".join(f"{n} {cascade.extra['seconds_' + n]:.2f}" for n in STAGES)
        + f" s wall); most expensive stage on its pairs: {worst} {costs[worst]:.2f} s CPU; "
        f"ratio {ratio:.2f} (goal ≤ {GOAL:g}: {'met' if ratio <= GOAL else 'MISSED'})"
    )

    print("\n| ε | cascade certified | union of the stages alone | " + " | ".join(STAGES) + " |")
    print("|---|---|---|" + "---|" * len(STAGES))
    alone = {name: timed_certify(name, params[name], model, x, y, eps)[0] for name in STAGES}
    for e in eps:
        each = {name: alone[name].status[e] == CERTIFIED for name in STAGES}
        union = np.logical_or.reduce(list(each.values()))
        mine = cascade.status[e] == CERTIFIED
        same = "" if np.array_equal(mine, union) else " (DIFFERS)"
        print(
            f"| {e:g} | {int(mine.sum())} | {int(union.sum())}{same} | "
            + " | ".join(str(int(c.sum())) for c in each.values())
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
