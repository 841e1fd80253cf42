"""Registry-aware configuration checks, run in a subprocess by :func:`certbench.config.validate`.

``python -m certbench.catalogue check-config`` reads a schema-valid config as JSON on
stdin, checks every name against the registries, validates each method's parameters
against its ``params_schema`` (filling defaults) and runs each method's own
``check()``; it prints the filled config on stdout, or one line on stderr and exits 2.
``python -m certbench.catalogue list`` prints what is registered.
"""

from __future__ import annotations

import inspect
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
from certbench.method import METHODS, get_method, import_methods, run_context
from certbench.models import ARCHITECTURES


def params_schema(method: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "properties": get_method(method).params_schema}


def _check_names(kind: str, names: list[str], known: list[str], key: str) -> None:
    for index, name in enumerate(names):
        if name not in known and not (kind == "certificate" and name == "all"):
            raise ConfigError(f"{key}[{index}]: unknown {kind} '{name}'; allowed: {', '.join(known)}")


def _check_params(key: str, function: Any, params: Mapping[str, Any]) -> None:
    accepted = [p.name for p in inspect.signature(function).parameters.values()
                if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "spec"))]
    for name in params:
        if name not in accepted:
            raise ConfigError(f"{key}.{name}: unknown parameter; allowed: {', '.join(accepted) or 'none'}")


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Registry checks on a schema-valid config; returns it with method defaults filled."""
    checked = cfg.validate_schema(config)
    for index, entry in enumerate(checked["experiments"]):
        key = f"experiments[{index}]"
        get_method(entry["method"])
        entry["params"] = cfg.validate_against(params_schema(entry["method"]), entry["params"], f"{key}.params.")
        if entry["arch"] not in ARCHITECTURES:
            raise ConfigError(f"{key}.arch: unknown architecture '{entry['arch']}'; "
                              f"allowed: {', '.join(ARCHITECTURES.names())}")
        _check_params(f"{key}.arch_params", ARCHITECTURES.get(entry["arch"]), entry["arch_params"])
    evaluation = checked["evaluation"]
    _check_names("certificate", evaluation["certificates"], CERTIFICATES.names(), "evaluation.certificates")
    _check_names("attack", evaluation["attacks"], ATTACKS.names(), "evaluation.attacks")
    for name, params in evaluation["certificate_params"].items():
        _check_names("certificate", [name], CERTIFICATES.names(), "evaluation.certificate_params")
        _check_params(f"evaluation.certificate_params.{name}", CERTIFICATES.get(name).__init__, params)
    for name, params in evaluation["attack_params"].items():
        _check_names("attack", [name], ATTACKS.names(), "evaluation.attack_params")
        settings = ATTACKS.get(name).settings
        for setting, value in params.items():
            if setting not in settings:
                raise ConfigError(f"evaluation.attack_params.{name}.{setting}: unknown setting; "
                                  f"allowed: {', '.join(settings)}")
            try:
                settings[setting].validate(name, setting, value)
            except ValueError as error:
                raise ConfigError(f"evaluation.attack_params.{name}.{setting}: {error}") from None
    for run in cfg.runs(checked):
        if run.seed != checked["seeds"][0]:
            continue  # the seed changes nothing that can be checked here
        resolved = cfg.resolve_run(checked, run)
        method = get_method(resolved["method"])(resolved["params"], run_context(resolved, torch.device("cpu")))
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
            raise ConfigError(f"{key}.arch_params: cannot build '{run.arch}' on {run.dataset}: {first_line}") from None
    return checked


def listing() -> dict[str, Any]:
    """Everything registered, with the import failures of method modules."""
    failures = import_methods()
    return {
        "datasets": DATASETS.names(),
        "architectures": ARCHITECTURES.names(),
        "methods": {name: {"default_certificate": METHODS.get(name).default_certificate,
                           "params": METHODS.get(name).params_schema} for name in METHODS.names()},
        "certificates": {name: CERTIFICATES.get(name).norm for name in CERTIFICATES.names()},
        "attacks": {name: {"norm": ATTACKS.get(name).norm, "kind": ATTACKS.get(name).kind}
                    for name in ATTACKS.names()},
        "method_import_errors": failures,
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
        print(json.dumps(listing(), indent=2))
        return 0
    print("usage: python -m certbench.catalogue check-config|list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
