"""Registry-aware configuration checks, run in a subprocess by :func:`certbench.config.validate`.

``python -m certbench.catalogue check-config`` reads a schema-valid config as JSON on
stdin, checks every name against the registries, checks the parameters of every plug-in
against its ``params_schema`` (filling the methods' defaults) and runs each method's own
``check()``; it prints the filled config on stdout, or one line on stderr and exits 2.
``python -m certbench.catalogue list`` prints what is registered.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import torch

from certbench import config as cfg
from certbench.attacks import ATTACKS
from certbench.certificates import CERTIFICATES
from certbench.config import ConfigError
from certbench.data.specs import DATASETS
from certbench.method import METHODS, get_method, run_context
from certbench.models import ARCHITECTURES
from certbench.registry import PluginImportError, Registry, UnknownNameError


def params_schema(method: str) -> dict[str, Any]:
    """The JSON schema of ``method``'s parameters as one object
    (:func:`certbench.config.validate_against`)."""
    return {"type": "object", "additionalProperties": False, "properties": get_method(method).params_schema}


def _known(registry: Registry[Any], name: str, key: str) -> Any:
    """The plug-in ``name`` of ``registry``, or a one-line ConfigError at ``key``."""
    try:
        return registry.get(name)
    except (UnknownNameError, PluginImportError) as error:
        raise ConfigError(f"{key}: {error}".replace("; known: ", "; allowed: ")) from None


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Registry checks on a schema-valid config; returns it with method defaults filled.

    Every plug-in's parameters are checked against its ``params_schema`` here
    (:func:`certbench.config.check_params`); only the methods' filled parameters are kept in the
    config (they are part of the run's hash), the others are filled again where they are used.
    """
    checked = cfg.validate_schema(config)
    for index, entry in enumerate(checked["experiments"]):
        key = f"experiments[{index}]"
        entry["params"] = cfg.check_params(
            get_method(entry["method"]).params_schema, entry["params"], f"{key}.params."
        )
        architecture = _known(ARCHITECTURES, entry["arch"], f"{key}.arch")
        cfg.check_params(architecture.params_schema, entry["arch_params"], f"{key}.arch_params.")
    evaluation = checked["evaluation"]
    for index, name in enumerate(evaluation["certificates"]):
        if name != "all":
            _known(CERTIFICATES, name, f"evaluation.certificates[{index}]")
    for index, name in enumerate(evaluation["attacks"]):
        _known(ATTACKS, name, f"evaluation.attacks[{index}]")
    for name, params in evaluation["certificate_params"].items():
        certificate = _known(CERTIFICATES, name, f"evaluation.certificate_params.{name}")
        cfg.check_params(certificate.params_schema, params, f"evaluation.certificate_params.{name}.")
    for name, params in evaluation["attack_params"].items():
        attack = _known(ATTACKS, name, f"evaluation.attack_params.{name}")
        cfg.check_params(attack.params_schema, params, f"evaluation.attack_params.{name}.")
    for run in cfg.runs(checked):
        if run.seed != checked["seeds"][0]:
            continue  # the seed changes nothing that can be checked here
        resolved = cfg.resolve_run(checked, run)
        method = get_method(resolved["method"])(
            resolved["params"], run_context(resolved, torch.device("cpu"))
        )
        key = f"experiments[{run.name}]"
        try:
            method.check()
            method.prepare(method.build_model(run.arch, resolved["arch_params"]))
        except ConfigError as error:
            raise ConfigError(f"{key}.{error}") from None
        except (ValueError, TypeError, NotImplementedError) as error:
            raise ConfigError(f"{key} on {run.dataset} with arch '{run.arch}': {error}") from None
        except (RuntimeError, MemoryError, OverflowError) as error:  # e.g. a width too large to allocate
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"{key}.arch_params: cannot build '{run.arch}' on {run.dataset}: {first_line}"
            ) from None
    return checked


def listing() -> dict[str, Any]:
    """Everything registered, with the declaration of every plug-in's parameters."""
    return {
        "datasets": DATASETS.names(),
        "architectures": {
            name: {"params": ARCHITECTURES.get(name).params_schema} for name in ARCHITECTURES.names()
        },
        "methods": {
            name: {
                "default_certificate": METHODS.get(name).default_certificate,
                "params": METHODS.get(name).params_schema,
            }
            for name in METHODS.names()
        },
        "certificates": {
            name: {"norm": CERTIFICATES.get(name).norm, "params": CERTIFICATES.get(name).params_schema}
            for name in CERTIFICATES.names()
        },
        "attacks": {
            name: {
                "norm": ATTACKS.get(name).norm,
                "kind": ATTACKS.get(name).kind,
                "params": ATTACKS.get(name).params_schema,
            }
            for name in ATTACKS.names()
        },
    }


def main(argv: list[str]) -> int:
    if argv == ["check-config"]:
        try:
            print(json.dumps(check_config(json.load(sys.stdin))))
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        return 0
    if argv == ["list"]:
        try:
            print(json.dumps(listing(), indent=2))
        except PluginImportError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m certbench.catalogue check-config|list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
