"""Every kind of plug-in has one shape: one registry class, one discovery rule, one way to declare
parameters; every registered certificate is tested here, and a certificate, an attack and a data set
added as one file each to a copy of the repository are found and used with no other edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from repo_copy import copy_of_the_repository

from certbench.attacks import ATTACKS, Attack
from certbench.certificates import CERTIFICATES, CERTIFIED
from certbench.config import check_params
from certbench.data import DATASETS
from certbench.data.loaders import load_split
from certbench.evaluate import selected_certificates
from certbench.method import METHODS
from certbench.models import ARCHITECTURES, build
from certbench.registry import Registry

REPO = Path(__file__).resolve().parents[1]
REGISTRIES: dict[str, Registry[Any]] = {
    "method": METHODS,
    "architecture": ARCHITECTURES,
    "certificate": CERTIFICATES,
    "attack": ATTACKS,
}
DECLARED = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


@pytest.mark.parametrize(("kind", "name"), DECLARED)
def test_every_plug_in_declares_its_parameters_typed_and_with_valid_defaults(kind: str, name: str) -> None:
    schema = REGISTRIES[kind].get(name).params_schema
    for key, declared in schema.items():
        assert "default" in declared, f"{kind} {name}: parameter {key} has no default"
        assert "type" in declared or "enum" in declared, f"{kind} {name}: parameter {key} has no type"
    defaults = {key: declared["default"] for key, declared in schema.items()}
    assert check_params(schema, {}, f"{name}.") == defaults


def _module_of(plugin: Any) -> str:
    """The module that registered ``plugin``: a class's own, or that of the function it wraps."""
    if isinstance(plugin, type):
        return plugin.__module__
    fields = ("builder", "runner", "loader")
    function = next(getattr(plugin, field) for field in fields if hasattr(plugin, field))
    return function.__module__


@pytest.mark.parametrize("registry", [*REGISTRIES.values(), DATASETS], ids=lambda r: r.kind)
def test_every_registry_finds_its_plug_ins_in_the_modules_of_its_own_package(registry: Registry[Any]) -> None:
    modules = {_module_of(registry.get(name)) for name in registry.names()}
    assert modules and all(m.startswith(registry.package + ".") for m in modules), modules
    assert not any(m.rsplit(".", 1)[1].startswith("_") for m in modules), "a _module is never discovered"


@pytest.fixture(scope="module")
def small_models() -> tuple[torch.Tensor, torch.Tensor, list[torch.nn.Module]]:
    """64 test points of the 2-D rings problem and two small untrained models of different families
    (a ReLU MLP and an ℓ∞-dist net): every certificate applies to one of them."""
    torch.manual_seed(0)
    spec, (_, test) = load_split("rings2d")
    models = [build("mlp", spec, widths=[16]), build("linf-dist-mlp", spec, depth=2, width=16)]
    for model in models:
        model.eval()
    x, y = test.tensors
    return x[:64], y[:64], models


@pytest.mark.parametrize("name", CERTIFICATES.names())
def test_every_certificate_is_never_beaten_by_pgd(small_models, name: str) -> None:
    """A point certified at ε is one that PGD (20 steps, in the certificate's norm) never flips at ε."""
    x, y, models = small_models
    certificate = CERTIFICATES.get(name)()
    model = next((m for m in models if certificate.refusal(m) is None), None)
    assert model is not None, f"certificate '{name}' applies to none of the small models"
    eps = [0.02, 0.05]
    result = certificate.certify(model, x, y, eps)
    certified_somewhere = False
    for e in eps:
        certified = result.status[e] == CERTIFIED
        flipped = Attack(f"pgd-{certificate.norm}", steps=20).run(model, x, y, e, seed=0).success
        assert not (certified & flipped).any(), f"{name} certifies points that PGD flips at ε = {e}"
        certified_somewhere |= bool(certified.any())
    assert certified_somewhere, f"{name} certifies nothing: the check above would pass vacuously"


def test_all_selects_every_certificate_but_the_opt_in_ones_which_may_be_named_besides() -> None:
    opt_in = [name for name in CERTIFICATES.names() if not CERTIFICATES.get(name).in_all]
    assert "alpha-crown" in opt_in
    default = selected_certificates(["all"])
    assert sorted(default + opt_in) == CERTIFICATES.names() and not set(default) & set(opt_in)
    assert selected_certificates(["all", "alpha-crown"]) == default + ["alpha-crown"]
    assert selected_certificates(["crown", "alpha-crown"]) == ["crown", "alpha-crown"]


# --- one new file of each kind in a copy of the repository -------------------------------------------

NEW_DATA_SET = '''
"""Two classes of points in opposite corners of the unit square (a throwaway data set)."""

import numpy as np

from certbench.data.loaders import tensors
from certbench.data.specs import DatasetSpec, register_dataset


@register_dataset(DatasetSpec("corners2d", (1, 1, 2), 2, (0.5,), (0.3,), (0.05,), (0.05,), "generated"))
def load(data_dir, download):
    rng = np.random.default_rng(0)
    parts = []
    for n in (200, 40):
        labels = rng.integers(0, 2, n)
        points = 0.25 * rng.random((n, 2)) + 0.75 * labels[:, None]
        parts.append(tensors(points.reshape(-1, 1, 1, 2).astype(np.float32), labels))
    return parts[0], parts[1]
'''

NEW_CERTIFICATE = '''
"""A certificate that certifies nothing (sound, useless): a throwaway plug-in."""

import numpy as np

from certbench.certificates import Certificate, CertificateResult, register_certificate, statuses_from_radius


@register_certificate("nothing-l2")
class Nothing(Certificate):
    norm = "l2"
    params_schema = {"radius": {"type": "number", "minimum": 0, "maximum": 0, "default": 0.0}}

    def _refusal(self, model):
        return None

    def certify(self, model, x, y, eps):
        radius = np.full(len(x), self.radius)
        status = statuses_from_radius(radius, np.ones(len(x), bool), eps)
        return CertificateResult(radius=radius, status=status)
'''

NEW_ATTACK = '''
"""Random corners of the ℓ∞ ball (a throwaway attack)."""

import torch

from certbench.attacks.base import register_attack, steps


@register_attack("corners-linf", norm="linf", kind="eps", params_schema={"tries": steps(4)})
def corners_linf(model, x, y, eps, s):
    """The first of ``tries`` random corners of the ε-ball that the model misclassifies."""
    best = x.clone()
    for _ in range(s["tries"]):
        candidate = (x + eps * torch.randn_like(x).sign()).clamp(0, 1)
        wrong = model(candidate).argmax(1) != y
        best[wrong] = candidate[wrong]
    return best
'''

SCRIPT = """
import json, sys
from pathlib import Path
import yaml
from certbench import config as cfg
from certbench.attacks import ATTACKS
from certbench.catalogue import check_config
from certbench.certificates import CERTIFICATES
from certbench.data import DATASETS
from certbench.evaluate import attack, certify
from certbench.train import train

checked = check_config(yaml.safe_load(Path("config/test.yaml").read_text()))
run_config = cfg.resolve_run(checked, cfg.runs(checked)[0])
run_dir = Path(sys.argv[1])
trained = train(run_config, run_dir)
certified = certify(run_config, run_dir, run_dir / "certify.json")
attacked = attack(run_config, run_dir, run_dir / "attack.json")
print(json.dumps({"datasets": DATASETS.names(), "certificates": CERTIFICATES.names(),
                  "attacks": ATTACKS.names(),
                  "train": trained["status"], "certify": sorted(certified["certificates"]),
                  "nothing": certified["certificates"]["nothing-l2"]["applicable"],
                  "attack": sorted(e["attack"] for e in attacked["evaluations"])}))
"""


def test_a_new_certificate_attack_and_data_set_each_take_one_file(tmp_path: Path) -> None:
    repo = copy_of_the_repository(tmp_path / "repo")
    (repo / "certbench" / "data" / "corners2d.py").write_text(NEW_DATA_SET)
    (repo / "certbench" / "certificates" / "nothing.py").write_text(NEW_CERTIFICATE)
    (repo / "certbench" / "attacks" / "corners.py").write_text(NEW_ATTACK)
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["datasets"] = {"corners2d": {"test_size": 16, "train_size": 100}}
    config["training"]["epochs"] = 1
    config["evaluation"] = {
        "batch_size": 16,
        "certificates": ["nothing-l2", "lipschitz-l2"],
        "certificate_params": {"nothing-l2": {"radius": 0.0}},
        "attacks": ["corners-linf"],
        "attack_params": {"corners-linf": {"tries": 2}},
    }
    (repo / "config" / "test.yaml").write_text(yaml.safe_dump(config))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=300)

    check = run("-m", "certbench", "check-config", "config/test.yaml")
    assert check.returncode == 0, check.stderr[-2000:]
    bad = run(
        "-m",
        "certbench",
        "check-config",
        "config/test.yaml",
        "--config",
        "evaluation.attack_params.corners-linf.tries=0",
    )
    assert bad.returncode != 0
    assert "evaluation.attack_params.corners-linf.tries: 0 is less than the minimum of 1" in bad.stderr
    used = run("-c", SCRIPT, str(tmp_path / "run"))
    assert used.returncode == 0, used.stderr[-2000:]
    found = json.loads(used.stdout.strip().splitlines()[-1])
    assert "corners2d" in found["datasets"] and "nothing-l2" in found["certificates"]
    assert "corners-linf" in found["attacks"]
    assert found["train"] == "ok" and found["certify"] == ["lipschitz-l2", "nothing-l2"] and found["nothing"]
    assert found["attack"] == ["corners-linf"]
    certificate = json.loads((tmp_path / "run" / "certify.json").read_text())["certificates"]["nothing-l2"]
    assert certificate["status"] and not any(CERTIFIED in list(s) for s in certificate["status"].values())
