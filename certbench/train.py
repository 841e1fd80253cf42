"""The training loop shared by every method.

Seeds and deterministic flags, optimiser and learning-rate schedule from the config,
a fixed number of epochs (or a wall-clock budget), a per-epoch log, and a checkpoint
after every epoch holding the model, optimiser, schedule, method state and every RNG
state, so that a run killed at any point resumes from its last finished epoch and,
on the CPU with the same seed, ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from certbench.config import config_hash
from certbench.data.loaders import load_split
from certbench.method import LossOutput, Method, get_method, run_context
from certbench.progress import Progress
from certbench.records import load_tensors, provenance, save_tensors
from certbench.storage import CorruptFileError, write_json

log = logging.getLogger(__name__)
CALIBRATION_STEPS = 10


def select_device(choice: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def subset(dataset: Dataset, size: int | None) -> Dataset:
    """The first ``size`` items of a fixed permutation (seed 0: the same for every run)."""
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size]
    return Subset(dataset, order.tolist())


def in_memory(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of a TensorDataset or a Subset of one; None for lazily loaded data sets."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        index = torch.as_tensor(dataset.indices)
        return dataset.dataset.tensors[0][index], dataset.dataset.tensors[1][index]
    return None


class TensorBatches:
    """Shuffled mini-batches of in-memory tensors.

    Equivalent to a shuffling DataLoader, without its per-item indexing and collation, which
    cost more than a training step of a small model on 8×8 digits.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.x), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


def batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> TensorBatches | DataLoader:
    tensors = in_memory(dataset)
    if tensors is not None:
        return TensorBatches(*tensors, batch_size, generator)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def make_optimizer(
    parameters: list[torch.Tensor] | list[dict[str, Any]], training: Mapping[str, Any]
) -> torch.optim.Optimizer:
    name, lr, wd = training["optimizer"], training["lr"], training["weight_decay"]
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(
            parameters, lr=lr, betas=tuple(training["betas"]), eps=training["adam_eps"], weight_decay=wd
        )
    return torch.optim.SGD(
        parameters, lr=lr, momentum=training["momentum"], weight_decay=wd, nesterov=name == "nesterov"
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, training: Mapping[str, Any], epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    schedule = training["lr_schedule"]
    if schedule["type"] == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule["milestones"], schedule["gamma"])
    if (
        schedule["type"] == "cosine"
    ):  # constant until start_epoch, then half a cosine down to 0 (SGDR, no restart)
        start = min(schedule["start_epoch"], epochs - 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda epoch: 1.0
            if epoch < start
            else 0.5 * (1 + math.cos(math.pi * (epoch - start) / (epochs - start))),
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory on a GPU; the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


def _step(
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    progress: float,
    grad_clip: float | None,
) -> LossOutput:
    out = method.loss(model, x, y, progress)
    if not torch.isfinite(out.loss):
        raise Diverged(f"loss is {out.loss.item()} at progress {progress:.4f}")
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    method.after_step(model)
    return out


def calibrate_epochs(
    method: Method,
    model: nn.Module,
    loader: TensorBatches | DataLoader,
    training: Mapping[str, Any],
    device: torch.device,
) -> int:
    """Fixed wall-clock budget: epochs = budget / measured seconds per epoch (Prach et al. 2024).

    Times a few steps on throwaway copies of the model and method state, so the run itself
    starts from the untouched initial state.
    """
    model_copy, method_copy = copy.deepcopy(model), copy.deepcopy(method)
    optimizer = make_optimizer(method_copy.parameter_groups(model_copy), training)
    rng = torch.get_rng_state()
    batches, started = 0, time.perf_counter()
    for x, y in loader:
        _step(method_copy, model_copy, optimizer, x.to(device), y.to(device), 0.0, training["grad_clip"])
        batches += 1
        if batches == CALIBRATION_STEPS:
            break
    seconds_per_epoch = (time.perf_counter() - started) / batches * len(loader)
    torch.set_rng_state(rng)
    return max(1, min(training["epochs"], math.floor(training["budget_seconds"] / seconds_per_epoch)))


def train(run_config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Train one run; write ``model.pt`` and ``train.json`` in ``out_dir``; return the train record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, chash = out / "checkpoint.pt", config_hash(run_config)
    training, seed = run_config["training"], run_config["run"]["seed"]
    device = select_device(run_config["device"])
    if device.type == "cuda":  # peak_memory_mb: this run's peak, not an earlier one's in the same process
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(seed)
    _, (train_set, _) = load_split(
        run_config["dataset"]["name"], run_config["data"]["dir"], run_config["data"]["download"]
    )
    train_set = subset(train_set, run_config["dataset"]["train_size"])
    generator = torch.Generator().manual_seed(seed)
    loader = batches(train_set, training["batch_size"], generator)
    method_cls = get_method(run_config["method"])
    context = run_context(run_config, device)
    method = method_cls(run_config["params"], context)
    method.check()
    model = method.build_model(run_config["run"]["arch"], run_config["arch_params"]).to(device)
    method.prepare(model)

    state = _load_checkpoint(checkpoint_path, chash, device)
    epochs = (
        state["epochs"]
        if state
        else (
            calibrate_epochs(method, model, loader, training, device)
            if training["budget_seconds"]
            else training["epochs"]
        )
    )
    if epochs != context.epochs:
        method = method_cls(
            run_config["params"],
            run_context({**run_config, "training": {**training, "epochs": epochs}}, device),
        )
        method.prepare(model)
    optimizer = make_optimizer(method.parameter_groups(model), training)
    scheduler = make_scheduler(optimizer, training, epochs)
    history: list[dict[str, Any]] = []
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        history = state["history"]
        generator.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        log.info("resuming after epoch %d of %d from %s", len(history), epochs, checkpoint_path)

    status, message, resumed_from = "ok", "", len(history)
    with Progress(
        total=epochs, initial=len(history), desc="train", log=log, unit="epoch", log_on_terminal=True
    ) as bar:
        for epoch in range(len(history), epochs):
            model.train()
            started = time.perf_counter()
            totals: dict[str, float] = {}
            seen = scored = correct = 0
            try:
                for batch, (x, y) in enumerate(loader):
                    bar.note(batch=f"{batch + 1}/{len(loader)}")
                    x, y = x.to(device), y.to(device)
                    progress = (epoch + batch / len(loader)) / epochs
                    step = _step(method, model, optimizer, x, y, progress, training["grad_clip"])
                    for key, value in {"loss": step.loss.item(), **step.stats}.items():
                        totals[key] = totals.get(key, 0.0) + value * len(y)
                    if step.logits is not None:
                        correct += int((step.logits.argmax(1) == y).sum())
                        scored += len(y)
                    seen += len(y)
            except Diverged as error:
                status, message = "diverged", str(error)
                log.error("training diverged: %s", error)
                break
            scheduler.step()
            entry = {
                "epoch": epoch + 1,
                "seconds": time.perf_counter() - started,
                "lr": optimizer.param_groups[0]["lr"],
                **({"train_accuracy": correct / scored} if scored else {}),
                **{k: v / seen for k, v in totals.items()},
            }
            history.append(entry)
            bar.update(**{k: v for k, v in entry.items() if k != "epoch"})
            checkpoint = {
                "config_hash": chash,
                "epochs": epochs,
                "history": history,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "method": method.state_dict(),
                "loader_rng": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            if device.type == "cuda":
                checkpoint["cuda_rng"] = torch.cuda.get_rng_state(device)
            save_tensors(checkpoint_path, checkpoint)

    if status == "ok":
        method.finish(model)
    seconds = [h["seconds"] for h in history]
    record = {
        "status": status,
        "message": message,
        "config": dict(run_config),
        "config_hash": chash,
        "epochs": epochs,
        "epochs_completed": len(history),
        "resumed_from_epoch": resumed_from,
        "history": history,
        "cost": {
            "seconds_per_epoch": float(np.mean(seconds)) if seconds else None,
            "train_seconds": float(np.sum(seconds)),
            "peak_memory_mb": peak_memory_mb(device),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "provenance": provenance(device, chash),
    }
    save_tensors(out / "model.pt", model.state_dict())
    write_json(out / "train.json", record)
    return record


def _load_checkpoint(path: Path, chash: str, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None; a corrupt, foreign or stale one is refused and ignored."""
    if not path.exists():
        return None
    try:
        state = load_tensors(path, map_location=device)
    except CorruptFileError as error:
        log.warning("not resuming: %s; training from scratch", error)
        return None
    if state.get("config_hash") != chash:
        log.warning("not resuming: %s was written for another configuration; training from scratch", path)
        return None
    return state
