"""Configuration: schema defaults, one-line errors naming the key, pins kept in step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from certbench import config as cfg
from certbench.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_filled(smoke_config: dict) -> None:
    filled = cfg.validate_schema(smoke_config)
    assert filled["training"]["optimizer"] == "adam"
    assert filled["training"]["lr_schedule"] == {
        "type": "constant",
        "milestones": [],
        "gamma": 0.1,
        "start_epoch": 0,
    }
    assert filled["evaluation"]["audit_tolerance"] == 1e-4
    assert filled["experiments"][0]["name"] == "standard"
    assert smoke_config.get("data") is None  # the caller's dict is not modified


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda c: c["datasets"].update({"nope": {}}), "datasets.nope", "allowed: cifar10, digits"),
        (lambda c: c["datasets"]["digits"].update(eps_linf=[1.5]), "datasets.digits.eps_linf[0]", "maximum"),
        (lambda c: c["datasets"]["digits"].update(eps_linf=[-0.1]), "datasets.digits.eps_linf[0]", "minimum"),
        (lambda c: c["training"].update(epochs=0), "training.epochs", "minimum"),
        (lambda c: c.pop("seeds"), "<root>", "'seeds' is a required property"),
        (lambda c: c["training"].update(optimizer="rmsprop"), "training.optimizer", "adam"),
        (lambda c: c.update(bogus=1), "bogus", "unknown key; allowed: results_dir"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(
    smoke_config: dict, change, key: str, words: str
) -> None:
    change(smoke_config)
    with pytest.raises(ConfigError) as error:
        cfg.validate_schema(smoke_config)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(key + ":")
    assert words in message


def test_duplicate_experiment_names_are_refused(smoke_config: dict) -> None:
    smoke_config["experiments"].append(dict(smoke_config["experiments"][0]))
    with pytest.raises(
        ConfigError, match=r"experiments\[1\]\.name: 'standard' on 'mlp' and 'digits' repeats"
    ):
        cfg.validate_schema(smoke_config)


def test_runs_and_resolution(smoke_config: dict) -> None:
    smoke_config["seeds"] = [0, 1]
    smoke_config["experiments"].append(
        {"name": "wd", "method": "standard", "arch": "mlp", "training": {"weight_decay": 0.01}}
    )
    filled = cfg.validate_schema(smoke_config)
    runs = cfg.runs(filled)
    assert [r.path for r in runs] == [
        "digits/standard/mlp/seed0",
        "digits/standard/mlp/seed1",
        "digits/wd/mlp/seed0",
        "digits/wd/mlp/seed1",
    ]
    resolved = cfg.resolve_run(filled, runs[2])
    assert resolved["training"]["weight_decay"] == 0.01
    assert resolved["training"]["epochs"] == 2
    assert resolved["dataset"]["eps_linf"] == [0.1]
    assert cfg.config_hash(resolved) != cfg.config_hash(cfg.resolve_run(filled, runs[0]))


def _registry_check(config: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "certbench.catalogue", "check-config"],
        input=json.dumps(cfg.validate_schema(config)),
        capture_output=True,
        text=True,
        cwd=REPO,
    )


def test_registry_check_names_unknown_method_arch_and_parameters(smoke_config: dict) -> None:
    # One subprocess per bad value would cost seconds each; check_config is called in-process here
    # and through the subprocess once below.
    from certbench.catalogue import check_config

    for change, pattern in [
        (lambda e: e.update(method="nope"), r"method: unknown method 'nope'; known: .*standard"),
        (
            lambda e: e.update(arch="nope"),
            r"experiments\[0\]\.arch: unknown architecture 'nope'; allowed: .*mlp",
        ),
        (
            lambda e: e.update(arch_params={"depth": 3}),
            r"experiments\[0\]\.arch_params\.depth: unknown key; "
            r"allowed: widths, activation, input_pool",
        ),
        (lambda e: e.update(params={"c": 1}), r"experiments\[0\]\.params\.c: unknown key; allowed: none"),
    ]:
        config = json.loads(json.dumps(smoke_config))
        change(config["experiments"][0])
        with pytest.raises(ConfigError, match=pattern):
            check_config(config)
    config = json.loads(json.dumps(smoke_config))
    config["evaluation"] = {"attacks": ["nope"]}
    result = _registry_check(config)
    assert result.returncode == 2
    assert re.fullmatch(
        r"config error: evaluation\.attacks\[0\]: unknown attack 'nope'; allowed: .*",
        result.stderr.strip().splitlines()[-1],
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    ("where", "key"),
    [
        (
            lambda c, v: c["experiments"][0].update(params={"weight_decay": v}, method="weight-decay"),
            r"experiments\[0\]\.params\.weight_decay",
        ),
        (
            lambda c, v: c["experiments"][0].update(arch_params={"widths": [8, v]}),
            r"experiments\[0\]\.arch_params\.widths\[1\]",
        ),
        (
            lambda c, v: c["evaluation"].update(certificate_params={"lipsdp-l2": {"time_limit": v}}),
            r"evaluation\.certificate_params\.lipsdp-l2\.time_limit",
        ),
        (
            lambda c, v: c["evaluation"].update(attack_params={"cw-l2": {"stepsize": v}}),
            r"evaluation\.attack_params\.cw-l2\.stepsize",
        ),
    ],
)
def test_non_finite_parameters_refused_for_every_kind(
    smoke_config: dict, where, key: str, value: float
) -> None:
    """NaN and ±inf are refused in one place (:func:`certbench.config.check_params`) for every kind."""
    from certbench.catalogue import check_config

    config = json.loads(json.dumps(smoke_config))
    where(config, value)
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number, got {value}$"):
        check_config(config)


def test_parameters_of_every_kind_are_checked_with_one_line(smoke_config: dict) -> None:
    from certbench.catalogue import check_config

    for change, pattern in [
        (
            lambda c: c["evaluation"].update(certificate_params={"lipschitz-l2": {"batch_size": 0}}),
            r"evaluation\.certificate_params\.lipschitz-l2\.batch_size: 0 is less than the minimum of 1",
        ),
        (
            lambda c: c["evaluation"].update(certificate_params={"ibp": {"steps": 3}}),
            r"evaluation\.certificate_params\.ibp\.steps: unknown key; allowed: batch_size",
        ),
        (
            lambda c: c["evaluation"].update(attack_params={"pgd-l2": {"random_start": 1}}),
            r"evaluation\.attack_params\.pgd-l2\.random_start: 1 is not of type 'boolean'",
        ),
        (
            lambda c: c["experiments"][0].update(arch="wrn-16-4", arch_params={"dropout": 1.0}),
            r"experiments\[0\]\.arch_params\.dropout: 1\.0 is greater than or equal to the maximum of 1",
        ),
    ]:
        config = json.loads(json.dumps(smoke_config))
        change(config)
        with pytest.raises(ConfigError, match=pattern) as info:
            check_config(config)
        assert "\n" not in str(info.value)


def test_method_module_that_fails_to_import_is_named(tmp_path: Path, smoke_config: dict, monkeypatch) -> None:
    import methods
    from certbench.method import get_method

    broken = tmp_path / "broken_method.py"
    broken.write_text("import package_that_does_not_exist\n")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    with pytest.raises(
        ConfigError,
        match=r"methods\.broken_method failed to import: ModuleNotFoundError: "
        r"No module named 'package_that_does_not_exist'",
    ):
        get_method("broken-method")


def _pins_from_pyproject() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(.+)", p).groups() for p in pins)


def test_environment_yml_pins_match_pyproject() -> None:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = dict(re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(.+)", p).groups() for p in pip_section)
    assert conda_pins == _pins_from_pyproject()
    # auto-LiRPA 0.3 requires torch<1.13 in its metadata: listed, `conda env create` fails at the
    # pip step; it is installed afterwards with --no-deps, as scripts/install.sh does.
    assert not any(p.lower().startswith(("auto-lirpa", "auto_lirpa")) for p in pip_section)
    assert "pip install --no-deps auto-LiRPA==0.3" in (REPO / "environment.yml").read_text()
    assert "--no-deps auto-LiRPA==0.3" in (REPO / "scripts/install.sh").read_text()


@pytest.mark.parametrize("path", sorted((REPO / "config").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    from certbench.catalogue import check_config

    checked = check_config(yaml.safe_load(path.read_text()))
    assert cfg.runs(checked)
