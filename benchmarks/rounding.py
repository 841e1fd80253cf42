"""What the proven rounding allowance costs: certified accuracy, median radius and time.

For every trained run and seed of a results directory (``make run`` leaves one in ``results/``), each
applicable certificate is run twice on the run's test points: as shipped, and with the rounding
terms of :mod:`certbench.bounds.rounding` set to zero (γ = 0, no ulps, no slack: the exact-arithmetic
answer the allowance can only lower, and an upper limit for the heuristic allowance it replaced).
Goals (issue: certificates sound under floating point): certified accuracy within 0.5 points of the
exact-arithmetic answer in every table cell (the mean over seeds, as the tables report it; the worst
single seed is printed beside it) and median radius within 1 %; certification time ≤ 1.2× without the
rounding walks, read at the certify job: each run's ``certbench.evaluate.certify`` (what the DAG's certify
job runs after the interpreter starts: the model and test points loaded, the predictions, every configured
certificate) is timed in-process, and the walks' share of it measured directly. The certificate calls
alone are printed beside it: for ℓ∞-dist nets a call is a forward pass of milliseconds and the walks are
most of it (for nets with a head the walk *is* the certificate), so that ratio says how many
milliseconds the proof costs, not how much longer certification takes. Each timed call starts without
a cached Lipschitz bound, as a certify job does.

Usage: ``python benchmarks/rounding.py [--results results] [--samples 200] [--certificates a,b]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from certbench.bounds import rounding
from certbench.certificates import CERTIFICATES, CERTIFIED
from certbench.certificates import lipschitz as lipschitz_certificate
from certbench.certificates.lirpa import CROWN_MEMO
from certbench.evaluate import certify, load_model, test_points
from certbench.storage import read_json

GOAL_ACCURACY_POINTS, GOAL_RADIUS, GOAL_TIME = 0.5, 0.01, 1.2


@contextmanager
def rounding_off() -> Iterator[None]:
    """Every rounding term zero: the certificates then answer for exact arithmetic."""
    with (
        mock.patch.object(rounding, "gamma", lambda k, u: 0.0),
        mock.patch.object(rounding, "U64", 0.0),
        mock.patch.object(rounding, "SMOOTH_ULPS", 0),
    ):
        yield


@contextmanager
def timed_walks(total: list[float]) -> Iterator[None]:
    """Accumulate the seconds spent in :func:`certbench.bounds.rounding.margin_bounds`."""
    original = rounding.margin_bounds

    def timed(*args: object, **kwargs: object) -> rounding.MarginBounds:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            total[0] += time.perf_counter() - started

    targets = [
        "certbench.bounds.rounding.margin_bounds",
        "certbench.certificates.lirpa.margin_bounds",
        "certbench.certificates.linf_dist.margin_bounds",
    ]
    with mock.patch(targets[0], timed), mock.patch(targets[1], timed), mock.patch(targets[2], timed):
        yield


#: Certified accuracy (%) per ε and the median radius (None for certificates without radii).
Summary = tuple[dict[float, float], float | None]


def summary(result: object, eps: list[float]) -> Summary:
    accuracy = {e: 100 * float(np.mean(result.status[e] == CERTIFIED)) for e in eps}  # type: ignore[attr-defined]
    radius = result.radius  # type: ignore[attr-defined]
    return accuracy, (float(np.median(radius)) if radius is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="results directory of a finished DAG")
    parser.add_argument("--samples", type=int, default=200, help="test points per run")
    parser.add_argument(
        "--certificates",
        default="lipschitz-l2,lipsdp-l2,linf-dist,linf-dist-l2,ibp,crown-ibp",
        help="comma-separated certificate names",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [
        path
        for path in sorted(Path(args.results).glob("*/*/*/seed*/run.json"))
        if (path.parent / "certify.json").exists()
    ]  # trained and evaluated
    if not runs:
        raise SystemExit(f"no runs under {args.results}/: run the DAG first (make run)")
    rows: dict[tuple[str, str], list[tuple[Summary, Summary]]] = {}
    jobs: dict[str, list[float]] = {}
    certify_job: dict[str, tuple[float, float]] = {}
    for path in runs:
        config = read_json(path)
        model = load_model(config, path.parent, torch.device("cpu"))
        _, x, y = test_points(config)
        x, y = x[: args.samples], y[: args.samples]
        run = "/".join(path.parent.parts[-4:-1])
        job = jobs.setdefault(str(path.parent), [0.0, 0.0])
        for name in args.certificates.split(","):
            certificate = CERTIFICATES.get(name)(**config["evaluation"]["certificate_params"].get(name, {}))
            if not certificate.applies(model):
                continue
            eps = [float(e) for e in config["dataset"]["eps_l2" if certificate.norm == "l2" else "eps_linf"]]
            with rounding_off():
                exact = summary(certificate.certify(model, x, y, eps), eps)
            lipschitz_certificate._CACHE.clear()  # time a fresh job: the exact bound included
            walks = [0.0]
            started = time.perf_counter()
            with timed_walks(walks):
                proven = summary(certificate.certify(model, x, y, eps), eps)
            seconds = time.perf_counter() - started
            job[0] += seconds
            job[1] += walks[0]
            rows.setdefault((run, name), []).append((exact, proven))
        lipschitz_certificate._CACHE.clear()
        CROWN_MEMO.clear()
        walks = [0.0]
        with tempfile.TemporaryDirectory() as folder, timed_walks(walks):
            started = time.perf_counter()
            certify(config, path.parent, Path(folder) / "certify.json")
            certify_job[str(path.parent)] = (time.perf_counter() - started, walks[0])
    print(
        f"{'run (mean over seeds, as the tables)':42s} {'certificate':13s} "
        f"{'certified % (exact → proven)':38s} "
        f"{'median radius':24s} worst seed drop"
    )
    worst = {"accuracy": 0.0, "seed": 0.0, "radius": 0.0}
    for (run, name), pairs in rows.items():
        eps = list(pairs[0][0][0])
        exact = {e: float(np.mean([p[0][0][e] for p in pairs])) for e in eps}
        proven = {e: float(np.mean([p[1][0][e] for p in pairs])) for e in eps}
        seed_drop = max(p[0][0][e] - p[1][0][e] for p in pairs for e in eps)
        radii = [(p[0][1], p[1][1]) for p in pairs if p[0][1]]
        loss = max((1 - proven_r / exact_r for exact_r, proven_r in radii), default=0.0)
        worst = {
            "accuracy": max(worst["accuracy"], max(exact[e] - proven[e] for e in eps)),
            "seed": max(worst["seed"], seed_drop),
            "radius": max(worst["radius"], loss),
        }
        accuracy = ", ".join(f"{exact[e]:.1f}→{proven[e]:.1f}" for e in eps)
        radius = (
            "—" if not radii else f"{np.mean([r[0] for r in radii]):.4f}→{np.mean([r[1] for r in radii]):.4f}"
        )
        print(f"{run:42s} {name:13s} {accuracy:38s} {radius:24s} {seed_drop:.1f}")
    print(f"\n{'run':60s} {'certificate calls (walks): ratio':34s} certify job in-process (walks): ratio")
    calls, ratios = [], []
    for run, (total, share) in jobs.items():
        job_total, job_share = certify_job[run]
        calls.append(total / max(total - share, 1e-9))
        ratios.append(job_total / max(job_total - job_share, 1e-9))
        print(
            f"{run:60s} {total:6.3f} s ({share:5.3f} s): {calls[-1]:7.2f}×    "
            f"{job_total:6.2f} s ({job_share:5.3f} s): {ratios[-1]:.3f}×"
        )
    print(
        f"\nworst certified-accuracy drop in a table cell {worst['accuracy']:.2f} points (goal < "
        f"{GOAL_ACCURACY_POINTS}; one seed alone: {worst['seed']:.2f}); worst median-radius loss "
        f"{100 * worst['radius']:.2f} % (goal < {100 * GOAL_RADIUS:.0f} %); worst certify-job time ratio "
        f"{max(ratios):.3f}× (goal ≤ {GOAL_TIME}×); worst certificate-call ratio {max(calls):.2f}× "
        "(the milliseconds of the proof where a certificate is a forward pass)"
    )


if __name__ == "__main__":
    main()
