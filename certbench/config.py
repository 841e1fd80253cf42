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
import math
import numbers
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from certbench.data.specs import DATASETS
from certbench.registry import PluginImportError

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


def _plain(value: Any) -> Any:
    """``value`` with numbers of other types (numpy scalars) as Python ``int`` or ``float``."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _non_finite(value: Any, path: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], float] | None:
    """The path and value of the first NaN or ±inf number in ``value`` (nested lists and mappings)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, Mapping):
        items = value.items()
    else:
        items = enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, (*path, key))
        if found is not None:
            return found
    return None


def _as_declared(value: Any, declared: Mapping[str, Any]) -> Any:
    """An integral number where the declaration says ``integer`` (``50.0`` → 50), else ``value``."""
    if declared.get("type") == "integer" and isinstance(value, float):
        return int(value)
    return value


def check_params(
    schema: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any], key: str
) -> dict[str, Any]:
    """The parameters of one plug-in, checked against its declaration and with its defaults filled.

    ``schema`` is the plug-in's ``params_schema``: JSON-schema ``properties``, each with a ``type``
    and a ``default``. Every kind of plug-in (method, architecture, certificate, attack) declares
    its parameters this way and is checked here, before any job starts: unknown keys, wrong types
    and values out of range are refused with one line that names the key, and so are NaN and ±inf,
    which JSON schema's ``number`` would let through.
    """
    params = _plain(dict(params))
    found = _non_finite(params)
    if found is not None:
        raise ConfigError(f"{_key(key, iter(found[0]))}: must be a finite number, got {found[1]}")
    filled = validate_against(
        {"type": "object", "additionalProperties": False, "properties": dict(schema)}, params, key
    )
    return {name: _as_declared(value, schema.get(name, {})) for name, value in filled.items()}


def validate_schema(config: Mapping[str, Any]) -> dict[str, Any]:
    """Schema checks and the torch-free name checks (data sets, unique experiment names)."""
    filled = validate_against(load_schema(), dict(config))
    try:
        known = DATASETS.names()
    except PluginImportError as error:
        raise ConfigError(f"datasets: {error}") from None
    for name in filled["datasets"]:
        if name not in known:
            raise ConfigError(f"datasets.{name}: unknown data set; allowed: {', '.join(known)}")
    seen: dict[tuple[str, str, str], int] = {}
    for index, entry in enumerate(filled["experiments"]):
        entry.setdefault("name", entry["method"])
        for dataset in entry.get("datasets", []):
            if dataset not in filled["datasets"]:
                raise ConfigError(
                    f"experiments[{index}].datasets: '{dataset}' is not in datasets "
                    f"({', '.join(filled['datasets'])})"
                )
        for dataset in entry.get("datasets", filled["datasets"]):
            cell = (dataset, entry["name"], entry["arch"])
            if cell in seen:
                raise ConfigError(
                    f"experiments[{index}].name: '{entry['name']}' on '{entry['arch']}' and "
                    f"'{dataset}' repeats experiments[{seen[cell]}]; give one of them another name"
                )
            seen[cell] = index
    return filled


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing, unreadable or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read ({error})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from error
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of keys to values, not {type(config).__name__}"
        )
    return config


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, merge ``overrides`` into it (nested mappings merged key by key, as
    Snakemake merges ``--config``) and validate the schema."""
    return validate_schema(merge(read_config_file(path), overrides or {}))


# ---------------------------------------------------------------------------------------------
# `--config KEY=VALUE` overrides: typed values and dotted keys
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_KEY_PART = re.compile(r"[A-Za-z_][\w-]*")
_NULLS = ("null", "Null", "NULL", "~", "")


def typed_value(text: str) -> Any:
    """``text`` as a value in a YAML config file would read (``3`` → 3, ``[0, 1]`` → [0, 1],
    ``true``, ``null``), and ``1e-3`` as the number that YAML 1.1 leaves a string; text that is
    not valid YAML stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(text.strip()):
        return float(text)
    return value


def merge(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with ``overrides`` merged in: mappings key by key, anything else replaced
    (Snakemake's rule for ``--config``)."""
    merged = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(entries: Iterable[str], typed: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` strings as one nested mapping: ``training.epochs=3`` → {"training": {"epochs": 3}}.

    Values are typed as in a YAML config file (:func:`typed_value`) except where the schema wants
    text (``results_dir=001`` stays ``"001"``); ``typed=False`` leaves every value as its text.
    Later entries win, merged key by key.
    """
    overrides: dict[str, Any] = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        parts = key.split(".")
        if not sep or not all(_KEY_PART.fullmatch(part) for part in parts):
            raise ConfigError(
                f"--config {entry}: expected KEY=VALUE with KEY a name or dotted names "
                f"(seeds=[0], training.epochs=3)"
            )
        value: Any = text
        for part in reversed(parts):
            value = {part: value}
        overrides = merge(overrides, value)
    if not typed:
        return overrides
    schema = load_schema()
    return _typed_like_schema(overrides, schema, schema)


def _resolve(node: Any, root: Mapping[str, Any]) -> dict[str, Any]:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node if isinstance(node, dict) else {}


def _child(node: Any, key: str | int, root: Mapping[str, Any]) -> Any:
    node = _resolve(node, root)
    if isinstance(key, int):
        return node.get("items", {})
    if key in node.get("properties", {}):
        return node["properties"][key]
    extra = node.get("additionalProperties", {})
    return extra if isinstance(extra, dict) else {}


def _typed_like_schema(value: Any, node: Any, root: Mapping[str, Any]) -> Any:
    if isinstance(value, Mapping):
        return {key: _typed_like_schema(item, _child(node, key, root), root) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed_like_schema(item, _child(node, index, root), root) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value
    types = _resolve(node, root).get("type", [])
    types = [types] if isinstance(types, str) else types
    if "string" in types:  # text where the schema wants text; `null` where it also allows null
        return None if "null" in types and value in _NULLS else value
    return typed_value(value)


def type_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the values that came from Snakemake's ``--config`` typed as in a config file.

    Snakemake types only top-level values; inside ``[…]`` or ``{…}`` it leaves text (``seeds=[0]``
    arrives as ``["0"]``). Every text value in ``overrides`` is read as YAML unless the schema wants
    text at that place (``results_dir=001`` stays ``"001"``); ``config`` already holds ``overrides``
    merged in, so merging the typed copy again replaces the text.
    """
    schema = load_schema()
    return merge(config, _typed_like_schema(dict(overrides), schema, schema))


def runs(config: Mapping[str, Any]) -> list[RunId]:
    """Every (data set, experiment, architecture, seed) the config asks for."""
    return sorted(
        RunId(dataset, entry["name"], entry["arch"], seed)
        for dataset in config["datasets"]
        for entry in config["experiments"]
        if dataset in entry.get("datasets", config["datasets"])
        for seed in config["seeds"]
    )


def experiment(config: Mapping[str, Any], run: RunId) -> dict[str, Any]:
    """The experiment entry behind ``run``."""
    for entry in config["experiments"]:
        if (entry["name"], entry["arch"]) == (run.name, run.arch) and run.dataset in entry.get(
            "datasets", config["datasets"]
        ):
            return entry
    raise ConfigError(f"experiments: no experiment '{run.name}' on '{run.arch}' for '{run.dataset}'")


def dataset_settings(config: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """A run's ``dataset`` section: its name and the config's settings, the ε lists defaulting to the
    data set's own."""
    spec = DATASETS.get(dataset)
    settings = dict(config["datasets"][dataset])
    settings.setdefault("eps_linf", list(spec.eps_linf))
    settings.setdefault("eps_l2", list(spec.eps_l2))
    return {"name": dataset, **settings}


def resolve_run(config: Mapping[str, Any], run: RunId) -> dict[str, Any]:
    """Everything one run needs, with every default filled in: the unit that is hashed."""
    entry = experiment(config, run)
    schema = load_schema()
    training = {**config["training"], **entry.get("training", {})}
    training = validate_against(
        schema["$defs"]["training"] | {"$defs": schema["$defs"]},
        training,
        f"experiments[{run.name}].training.",
    )
    schedule = training["lr_schedule"]
    if schedule["type"] == "cosine" and schedule["start_epoch"] >= training["epochs"]:
        raise ConfigError(
            f"experiments[{run.name}].training.lr_schedule.start_epoch: {schedule['start_epoch']} "
            f"leaves no epoch of the {training['epochs']} to decay over"
        )
    return {
        "run": {"dataset": run.dataset, "name": run.name, "arch": run.arch, "seed": run.seed},
        "dataset": dataset_settings(config, run.dataset),
        "data": dict(config["data"]),
        "device": config["device"],
        "method": entry["method"],
        "params": dict(entry["params"]),
        "arch_params": dict(entry["arch_params"]),
        "training": training,
        "evaluation": dict(config["evaluation"]),
    }


def eps_by_norm(run_config: Mapping[str, Any]) -> dict[str, list[float]]:
    """The ε a resolved run evaluates, per norm: ``{"linf": [...], "l2": [...]}``."""
    return {"linf": list(run_config["dataset"]["eps_linf"]), "l2": list(run_config["dataset"]["eps_l2"])}


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
    # The registry checks read neither where results go nor what the scheduler is asked for, and
    # only the first seed's runs are built: configs that differ there share one check (and cache entry).
    probe = {key: value for key, value in filled.items() if key not in _NOT_CHECKED_BY_REGISTRIES}
    probe["seeds"] = filled["seeds"][:1]
    cache = Path(cache_dir) / f"config-{config_hash([probe, _source_fingerprint()])}.json"
    if cache.is_file():
        return _unprobe(json.loads(cache.read_text()), filled)
    result = subprocess.run(
        [sys.executable, "-m", "certbench.catalogue", "check-config"],
        input=json.dumps(probe),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = (
            lines[-1].removeprefix("config error: ")
            if lines
            else f"registry check failed (exit {result.returncode})"
        )
        raise ConfigError(message)
    checked = json.loads(result.stdout)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(checked))
    os.replace(tmp, cache)
    return _unprobe(checked, filled)


_NOT_CHECKED_BY_REGISTRIES = ("results_dir", "figures_dir", "resources")


def _unprobe(checked: dict[str, Any], filled: Mapping[str, Any]) -> dict[str, Any]:
    """The registry-checked config with the keys :func:`validate` left out of the check put back."""
    for key in (*_NOT_CHECKED_BY_REGISTRIES, "seeds"):
        checked[key] = copy.deepcopy(filled[key])
    return checked
