"""Models trained elsewhere: a state dict with a registered architecture, or an ONNX file.

An external model is a run of its own (method and architecture ``external``, seed 0) in the same
layout as a trained run, ``<results>/<dataset>/<name>/external/seed0/``, so the same certify,
attack, record and audit steps run on it and it appears in every table and figure. Its "training"
is :func:`import_model`: read the file, check it, write ``model.pt`` (the state dict, or the ONNX
file's bytes as a uint8 tensor, so the run keeps its own hash-checked copy) and ``train.json``
(status ``ok``, or ``refused`` with one line that names the file and what is wrong; the DAG goes
on with the other models).

An ONNX file is converted with onnx2torch, whose module classes no certificate knows, so it is
mapped onto certbench's own layers when it is a plain chain of supported operators
(:data:`LAYER_OPERATORS`): normalisation as ``Sub``/``Div`` by per-channel constants →
:class:`~certbench.nn.Normalize`, ``Conv`` → ``nn.Conv2d``, ``Gemm`` → ``nn.Linear``, ``Relu``,
``Tanh``, ``Flatten`` (axis 1), weights copied. Otherwise the converted module is kept: attacks
run on it, and the certificates, which accept layers by exact type only, refuse it. Either way
the model is checked against onnxruntime on sample inputs and refused when a logit differs by
more than :data:`TOLERANCE` · max(1, largest |logit|).

The config part (:func:`external_runs`, :func:`resolve_external`) is torch-free: the Snakefile
uses it while it builds the DAG, so torch, onnx and the rest are imported inside the functions
that need them.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certbench.config import ConfigError, RunId, config_hash, dataset_settings
from certbench.data.specs import DATASETS, DatasetSpec
from certbench.storage import sha256_bytes, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: The architecture, method and seed of every external run.
EXTERNAL = "external"
SEED = 0
#: Largest logit difference to onnxruntime accepted, relative to max(1, largest |logit|).
TOLERANCE = 1e-4
#: Random inputs in [0, 1] the conversion is checked on, besides the run's test points.
CHECK_SAMPLES = 64
#: ONNX operators that map onto certbench layers (a plain chain of them).
LAYER_OPERATORS = ("Sub", "Div", "Conv", "Gemm", "Relu", "Tanh", "Flatten")


class ExternalModelError(ValueError):
    """A model file that cannot be used; the message is one line naming the file."""


# ---------------------------------------------------------------------------------------------
# config: torch-free
# ---------------------------------------------------------------------------------------------


def external_entries(config: Mapping[str, Any]) -> dict[RunId, dict[str, Any]]:
    """The config's ``external`` entries by run; a ConfigError names a bad entry's key."""
    entries: dict[RunId, dict[str, Any]] = {}
    for index, entry in enumerate(config.get("external", [])):
        key = f"external[{index}]"
        if entry["dataset"] not in config["datasets"]:
            raise ConfigError(
                f"{key}.dataset: '{entry['dataset']}' is not in datasets ({', '.join(config['datasets'])})"
            )
        if ("onnx" in entry) == ("state_dict" in entry):
            raise ConfigError(f"{key}: give either onnx or state_dict (with arch), not both or neither")
        if "state_dict" in entry and "arch" not in entry:
            raise ConfigError(f"{key}.arch: a state_dict needs the registered architecture it belongs to")
        if "onnx" in entry and ("arch" in entry or entry.get("arch_params")):
            raise ConfigError(f"{key}.arch: an ONNX file carries its own architecture; drop arch")
        run = RunId(entry["dataset"], entry["name"], EXTERNAL, SEED)
        if run in entries:
            raise ConfigError(f"{key}.name: '{entry['name']}' on '{entry['dataset']}' repeats another entry")
        entries[run] = dict(entry)
    return entries


def external_runs(config: Mapping[str, Any]) -> list[RunId]:
    """Every external model of the config, as a run."""
    return sorted(external_entries(config))


def model_file(entry: Mapping[str, Any]) -> str:
    """The file an external entry reads: its ONNX file or its state dict."""
    return str(entry.get("onnx", entry.get("state_dict")))


def resolve_external(config: Mapping[str, Any], run: RunId) -> dict[str, Any]:
    """The resolved config (``run.json``) of an external model: what a trained run's has for its
    data set, data, device and evaluation, and the model's source under ``external``."""
    entry = external_entries(config)[run]
    source = (
        {"onnx": entry["onnx"]}
        if "onnx" in entry
        else {
            "state_dict": entry["state_dict"],
            "arch": entry["arch"],
            "arch_params": entry.get("arch_params", {}),
        }
    )
    return {
        "run": {"dataset": run.dataset, "name": run.name, "arch": EXTERNAL, "seed": SEED},
        "dataset": dataset_settings(config, run.dataset),
        "data": dict(config["data"]),
        "device": config["device"],
        "method": EXTERNAL,
        "external": source,
        "evaluation": dict(config["evaluation"]),
    }


# ---------------------------------------------------------------------------------------------
# loading and checking
# ---------------------------------------------------------------------------------------------


def first_line(error: BaseException) -> str:
    """``error`` as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def read_state_dict(data: bytes, source: str) -> dict[str, Any]:
    """A state dict from a file's bytes, loaded with ``weights_only=True`` only (tensors, and the
    plain values of a layer's ``_extra_state``)."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any load failure refuses the file, in one line
        raise ExternalModelError(
            f"{source}: refused, it does not load with weights_only=True ({first_line(error)})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
        raise ExternalModelError(f"{source}: not a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def build_with_state(
    arch: str, arch_params: Mapping[str, Any], spec: DatasetSpec, state: Mapping[str, Any], source: str
) -> nn.Module:
    """The registered architecture for ``spec`` with ``state`` loaded strictly; a mismatch (missing or
    unexpected keys, other shapes, invalid Normalize buffers) is one line naming the file."""
    from certbench.models import build
    from certbench.registry import PluginImportError, UnknownNameError

    try:
        model = build(arch, spec, **arch_params)
    except (ConfigError, UnknownNameError, PluginImportError, ValueError, TypeError) as error:
        raise ExternalModelError(f"{source}: architecture '{arch}': {error}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as error:
        details = "; ".join(
            line.strip().rstrip(".")
            for line in str(error).splitlines()
            if line.strip() and not line.startswith("Error(s) in loading")
        )
        raise ExternalModelError(f"{source}: does not match architecture '{arch}': {details}") from None
    return model.eval()


def _onnx_operator(error: NotImplementedError) -> str:
    found = re.search(r"operation_type='([^']*)', version=(\d+)", str(error))
    return f"operator {found[1]} (version {found[2]})" if found else first_line(error)


def convert_onnx(data: bytes, source: str, channels: int) -> tuple[nn.Module, str | None]:
    """The ONNX model as torch modules, and why certificates do not apply (None when they may).

    The model is a ``nn.Sequential`` of certbench layers when the graph is a plain chain of
    :data:`LAYER_OPERATORS`, else onnx2torch's module, with the reason naming the operator.
    """
    import onnx
    import onnx2torch

    try:
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
    except Exception as error:  # noqa: BLE001 - protobuf and checker errors vary; all refuse the file
        raise ExternalModelError(f"{source}: not a valid ONNX model ({first_line(error)})") from None
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ExternalModelError(
            f"{source}: the graph has {len(inputs)} inputs and {len(proto.graph.output)} outputs; "
            f"one of each (images in, logits out) is needed"
        )
    try:
        converted = onnx2torch.convert(proto)
    except NotImplementedError as error:
        raise ExternalModelError(f"{source}: onnx2torch cannot convert {_onnx_operator(error)}") from None
    except Exception as error:  # noqa: BLE001 - a converter that fails on a node refuses the file
        raise ExternalModelError(f"{source}: onnx2torch failed ({first_line(error)})") from None
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPERATORS:
            return converted.eval(), (
                f"{source}: operator {node.op_type} (node '{node.name}') has no certbench layer "
                f"(certbench maps {', '.join(LAYER_OPERATORS)}); attacks only"
            )
    layers = certbench_layers(converted, channels)
    if isinstance(layers, str):
        return converted.eval(), f"{source}: {layers}; attacks only"
    return layers.eval(), None


def _per_channel(value: torch.Tensor, channels: int) -> torch.Tensor | None:
    """A constant that broadcasts per channel over (B, C, H, W) images, as ``channels`` values, or None."""
    if value.dim() > 4:
        return None
    if value.numel() == 1:
        return value.reshape(1).expand(channels)
    if value.dim() >= 3 and value.shape[-3] == channels and value.numel() == channels:
        return value.reshape(channels)
    return None


def certbench_layers(converted: torch.fx.GraphModule, channels: int) -> nn.Sequential | str:
    """onnx2torch's module as a ``nn.Sequential`` of certbench layers, weights copied, or why it is
    not a plain chain of them (naming the node). ``channels``: the input's channel count."""
    import torch
    from onnx2torch.node_converters.binary_math_operations import (
        _TORCH_FUNCTION_FROM_ONNX_TYPE as BINARY,
    )
    from torch import nn

    from certbench.nn import Normalize

    operation_of = {function: name for name, function in BINARY.items()}
    constants: dict[str, torch.Tensor] = {}
    normalisation: dict[str, torch.Tensor] = {}
    layers: list[nn.Module] = []
    current = None
    for node in converted.graph.nodes:
        where = f"node '{node.target}'"
        if node.op == "placeholder" and current is None:
            current = node
            continue
        if node.op == "get_attr":
            constants[node.name] = functools.reduce(getattr, str(node.target).split("."), converted)
            continue
        if node.op == "output":
            if node.args != (current,):
                return f"the graph's output is not the end of the chain ({where})"
            break
        if node.op != "call_module" or node.kwargs or not node.args or node.args[0] is not current:
            return f"the graph is not a plain chain of layers at {where} ({node.op})"
        module = converted.get_submodule(str(node.target))
        kind = type(module)
        if kind.__name__ == "OnnxBinaryMathOperation" and not layers:
            operation = operation_of.get(module.math_op_function)
            constant = constants.get(getattr(node.args[-1], "name", "")) if len(node.args) == 2 else None
            value = None if constant is None else _per_channel(constant.detach(), channels)
            if operation not in ("Sub", "Div") or module.broadcast is not None or value is None:
                return f"{where} is not a normalisation (x - mean) / std by per-channel constants"
            if "std" in normalisation or operation in normalisation:
                return f"{where}: a second normalisation"
            normalisation["mean" if operation == "Sub" else "std"] = value
        elif kind is nn.Linear:
            layers.append(nn.Linear(module.in_features, module.out_features, bias=module.bias is not None))
            layers[-1].load_state_dict(module.state_dict())
        elif kind is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            layers.append(
                nn.Conv2d(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size,
                    stride=module.stride,
                    padding=module.padding,
                    dilation=module.dilation,
                    groups=module.groups,
                    bias=module.bias is not None,
                )
            )
            layers[-1].load_state_dict(module.state_dict())
        elif kind in (nn.ReLU, nn.Tanh):
            layers.append(kind())
        elif kind is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
            layers.append(nn.Flatten())
        else:
            return f"{where} ({kind.__name__}) has no certbench layer"
        current = node
    if normalisation:
        mean = normalisation.get("mean", torch.zeros(channels))
        std = normalisation.get("std", torch.ones(channels))
        try:
            layers.insert(0, Normalize(mean.tolist(), std.tolist()))
        except ValueError as error:  # a std that is not finite and positive
            return f"its normalisation is not a valid Normalize ({error})"
    return nn.Sequential(*layers)


def onnxruntime_difference(model: nn.Module, data: bytes, x: torch.Tensor) -> float:
    """The largest |logit| difference between ``model`` and onnxruntime on the ONNX file ``data``,
    relative to max(1, largest |logit| of onnxruntime)."""
    import numpy as np
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    (entry,) = session.get_inputs()
    batch = entry.shape[0] if isinstance(entry.shape[0], int) else len(x)
    inputs = x.cpu().numpy().astype(np.float32)
    expected = np.concatenate(
        [session.run(None, {entry.name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)]
    )
    with torch.no_grad():
        got = model(x).cpu().double().numpy()
    if got.shape != expected.shape:
        raise ExternalModelError(f"logits of shape {got.shape} where onnxruntime gives {expected.shape}")
    return float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def check_inputs(spec: DatasetSpec, points: torch.Tensor | None = None) -> torch.Tensor:
    """The inputs a conversion is checked on: :data:`CHECK_SAMPLES` seeded uniform images in [0, 1]
    of the data set's shape, after ``points`` (the run's test points) when given."""
    import torch

    noise = torch.rand(CHECK_SAMPLES, *spec.shape, generator=torch.Generator().manual_seed(0))
    return noise if points is None else torch.cat([points.cpu().float(), noise])


def onnx_model(
    data: bytes, source: str, spec: DatasetSpec, x: torch.Tensor
) -> tuple[nn.Module, str | None, float]:
    """:func:`convert_onnx`, checked against onnxruntime on ``x``: (model, why certificates do not
    apply or None, relative difference); a larger difference than :data:`TOLERANCE` refuses it."""
    model, reason = convert_onnx(data, source, spec.shape[0])
    try:
        difference = onnxruntime_difference(model, data, x)
    except ExternalModelError as error:
        raise ExternalModelError(f"{source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a model that does not run on the data set's images
        shape = tuple(spec.shape)
        raise ExternalModelError(
            f"{source}: does not run on {spec.name} images of shape {shape} ({first_line(error)})"
        ) from None
    if not difference <= TOLERANCE:
        raise ExternalModelError(
            f"{source}: the converted model differs from onnxruntime by {difference:.3g} (relative, "
            f"largest logit), above the tolerance {TOLERANCE:g}"
        )
    return model, reason, difference


def import_model(run_config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Read, check and store an external model: ``model.pt`` and ``train.json`` in ``out_dir``.

    ``train.json`` has the fields of a trained run's (no epochs, no history) and ``external``: the
    source, its SHA-256, the layers it runs as (``certbench`` or ``onnx2torch``), why certificates
    do not apply (or None) and the onnxruntime check. A model that cannot be used gets status
    ``refused`` and its one-line reason as ``message``.
    """
    import torch

    from certbench.evaluate import test_points
    from certbench.records import provenance, save_tensors
    from certbench.train import peak_memory_mb

    out = Path(out_dir)
    source = dict(run_config["external"])
    spec = DATASETS.get(run_config["dataset"]["name"])
    chash = config_hash(run_config)
    status, message, stored, parameters = "ok", "", {}, 0
    details: dict[str, Any] = {"source": source}
    try:
        path = model_file(source)
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ExternalModelError(f"{path}: cannot be read ({error.strerror})") from None
        details["sha256"] = sha256_bytes(data)
        if "onnx" in source:
            _, x, _ = test_points(run_config)
            model, reason, difference = onnx_model(data, path, spec, check_inputs(spec, x))
            stored = {"onnx": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
            details.update(
                layers="certbench" if reason is None else "onnx2torch",
                certificates=reason,
                onnxruntime={
                    "relative_difference": difference,
                    "tolerance": TOLERANCE,
                    "inputs": len(x) + CHECK_SAMPLES,
                },
            )
            if reason is not None:
                log.warning("certificates will not apply: %s", reason)
        else:
            model = build_with_state(
                source["arch"], source["arch_params"], spec, read_state_dict(data, path), path
            )
            stored = model.state_dict()
            details.update(layers="certbench", certificates=None)
        parameters = sum(p.numel() for p in model.parameters())
    except ExternalModelError as error:
        status, message, stored = "refused", str(error), {}
    record = {
        "status": status,
        "message": message,
        "config": dict(run_config),
        "config_hash": chash,
        "epochs": 0,
        "epochs_completed": 0,
        "resumed_from_epoch": None,
        "history": [],
        "cost": {
            "seconds_per_epoch": None,
            "train_seconds": 0.0,
            "peak_memory_mb": peak_memory_mb(torch.device("cpu")),
            "parameters": parameters,
        },
        "provenance": provenance(torch.device("cpu"), chash),
        "external": details,
    }
    save_tensors(out / "model.pt", stored)
    write_json(out / "train.json", record)
    return record


def load_imported(run_config: Mapping[str, Any], path: str | Path) -> nn.Module:
    """The model :func:`import_model` stored at ``path`` (hash-checked, ``weights_only=True``), on the
    CPU; an ONNX model is converted and checked against onnxruntime again."""
    from certbench.records import load_tensors

    spec = DATASETS.get(run_config["dataset"]["name"])
    source = run_config["external"]
    stored = load_tensors(path)
    if "onnx" in source:
        data = stored["onnx"].numpy().tobytes()
        return onnx_model(data, str(path), spec, check_inputs(spec))[0]
    return build_with_state(source["arch"], source["arch_params"], spec, stored, str(path))


def evaluate_model(run_config: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """``certbench evaluate``: import, certify, attack, record and audit one external model in
    ``out_dir`` (``run.json``, ``model.pt``, ``train.json``, ``certify.json``, ``attack.json``,
    ``record.json``, ``samples.csv``, ``audit.csv``), the files the DAG writes for a run. Returns
    the record, or the import record when the model was refused."""
    from certbench.audit import audit
    from certbench.collect import assemble
    from certbench.evaluate import attack, certify

    out = Path(out_dir)
    write_json(out / "run.json", run_config)
    imported = import_model(run_config, out)
    if imported["status"] != "ok":
        return imported
    certify(run_config, out, out / "certify.json")
    attack(run_config, out, out / "attack.json")
    record = assemble(
        out / "run.json",
        out / "train.json",
        out / "certify.json",
        out / "attack.json",
        out / "record.json",
        out / "samples.csv",
    )
    audit([out / "record.json"], out / "audit.csv")
    return record
