"""The GPU check of issue 16: one table, at most 8 minutes on one GPU.

Three parts, each a group of rows of one table:

1. ``layer`` — one forward + backward of the ℓp-distance layer at the paper's CIFAR-10 shape
   (batch 512, 5120 → 5120): the Triton kernels, the chunked PyTorch reference and ``nn.Linear``
   with TF32 off, at each p of ``benchmarks/linf_dist_layer.py`` (whose CUDA measurement this
   imports): median seconds and peak allocated GPU memory.
2. ``epoch`` — seconds per epoch of the paper configs (``config/paper/*.yaml``): the ℓ∞-dist net and
   the +MLP net on CIFAR-10, IBP and CROWN-IBP on ``cnn-large`` (CIFAR-10 8/255), LMT on WRN-16-4
   (SVHN). Each builds its method, model and optimiser exactly as ``certbench.train`` does and runs
   the library's training step on **random tensors of the data set's shape**, built here and never
   written anywhere (the data sets are not needed, and no data set is registered for this): a few
   warm-up steps, then the mean of a few timed steps, scaled to an epoch of the data set's training
   split (50,000 CIFAR-10 images, 73,257 SVHN images). The steps run at training progress 0.5, where
   the ε ramp and the p schedule are under way (the full cost of the loss; at progress 0 IBP and
   CROWN-IBP train at ε = 0). Published figures (Zhang et al. 2021, Table 4, CIFAR-10, one older
   GPU) stand beside them where known.
3. ``dag`` — one short train → certify → attack → record → audit pass of a small variant of the
   paper's MNIST ℓ∞-dist net (5 layers, narrower, a few epochs) on scikit-learn's digits, through
   the real Snakemake DAG (a config written to a temporary folder, ``device: cuda``), audit passing:
   seconds and peak memory as the job records hold them.

After the table: the TF32 state of the training steps and of the layer part, and the float32
precision that the certify job recorded in its ``certify.json`` (TF32 must be off there).

``--cpu-dry`` runs the same code on the CPU at tiny shapes (narrow nets, batch 2, 8×8 images; about a
minute in all) to check the script itself; its numbers mean nothing. ``tests/test_gpu_check.py`` runs it.

    .venv/bin/python benchmarks/gpu_check.py [--cpu-dry] [--keep DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # linf_dist_layer, a sibling script

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config" / "paper"
TRAIN_SIZE = {"cifar10": 50_000, "svhn": 73_257}
# (row label, paper config file, experiment name, data set, the data set its entry is written for,
#  published seconds per epoch); the +MLP net has no CIFAR-10 entry in the config: its MNIST entry's
# architecture and loss are timed at CIFAR-10's shape and batch.
EPOCH_ROWS = [
    ("linf-dist cifar10", "linf_dist.yaml", "linf-dist", "cifar10", "cifar10", 19.7),
    ("linf-dist+mlp cifar10", "linf_dist.yaml", "linf-dist+mlp", "cifar10", "mnist", None),
    ("ibp cnn-large cifar10", "crown_ibp.yaml", "ibp-8of255", "cifar10", "cifar10", 17.4),
    ("crown-ibp cnn-large cifar10", "crown_ibp.yaml", "crown-ibp-8of255", "cifar10", "cifar10", 112.4),
    ("lmt wrn-16-4 svhn", "lmt.yaml", "lmt", "svhn", "svhn", None),
]
DAG_ROWS = ("dag train", "dag certify", "dag attack", "dag audit")
PROGRESS = 0.5


class Table:
    """Rows of one table, printed at the end (and on the way, so a long run shows progress)."""

    columns = ("part", "item", "seconds", "s/epoch", "published", "peak MB", "note")
    widths = (6, 34, 10, 9, 9, 10, 0)

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.failed = False

    def add(self, *cells: Any) -> None:
        row = tuple(_cell(c) for c in cells) + ("",) * (len(self.columns) - len(cells))
        self.rows.append(row)
        print("  " + self.format(row), flush=True)

    def format(self, row: tuple[str, ...]) -> str:
        return " ".join(
            f"{c:<{w}}" if i < 2 else (f"{c:>{w}}" if w else c)
            for i, (c, w) in enumerate(zip(row, self.widths, strict=True))
        ).rstrip()

    def print(self) -> None:
        header = self.format(self.columns)
        print("\n" + header)
        print("-" * len(header))
        for row in self.rows:
            print(self.format(row))


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: Any) -> float | None:
    """Peak allocated CUDA memory since the last reset; None on the CPU (a process-wide RSS peak
    says nothing about one part)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------
# 1. the ℓp-distance layer
# ---------------------------------------------------------------------------------------------


def layer_part(table: Table, dry: bool) -> None:
    import linf_dist_layer as bench
    import torch

    from certbench.nn.linf_dist import _triton_for
    from certbench.precision import strict_float32

    if dry:  # the same step functions at a tiny shape on the CPU; no Triton there
        shape, repeats, device = (8, 32, 32), 3, "cpu"
        note = f"CPU dry {shape[0]}×{shape[1]}→{shape[2]}; triton row = the CPU dispatch"
    else:
        shape, repeats, device = bench.CUDA_SHAPE, 3, "cuda"
        available = _triton_for(torch.ones(1, device="cuda")) is not None
        note = f"{shape[0]}×{shape[1]}→{shape[2]}" + ("" if available else "; TRITON UNAVAILABLE")

    def measure(impl: str, p: float) -> dict[str, float]:
        if not dry:
            return bench.measure_cuda(impl, p, repeats)
        with bench.dispatch(impl):
            step = bench.make_step(impl, *shape, p, device=device)
            step()
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
        return {"seconds": sorted(times)[len(times) // 2], "peak_bytes": math.nan}

    def mb(r: dict[str, float]) -> float | None:
        return None if math.isnan(r["peak_bytes"]) else r["peak_bytes"] / 2**20

    with strict_float32(device) as precision:  # nn.Linear with TF32 off
        linear = measure("linear", 0.0)
        table.add("layer", "nn.Linear (TF32 off)", linear["seconds"], None, None, mb(linear), note)
        for p in bench.CUDA_PS:
            results = {impl: measure(impl, p) for impl in ("triton", "chunked")}
            for impl, r in results.items():
                speed = results["chunked"]["seconds"] / r["seconds"]
                table.add(
                    "layer",
                    f"p={p:g} {impl}",
                    r["seconds"],
                    None,
                    None,
                    mb(r),
                    f"{r['seconds'] / linear['seconds']:.2f}× Linear"
                    + (f", {speed:.1f}× faster than chunked" if impl == "triton" else ""),
                )
    print(
        f"  layer part: TF32 {'ON' if precision['tf32'] else 'off'} (matmul {precision['matmul_precision']})"
    )


# ---------------------------------------------------------------------------------------------
# 2. seconds per epoch of the paper configs, on random tensors of the data set's shape
# ---------------------------------------------------------------------------------------------


def paper_run(file: str, name: str, dataset: str, written_for: str, dry: bool) -> dict[str, Any]:
    """The resolved run config of experiment ``name`` of ``config/paper/<file>`` on ``dataset``
    (its entry for ``written_for``), as ``certbench.config.resolve_run`` makes it for a job."""
    from certbench.config import RunId, check_params, read_config_file, resolve_run, validate_schema
    from certbench.method import get_method

    raw = read_config_file(PAPER / file)
    entry = next(e for e in raw["experiments"] if e.get("name") == name and written_for in e["datasets"])
    entry = {**copy.deepcopy(entry), "datasets": [dataset]}
    datasets = dict(raw["datasets"])
    if dataset not in datasets:
        # the other data set's test size, and the spec's ε (the timing never evaluates)
        datasets[dataset] = {k: v for k, v in datasets[written_for].items() if not k.startswith("eps_")}
    if dry:  # tiny shapes: narrow ℓ∞-dist nets, small batches (the convolutional nets keep their shape)
        if "width" in entry.get("arch_params", {}):
            entry["arch_params"] = {**entry["arch_params"], "width": 32}
        entry["training"] = {**entry.get("training", {}), "batch_size": 2}
    config = validate_schema({**raw, "datasets": {dataset: datasets[dataset]}, "experiments": [entry]})
    entry = config["experiments"][0]  # the method's defaults filled, as the DAG's config check does
    entry["params"] = check_params(get_method(entry["method"]).params_schema, entry["params"], "params.")
    return resolve_run(config, RunId(dataset, entry["name"], entry["arch"], 0))


def epoch_part(table: Table, dry: bool) -> None:
    import torch

    from certbench.method import get_method, run_context
    from certbench.precision import describe_precision
    from certbench.train import _step, make_optimizer, seed_everything, select_device

    device = select_device("cpu" if dry else "cuda")
    warmup, timed = (1, 1) if dry else (3, 10)
    tf32 = None
    for label, file, name, dataset, written_for, published in EPOCH_ROWS:
        try:
            run = paper_run(file, name, dataset, written_for, dry)
            seed_everything(0)
            context = run_context(run, device)
            if dry:  # tiny shapes: 8×8 images (the architectures adapt to the spec's shape)
                small = dataclasses.replace(context.spec, shape=(context.spec.shape[0], 8, 8))
                context = dataclasses.replace(context, spec=small)
            method = get_method(run["method"])(run["params"], context)
            method.check()
            model = method.build_model(run["run"]["arch"], run["arch_params"]).to(device)
            method.prepare(model)
            optimizer = make_optimizer(method.parameter_groups(model), run["training"])
            spec, batch = method.context.spec, run["training"]["batch_size"]
            # random images in [0, 1] of the data set's shape: a timing input, never a data set
            x = torch.rand(batch, *spec.shape, device=device)
            y = torch.randint(spec.num_classes, (batch,), device=device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            for _ in range(warmup):
                _step(method, model, optimizer, x, y, PROGRESS, run["training"]["grad_clip"])
            synchronize(device)
            started = time.perf_counter()
            for _ in range(timed):
                _step(method, model, optimizer, x, y, PROGRESS, run["training"]["grad_clip"])
            synchronize(device)
            per_step = (time.perf_counter() - started) / timed
            steps = math.ceil(TRAIN_SIZE[dataset] / batch)
            table.add(
                "epoch",
                label,
                per_step,
                per_step * steps,
                published,
                peak_mb(device),
                f"{run['run']['arch']} {run['arch_params'] or ''} on "
                f"{'×'.join(map(str, (batch, *spec.shape)))}, {steps} steps/epoch",
            )
            tf32 = describe_precision(device)["tf32"]
            del model, method, optimizer, x, y
        except Exception as error:  # one failing config does not hide the others
            traceback.print_exc()
            table.failed = True
            table.add("epoch", label, None, None, published, None, f"FAILED: {type(error).__name__}: {error}")
    state = "unknown" if tf32 is None else ("ON" if tf32 else "off")
    print(f"  epoch part: TF32 {state} in the training steps (as a train job runs them)")
    print(
        "  published CROWN-IBP with loss fusion: 43.3 s/epoch (not implemented here); "
        "published figures are Zhang et al. 2021, Table 4, on an older GPU"
    )


# ---------------------------------------------------------------------------------------------
# 3. train → certify → attack → audit through the real DAG
# ---------------------------------------------------------------------------------------------


def dag_config(folder: Path, dry: bool) -> dict[str, Any]:
    """The MNIST ℓ∞-dist net of ``config/paper/linf_dist.yaml``, narrower and a few epochs long, on digits;
    its ε/p schedule and learning-rate schedule scaled to the shorter run."""
    from certbench.config import read_config_file

    raw = read_config_file(PAPER / "linf_dist.yaml")
    entry = next(e for e in raw["experiments"] if e.get("name") == "linf-dist" and "mnist" in e["datasets"])
    epochs, paper_epochs = 6, raw["training"]["epochs"]
    # rounded down: the p ramp ends before the last epoch, which trains at p = ∞ (certifiable)
    schedule = [e * epochs // paper_epochs for e in entry["params"]["epochs"]]
    training = copy.deepcopy(raw["training"])
    training.update(epochs=epochs, batch_size=64)
    training["lr_schedule"]["start_epoch"] = training["lr_schedule"]["start_epoch"] * epochs // paper_epochs
    return {
        "results_dir": str(folder / "results"),
        "figures_dir": str(folder / "figures"),
        "device": "cpu" if dry else "cuda",
        "seeds": [0],
        "datasets": {"digits": {"eps_linf": [0.1], "eps_l2": [0.5], "test_size": 64, "train_size": 400}},
        "training": training,
        "experiments": [
            {
                "name": entry["name"],
                "method": entry["method"],
                "arch": entry["arch"],
                "arch_params": {**entry["arch_params"], "width": 64 if dry else 512},
                "params": {**entry["params"], "eps_train": 0.15, "epochs": schedule},
            }
        ],
        "evaluation": {
            "certificates": ["linf-dist", "linf-dist-l2"],
            "attacks": ["pgd-linf"],
            "attack_params": {"pgd-linf": {"steps": 10}},
            "batch_size": 64,
        },
    }


def dag_part(table: Table, dry: bool, keep: Path | None) -> None:
    from certbench.storage import read_json

    with tempfile.TemporaryDirectory(prefix="certbench-gpu-check-") as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        config = dag_config(folder, dry)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            sys.executable,  # Snakemake as a module of this Python: no script on PATH needed
            "-m",
            "snakemake",
            "audit_check",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--cores",
            "2" if dry else str(min(8, os.cpu_count() or 1)),
            "--resources",
            f"gpu={0 if dry else 1}",
            "--configfile",
            str(folder / "config.yaml"),
        ]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        entry = config["experiments"][0]
        run_dir = folder / "results" / "digits" / entry["name"] / entry["arch"] / "seed0"
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
            table.failed = True
            for label in DAG_ROWS:
                table.add("dag", label, None, None, None, None, f"FAILED: snakemake exit {done.returncode}")
            return
        train, certify, attack = (
            read_json(run_dir / f"{job}.json") for job in ("train", "certify", "attack")
        )
        note = f"{config['device']}, {entry['arch']} {entry['arch_params']}, {train['epochs']} epochs"
        table.add(
            "dag",
            "dag train",
            train["cost"]["train_seconds"],
            train["cost"]["seconds_per_epoch"],
            None,
            train["cost"]["peak_memory_mb"],
            f"{note}, status {train['status']}",
        )
        seconds_certify = sum(c.get("seconds", 0.0) for c in certify["certificates"].values())
        table.add(
            "dag",
            "dag certify",
            seconds_certify,
            None,
            None,
            certify.get("peak_memory_mb"),
            f"clean accuracy {certify['clean_accuracy']:.3f}; "
            + ", ".join(n for n, c in certify["certificates"].items() if c["applicable"]),
        )
        table.add(
            "dag", "dag attack", attack["seconds"], None, None, attack.get("peak_memory_mb"), "pgd-linf"
        )
        audit_ok = (folder / "results" / "audit.ok").exists()
        table.failed |= not audit_ok
        table.add(
            "dag",
            "dag audit",
            seconds,
            None,
            None,
            None,
            f"audit {'passed' if audit_ok else 'FAILED'} (seconds: the whole DAG, job start-ups included)",
        )
        p = certify["precision"]
        print(
            f"  certify.json precision: tf32 {p['tf32']}, cudnn {p['cudnn']}, "
            f"matmul {p['matmul_precision']}, "
            f"device {p['device']}{' ' + p['device_name'] if 'device_name' in p else ''}, "
            f"model dtypes {p['model_dtypes']}"
        )
        if p["tf32"]:
            table.failed = True
            print("  FAILED: the certify job ran with TF32 allowed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry", action="store_true", help="tiny shapes on the CPU (checks the script)")
    parser.add_argument("--keep", type=Path, help="run the DAG part in this folder and keep it")
    args = parser.parse_args()
    import torch

    if not args.cpu_dry and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available (use --cpu-dry to check the script on the CPU)")
    device = (
        "CPU (dry run: tiny shapes, numbers mean nothing)" if args.cpu_dry else torch.cuda.get_device_name()
    )
    print(f"GPU check on {device}; torch {torch.__version__}")
    table, started = Table(), time.perf_counter()
    for name, part in (
        ("layer", lambda: layer_part(table, args.cpu_dry)),
        ("epoch", lambda: epoch_part(table, args.cpu_dry)),
        ("dag", lambda: dag_part(table, args.cpu_dry, args.keep)),
    ):
        print(f"part {name} …", flush=True)
        part_started = time.perf_counter()
        try:
            part()
        except Exception:
            traceback.print_exc()
            table.failed = True
            table.add(name, f"{name} part", None, None, None, None, "FAILED (traceback above)")
        if not args.cpu_dry:
            torch.cuda.empty_cache()
        print(f"  ({time.perf_counter() - part_started:.1f} s)", flush=True)
    table.print()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {time.perf_counter() - started:.0f} s; this process's peak RSS {rss:.0f} MB")
    print("peak MB: torch.cuda.max_memory_allocated per part (CPU: not measured) and the jobs' records")
    if table.failed:
        sys.exit("gpu_check: FAILED (see the rows above)")


if __name__ == "__main__":
    main()
