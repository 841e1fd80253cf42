"""Every registered method, through the real training and certification code.

Parametrised over the registry: a method module dropped into ``methods/`` is tested here
without a line of new test code.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from certbench import config as cfg
from certbench.catalogue import check_config
from certbench.certificates import CERTIFICATES
from certbench.config import ConfigError
from certbench.evaluate import certify
from certbench.method import METHODS, get_method
from certbench.storage import read_json
from certbench.train import train

ALL_METHODS = METHODS.names()  # raises, naming the module, when a method module fails to import


def smoke_run(smoke_config: dict, method: str, epochs: int = 2) -> dict:
    arch, arch_params = get_method(method).example_arch
    smoke_config["experiments"] = [{"method": method, "arch": arch, "arch_params": arch_params}]
    smoke_config["training"]["epochs"] = epochs
    smoke_config["evaluation"]["certificates"] = [get_method(method).default_certificate]
    checked = check_config(smoke_config)
    return cfg.resolve_run(checked, cfg.runs(checked)[0])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_and_its_default_certificate_applies(
    tmp_path: Path, smoke_config: dict, method: str
) -> None:
    run_config = smoke_run(smoke_config, method)
    record = train(run_config, tmp_path)
    assert record["status"] == "ok", record["message"]
    losses = [h["loss"] for h in record["history"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    result = certify(run_config, tmp_path, tmp_path / "certify.json")
    entry = result["certificates"][get_method(method).default_certificate]
    assert entry["applicable"], f"{method}'s default certificate does not apply to its own model"
    assert all(len(s) == len(result["samples"]["label"]) for s in entry["status"].values())
    assert read_json(tmp_path / "certify.json")["status"] == "ok"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_declares_a_registered_certificate_and_valid_defaults(method: str) -> None:
    cls = get_method(method)
    assert cls.default_certificate in CERTIFICATES, cls.default_certificate
    for name, schema in cls.params_schema.items():
        assert "default" in schema, f"{method}.params.{name} has no default"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_state_survives_a_checkpoint(tmp_path: Path, smoke_config: dict, method: str) -> None:
    """What ``state_dict`` returns loads with ``weights_only=True`` and restores the method."""
    from certbench.method import run_context
    from certbench.records import load_tensors, save_tensors

    run_config = smoke_run(smoke_config, method)
    instance = get_method(method)(run_config["params"], run_context(run_config, torch.device("cpu")))
    model = instance.build_model(run_config["run"]["arch"], run_config["arch_params"])
    instance.prepare(model)
    save_tensors(tmp_path / "state.pt", {"method": instance.state_dict()})
    instance.load_state_dict(load_tensors(tmp_path / "state.pt")["method"])


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'; known: .*standard"):
        get_method("nope")
