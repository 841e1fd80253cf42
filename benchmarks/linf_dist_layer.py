"""Cost of the ℓp-distance layer against ``nn.Linear`` of the same shape.

For B = 512 and 784 → 1024, 1024 → 1024, at p = ∞ and p = 8, one forward + backward pass
(gradients for input and weight, a random upstream gradient) of:

* ``ours``   — :func:`certbench.nn.linf_dist.lp_distance` (compiled kernel on float32 CPU when it
  builds, else chunked PyTorch; ``--torch-only`` forces the latter);
* ``naive``  — the broadcast form ``|x[:, None] − w[None]|`` reduced by max or by ``pow(p).sum()``,
  which materialises B × out × in tensors;
* ``cdist``  — ``torch.cdist(x, w, p)`` with its own backward;
* ``linear`` — ``nn.Linear(in, out)``.

Time: the median of ``--repeats`` calls after one warm-up call, on ``torch.get_num_threads()``
threads. Peak memory: the growth of the process's peak resident set size (``getrusage``
``ru_maxrss``) over the first full-size call, each measurement in a fresh subprocess after a
small warm-up of the same code (thread pools, libraries) and with its inputs allocated before
the baseline — so it counts every allocation of the call (PyTorch's and the kernel's own),
page-granular. It is reported in MB and in units of
``4·(B·out + out·in)`` bytes (one float32 output plus one weight matrix). Goals: p = ∞ at most
4× ``nn.Linear``'s time, p = 8 at most 10×, peak memory O(B·out + out·in) (≤ 8 units here).
The naive form is skipped when it would need more than half of the available memory.

    .venv/bin/python benchmarks/linf_dist_layer.py [--repeats 5] [--threads N] [--torch-only] [--skip-naive]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = [(512, 784, 1024), (512, 1024, 1024)]
GOALS = {math.inf: 4.0, 8.0: 10.0}
MEMORY_GOAL_UNITS = 8.0


def make_step(impl: str, b: int, n_in: int, n_out: int, p: float):  # noqa: ANN201
    """One forward + backward of ``impl`` on fresh random tensors."""
    import torch

    from certbench.nn.linf_dist import lp_distance

    x = torch.randn(b, n_in, requires_grad=True)
    g = torch.randn(b, n_out)
    if impl == "linear":
        forward = torch.nn.Linear(n_in, n_out)
    else:
        w = torch.randn(n_out, n_in, requires_grad=True)
        if impl == "ours":
            forward = lambda v: lp_distance(v, w, p)  # noqa: E731
        elif impl == "cdist":
            forward = lambda v: torch.cdist(v, w, p=p)  # noqa: E731
        else:
            def forward(v: torch.Tensor) -> torch.Tensor:
                d = (v[:, None, :] - w[None]).abs()
                return d.amax(-1) if math.isinf(p) else d.pow(p).sum(-1).pow(1 / p)

    def step() -> None:
        x.grad = None
        forward(x).backward(g)

    return step


def measure(impl: str, b: int, n_in: int, n_out: int, p: float, repeats: int, threads: int) -> dict[str, float]:
    """Run in a fresh process: a small warm-up of the same code (thread pools, libraries, the
    kernel), then the peak-RSS growth of the first full-size call, then the median time."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    make_step(impl, 8, 16, 16, p)()
    step = make_step(impl, b, n_in, n_out, p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # ru_maxrss is in KiB
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_bytes": float(peak)}


def available_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def run(impl: str, shape: tuple[int, int, int], p: float, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, **({"CERTBENCH_LINF_KERNEL": "0"} if args.torch_only else {}))
    command = [sys.executable, __file__, "--one", impl, *map(str, shape), str(p), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--torch-only", action="store_true", help="disable the compiled kernel")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--one", nargs=5, metavar=("IMPL", "B", "IN", "OUT", "P"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, b, n_in, n_out, p = args.one
        print(json.dumps(measure(impl, int(b), int(n_in), int(n_out), float(p), args.repeats, args.threads)))
        return

    import torch

    from certbench.nn.linf_dist import kernel_available

    print(f"threads {args.threads or torch.get_num_threads()}, kernel {'off' if args.torch_only else kernel_available()}, "
          f"load average {os.getloadavg()[0]:.1f}; time: median of {args.repeats}; "
          f"memory: ru_maxrss growth over one call (fresh process)")
    header = (f"{'shape':>15} {'p':>4} {'impl':>7} {'f+b s':>8} {'× Linear':>9} {'goal':>6} "
              f"{'peak MB':>9} {'units':>7} {'ok':>3}")
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        b, n_in, n_out = shape
        unit = 4.0 * (b * n_out + n_out * n_in)
        linear = run("linear", shape, 0.0, args)
        print(f"{b}×{n_in}→{n_out:<5} {'':>4} {'linear':>7} {linear['seconds']:8.4f} {1:9.2f} {'':>6} "
              f"{linear['peak_bytes'] / 2**20:9.1f} {linear['peak_bytes'] / unit:7.2f}")
        for p in GOALS:
            for impl in ("ours", "cdist", "naive"):
                label = f"{b}×{n_in}→{n_out}"
                need = (6 if math.isinf(p) else 10) * 4.0 * b * n_in * n_out
                if impl == "naive" and (args.skip_naive or need > available_bytes() / 2):
                    print(f"{label:>15} {p:>4g} {impl:>7}  skipped (needs ~{need / 2**30:.0f} GiB)")
                    continue
                r = run(impl, shape, p, args)
                ratio, units = r["seconds"] / linear["seconds"], r["peak_bytes"] / unit
                ok = "yes" if ratio <= GOALS[p] and units <= MEMORY_GOAL_UNITS else "no"
                print(f"{label:>15} {p:>4g} {impl:>7} {r['seconds']:8.4f} {ratio:9.2f} {GOALS[p]:6g} "
                      f"{r['peak_bytes'] / 2**20:9.1f} {units:7.2f} {ok:>3}")


if __name__ == "__main__":
    main()
