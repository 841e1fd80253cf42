"""Configuration: JSON-schema validation with defaults, run enumeration, hashing.

Torch-free on purpose: the Snakefile imports this module while it builds the DAG.
Checks that need the registries of methods, architectures, certificates and attacks
(which import torch) run in a subprocess, :func:`certbench.catalogue.check_config`,
whose answer is cached per (config, source tree) so a no-op re-run stays fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from certbench.data.specs import DATASETS

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
SOURCE_DIRS = (REPO_ROOT / "certbench", REPO_ROOT / "methods")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key.

    Keys and values are echoed from the config, so control characters in them (a key with a
    newline) are escaped: the message stays one line whatever the config holds.
    """

    def __init__(self, message: str) -> None:
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


@dataclass(frozen=True, order=True)
class RunId:
    """One (data set, experiment, architecture, seed) cell of the benchmark."""

    dataset: str
    name: str
    arch: str
    seed: int

    @property
    def path(self) -> str:
        return f"{self.dataset}/{self.name}/{self.arch}/seed{self.seed}"


def _with_defaults(validator_class: type) -> type:
    """A validator that fills in ``default`` values while it validates (jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_FillingValidator = _with_defaults(jsonschema.Draft202012Validator)


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(prefix: str, path: Iterator[Any]) -> str:
    key = prefix.rstrip(".")
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "<root>"


def validate_against(schema: Mapping[str, Any], instance: Any, prefix: str = "") -> Any:
    """Validate ``instance`` and return a copy with defaults filled; raise a one-line ConfigError."""
    filled = copy.deepcopy(instance)
    error = jsonschema.exceptions.best_match(_FillingValidator(schema).iter_errors(filled))
    if error is None:
        return filled
    path, message = list(error.absolute_path), error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        path.append(sorted(set(error.instance) - set(allowed))[0])
        message = f"unknown key; allowed: {', '.join(allowed) or 'none'}"
    raise ConfigError(f"{_key(prefix, path)}: {message}")


def validate_schema(config: Mapping[str, Any]) -> dict[str, Any]:
    """Schema checks and the torch-free name checks (data sets, unique experiment names)."""
    filled = validate_against(load_schema(), dict(config))
    known = DATASETS.names()
    for name in filled["datasets"]:
        if name not in known:
            raise ConfigError(f"datasets.{name}: unknown data set; allowed: {', '.join(known)}")
    seen: dict[tuple[str, str, str], int] = {}
    for index, entry in enumerate(filled["experiments"]):
        entry.setdefault("name", entry["method"])
        for dataset in entry.get("datasets", []):
            if dataset not in filled["datasets"]:
                raise ConfigError(f"experiments[{index}].datasets: '{dataset}' is not in datasets "
                                  f"({', '.join(filled['datasets'])})")
        for dataset in entry.get("datasets", filled["datasets"]):
            cell = (dataset, entry["name"], entry["arch"])
            if cell in seen:
                raise ConfigError(f"experiments[{index}].name: '{entry['name']}' on '{entry['arch']}' and "
                                  f"'{dataset}' repeats experiments[{seen[cell]}]; give one of them another name")
            seen[cell] = index
    return filled


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, merge ``overrides`` (top-level keys) and validate the schema."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    config.update(overrides or {})
    return validate_schema(config)


def runs(config: Mapping[str, Any]) -> list[RunId]:
    """Every (data set, experiment, architecture, seed) the config asks for."""
    return sorted(
        RunId(dataset, entry["name"], entry["arch"], seed)
        for dataset in config["datasets"]
        for entry in config["experiments"]
        if dataset in entry.get("datasets", config["datasets"])
        for seed in config["seeds"])


def experiment(config: Mapping[str, Any], run: RunId) -> dict[str, Any]:
    """The experiment entry behind ``run``."""
    for entry in config["experiments"]:
        if (entry["name"], entry["arch"]) == (run.name, run.arch) and \
                run.dataset in entry.get("datasets", config["datasets"]):
            return entry
    raise ConfigError(f"experiments: no experiment '{run.name}' on '{run.arch}' for '{run.dataset}'")


def resolve_run(config: Mapping[str, Any], run: RunId) -> dict[str, Any]:
    """Everything one run needs, with every default filled in: the unit that is hashed."""
    entry = experiment(config, run)
    spec = DATASETS.get(run.dataset)
    dataset_cfg = dict(config["datasets"][run.dataset])
    dataset_cfg.setdefault("eps_linf", list(spec.eps_linf))
    dataset_cfg.setdefault("eps_l2", list(spec.eps_l2))
    schema = load_schema()
    training = {**config["training"], **entry.get("training", {})}
    training = validate_against(schema["$defs"]["training"] | {"$defs": schema["$defs"]}, training,
                                f"experiments[{run.name}].training.")
    schedule = training["lr_schedule"]
    if schedule["type"] == "cosine" and schedule["start_epoch"] >= training["epochs"]:
        raise ConfigError(f"experiments[{run.name}].training.lr_schedule.start_epoch: {schedule['start_epoch']} "
                          f"leaves no epoch of the {training['epochs']} to decay over")
    return {
        "run": {"dataset": run.dataset, "name": run.name, "arch": run.arch, "seed": run.seed},
        "dataset": {"name": run.dataset, **dataset_cfg},
        "data": dict(config["data"]),
        "device": config["device"],
        "method": entry["method"],
        "params": dict(entry["params"]),
        "arch_params": dict(entry["arch_params"]),
        "training": training,
        "evaluation": dict(config["evaluation"]),
    }


def format_eps(eps: float) -> str:
    """ε as it appears in column and key names (``f"{eps:g}"``, 6 significant digits).

    Certificates, attacks, summaries and the audit pair their columns by this text, so all of
    them format ε here.
    """
    return f"{float(eps):g}"


def config_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_fingerprint() -> str:
    entries = []
    for folder in SOURCE_DIRS:
        for path in sorted(folder.rglob("*.py")):
            stat = path.stat()
            entries.append((str(path.relative_to(REPO_ROOT)), stat.st_mtime_ns, stat.st_size))
    return config_hash(entries)


def validate(config: Mapping[str, Any], cache_dir: str | Path = ".snakemake/certbench") -> dict[str, Any]:
    """Full validation for the Snakefile: schema here, registry checks in a cached subprocess.

    Returns the config with every default filled in (method parameters included).
    """
    filled = validate_schema(config)
    cache = Path(cache_dir) / f"config-{config_hash([filled, _source_fingerprint()])}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    result = subprocess.run([sys.executable, "-m", "certbench.catalogue", "check-config"],
                            input=json.dumps(filled), capture_output=True, text=True,
                            cwd=REPO_ROOT, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = lines[-1].removeprefix("config error: ") if lines else f"registry check failed (exit {result.returncode})"
        raise ConfigError(message)
    checked = json.loads(result.stdout)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(checked))
    os.replace(tmp, cache)
    return checked
