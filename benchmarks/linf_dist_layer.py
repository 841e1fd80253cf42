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

On CUDA, at the paper's CIFAR-10 width (Zhang et al. 2021: 5120 units, batch 512, 5120 → 5120),
one forward + backward pass of the Triton kernels (``triton``, the default dispatch on CUDA), the
chunked PyTorch reference (``chunked``) and ``nn.Linear`` with TF32 off, at p = ∞, 8 and 8.5 (a
non-integer p, as most of the p schedule): the median of ``--repeats`` timed calls (CUDA events)
after one warm-up call (which compiles the kernels), and the peak of allocated GPU memory over the
call. Goals (issue 16): Triton at most 4× ``nn.Linear`` at p = ∞ (10× at p = 8) and at least 10×
faster than the chunked path. Without CUDA that part says so and is skipped; ``--cuda-only``
skips the CPU part (a minute or two on a GPU, compilation included).

    .venv/bin/python benchmarks/linf_dist_layer.py [--repeats 5] [--threads N] [--torch-only] [--skip-naive]
                                                   [--cuda-only]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

SHAPES = [(512, 784, 1024), (512, 1024, 1024)]
GOALS = {math.inf: 4.0, 8.0: 10.0}
MEMORY_GOAL_UNITS = 8.0
CUDA_SHAPE = (512, 5120, 5120)
CUDA_PS = (math.inf, 8.0, 8.5)
CUDA_SPEEDUP_GOAL = 10.0


def make_step(impl: str, b: int, n_in: int, n_out: int, p: float, device: str = "cpu"):  # noqa: ANN201
    """One forward + backward of ``impl`` on fresh random tensors."""
    import torch

    from certbench.nn.linf_dist import lp_distance

    x = torch.randn(b, n_in, device=device, requires_grad=True)
    g = torch.randn(b, n_out, device=device)
    if impl == "linear":
        forward = torch.nn.Linear(n_in, n_out, device=device)
    else:
        w = torch.randn(n_out, n_in, device=device, requires_grad=True)
        if impl in ("ours", "triton", "chunked"):
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


def measure(
    impl: str, b: int, n_in: int, n_out: int, p: float, repeats: int, threads: int
) -> dict[str, float]:
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
    command = [
        sys.executable,
        __file__,
        "--one",
        impl,
        *map(str, shape),
        str(p),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def dispatch(impl: str) -> Iterator[None]:
    """``chunked``: send CUDA tensors to the chunked PyTorch reference, as when triton is missing."""
    from certbench.nn import linf_dist

    triton_for = linf_dist._triton_for
    if impl == "chunked":
        linf_dist._triton_for = lambda *tensors: None
    try:
        yield
    finally:
        linf_dist._triton_for = triton_for


def measure_cuda(impl: str, p: float, repeats: int) -> dict[str, float]:
    """Median seconds (CUDA events) and peak allocated bytes of one forward + backward at CUDA_SHAPE."""
    import torch

    with dispatch(impl):
        step = make_step(impl, *CUDA_SHAPE, p, device="cuda")
        step()  # warm-up: compiles the Triton kernels (and runs their self-check) on first use
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return {"seconds": times[len(times) // 2], "peak_bytes": float(peak)}


def cuda_part(repeats: int) -> None:
    """Triton against the chunked reference and ``nn.Linear`` (TF32 off) at the paper's width."""
    import torch

    if not torch.cuda.is_available():
        print("CUDA: not available, skipping the Triton vs chunked PyTorch comparison")
        return
    from certbench.nn.linf_dist import _triton_for

    torch.set_float32_matmul_precision("highest")  # no TF32 for nn.Linear
    torch.manual_seed(0)
    b, n_in, n_out = CUDA_SHAPE
    unit = 4.0 * (b * n_out + n_out * n_in)
    available = _triton_for(torch.ones(1, device="cuda")) is not None
    print(
        f"\nCUDA {torch.cuda.get_device_name()}: {b}×{n_in}→{n_out}, forward + backward, "
        f"median of {repeats}; Triton kernels "
        f"{'in use' if available else 'UNAVAILABLE (the triton rows are the chunked path)'}"
    )
    header = (
        f"{'p':>4} {'impl':>8} {'f+b s':>9} {'× Linear':>9} {'goal':>5} {'chunked ×':>10} {'goal':>5} "
        f"{'peak MB':>9} {'units':>6} {'ok':>3}"
    )
    print(header)
    print("-" * len(header))
    linear = measure_cuda("linear", 0.0, repeats)
    print(
        f"{'':>4} {'linear':>8} {linear['seconds']:9.5f} {1:9.2f} {'':>5} {'':>10} {'':>5} "
        f"{linear['peak_bytes'] / 2**20:9.1f} {linear['peak_bytes'] / unit:6.2f}"
    )
    for p in CUDA_PS:
        results = {impl: measure_cuda(impl, p, repeats) for impl in ("triton", "chunked")}
        for impl, r in results.items():
            ratio, units = r["seconds"] / linear["seconds"], r["peak_bytes"] / unit
            speedup = results["chunked"]["seconds"] / r["seconds"]
            goal = GOALS.get(p)
            ok = (
                ""
                if impl == "chunked"
                else ("yes" if speedup >= CUDA_SPEEDUP_GOAL and (goal is None or ratio <= goal) else "no")
            )
            print(
                f"{p:>4g} {impl:>8} {r['seconds']:9.5f} {ratio:9.2f} {goal or '':>5} {speedup:10.1f} "
                f"{CUDA_SPEEDUP_GOAL if impl == 'triton' else '':>5} {r['peak_bytes'] / 2**20:9.1f} "
                f"{units:6.2f} {ok:>3}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--torch-only", action="store_true", help="disable the compiled kernel")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA part (Triton vs chunked)")
    parser.add_argument("--one", nargs=5, metavar=("IMPL", "B", "IN", "OUT", "P"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, b, n_in, n_out, p = args.one
        print(json.dumps(measure(impl, int(b), int(n_in), int(n_out), float(p), args.repeats, args.threads)))
        return

    if args.cuda_only:
        cuda_part(args.repeats)
        return

    import torch

    from certbench.nn.linf_dist import kernel_available

    print(
        f"threads {args.threads or torch.get_num_threads()}, "
        f"kernel {'off' if args.torch_only else kernel_available()}, "
        f"load average {os.getloadavg()[0]:.1f}; time: median of {args.repeats}; "
        f"memory: ru_maxrss growth over one call (fresh process)"
    )
    header = (
        f"{'shape':>15} {'p':>4} {'impl':>7} {'f+b s':>8} {'× Linear':>9} {'goal':>6} "
        f"{'peak MB':>9} {'units':>7} {'ok':>3}"
    )
    print(header)
    print("-" * len(header))
    for shape in SHAPES:
        b, n_in, n_out = shape
        unit = 4.0 * (b * n_out + n_out * n_in)
        linear = run("linear", shape, 0.0, args)
        print(
            f"{b}×{n_in}→{n_out:<5} {'':>4} {'linear':>7} {linear['seconds']:8.4f} {1:9.2f} {'':>6} "
            f"{linear['peak_bytes'] / 2**20:9.1f} {linear['peak_bytes'] / unit:7.2f}"
        )
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
                print(
                    f"{label:>15} {p:>4g} {impl:>7} {r['seconds']:8.4f} {ratio:9.2f} {GOALS[p]:6g} "
                    f"{r['peak_bytes'] / 2**20:9.1f} {units:7.2f} {ok:>3}"
                )
    cuda_part(args.repeats)


if __name__ == "__main__":
    main()
