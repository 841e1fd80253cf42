"""Models from outside (state dicts, ONNX files) through `certbench evaluate`, and the ONNX/VNN-LIB export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from torch import nn

from certbench import cli
from certbench.config import ConfigError
from certbench.data.specs import DATASETS
from certbench.export import onnx_bytes, vnnlib_property
from certbench.external import (
    TOLERANCE,
    check_inputs,
    convert_onnx,
    external_entries,
    onnx_model,
    onnxruntime_difference,
)
from certbench.models import build
from certbench.nn import Normalize
from certbench.storage import read_json
from tests.repo_copy import copy_of_the_repository

SPEC = DATASETS.get("digits")
CONFIG = {
    "seeds": [0],
    "datasets": {"digits": {"eps_linf": [0.02, 0.1], "eps_l2": [0.25], "test_size": 24}},
    "experiments": [{"method": "standard", "arch": "mlp", "arch_params": {"widths": [16]}}],
    "evaluation": {
        "batch_size": 24,
        "certificates": ["lipschitz-l2", "ibp", "crown"],
        "attacks": ["pgd-linf", "deepfool-l2"],
        "attack_params": {"pgd-linf": {"steps": 5}, "deepfool-l2": {"steps": 10}},
    },
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def small_model() -> nn.Sequential:
    """A small untrained MLP of the registered architecture (seeded)."""
    torch.manual_seed(0)
    return build("mlp", SPEC, widths=[16]).eval()


def trained_model() -> nn.Sequential:
    """The small MLP after 300 steps of Adam on the digits training split."""
    from certbench.data.loaders import load_split

    model = small_model()
    _, (train_set, _) = load_split("digits", "data", False)
    x, y = zip(*(train_set[i] for i in range(len(train_set))))
    x, y = torch.stack(x), torch.as_tensor(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(300):
        batch = torch.randint(len(x), (64,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model.eval()


def certbench_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The lines the CLI printed on stderr as its own (other libraries may warn there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("certbench: ")]


def evaluate(config_file: Path, out_dir: Path, *source: str) -> int:
    return cli.main(
        [
            "evaluate",
            "--dataset",
            "digits",
            "--configfile",
            str(config_file),
            "--out-dir",
            str(out_dir),
            *source,
        ]
    )


def test_state_dict_round_trip(tmp_path: Path, config_file: Path) -> None:
    """A state dict of a registered architecture is stored as the run's model.pt and loads back equal."""
    from certbench.evaluate import load_model

    model = small_model()
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    out = tmp_path / "run"
    source = ("--state-dict", str(tmp_path / "mlp.pt"), "--arch", "mlp", "--arch-params", '{"widths": [16]}')
    assert evaluate(config_file, out, *source) == 0
    loaded = load_model(read_json(out / "run.json"), out, torch.device("cpu"))
    assert type(loaded) is nn.Sequential
    original, stored = model.state_dict(), loaded.state_dict()
    assert stored.keys() == original.keys() and all(torch.equal(stored[k], original[k]) for k in original)
    record = read_json(out / "record.json")
    assert record["method"] == "external" and record["run"]["arch"] == "external"
    assert {row["metric"] for row in record["metrics"]} >= {
        "clean_accuracy",
        "certified_accuracy",
        "robust_accuracy",
    }
    assert (out / "audit.csv").is_file()


@pytest.mark.parametrize("arch", ["mlp", "cnn-small"])
def test_onnx_export_matches_onnxruntime_and_maps_onto_certbench_layers(arch: str) -> None:
    torch.manual_seed(0)
    model = build(arch, SPEC).eval()
    data = onnx_bytes(model, SPEC.shape)
    x = check_inputs(SPEC)
    assert onnxruntime_difference(model, data, x) <= TOLERANCE
    converted, reason = convert_onnx(data, "model.onnx", SPEC.shape[0])
    assert reason is None
    assert [type(layer) for layer in converted] == [type(layer) for layer in model]
    assert converted[0].mean.equal(model[0].mean) and converted[0].std.equal(model[0].std)
    with torch.no_grad():
        assert torch.equal(converted(x), model(x))


def test_onnx_round_trip_gives_the_same_certificates(tmp_path: Path, config_file: Path) -> None:
    """The model exported to ONNX and read back through `certbench evaluate`: the same predictions,
    radii and statuses as the state dict it came from, certificate by certificate."""
    model = trained_model()
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    (tmp_path / "mlp.onnx").write_bytes(onnx_bytes(model, SPEC.shape))
    source = ("--state-dict", str(tmp_path / "mlp.pt"), "--arch", "mlp", "--arch-params", '{"widths": [16]}')
    assert evaluate(config_file, tmp_path / "original", *source) == 0
    assert evaluate(config_file, tmp_path / "onnx", "--onnx", str(tmp_path / "mlp.onnx")) == 0
    original = read_json(tmp_path / "original" / "certify.json")
    round_trip = read_json(tmp_path / "onnx" / "certify.json")
    assert round_trip["samples"] == original["samples"]
    assert set(round_trip["certificates"]) == set(CONFIG["evaluation"]["certificates"])
    for name, entry in original["certificates"].items():
        assert entry["applicable"], entry
        again = round_trip["certificates"][name]
        assert again["applicable"] and again["status"] == entry["status"], name
        assert again.get("radius") == entry.get("radius"), name
    assert read_json(tmp_path / "onnx" / "train.json")["external"]["layers"] == "certbench"
    # not a comparison of empty answers: the model certifies points at each ε and radii above 0
    assert max(original["certificates"]["lipschitz-l2"]["radius"]) > 0
    for eps, status in original["certificates"]["crown"]["status"].items():
        assert "certified" in status, eps


def test_a_broken_onnx_file_is_one_line_naming_it(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_bytes(small_model(), SPEC.shape)[:200])
    assert evaluate(config_file, tmp_path / "run", "--onnx", str(broken)) == 1
    lines = certbench_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"certbench: {broken}: not a valid ONNX model"), lines
    assert read_json(tmp_path / "run" / "train.json")["status"] == "refused"


def test_a_state_dict_of_another_shape_is_one_line_naming_it(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(small_model().state_dict(), tmp_path / "mlp.pt")
    source = ("--state-dict", str(tmp_path / "mlp.pt"), "--arch", "mlp", "--arch-params", '{"widths": [8]}')
    assert evaluate(config_file, tmp_path / "run", *source) == 1
    lines = certbench_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"certbench: {tmp_path / 'mlp.pt'}: does not match architecture 'mlp'")
    assert "size mismatch for 2.weight" in lines[0]


def test_an_operator_onnx2torch_cannot_convert_is_named(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [10, 64], np.zeros(640, dtype=np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w"], ["linear"], transB=1),
            helper.make_node("Shrink", ["linear"], ["logits"]),
        ],
        "shrink",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    path = tmp_path / "shrink.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert evaluate(config_file, tmp_path / "run", "--onnx", str(path)) == 1
    expected = f"certbench: {path}: onnx2torch cannot convert operator Shrink (version 9)"
    assert certbench_lines(capsys) == [expected]


def test_an_operator_no_certificate_handles_leaves_the_attacks(tmp_path: Path, config_file: Path) -> None:
    """A sigmoid has no certbench layer: the model stays onnx2torch's, every certificate says why it
    does not apply (no radius, no status), and the attacks still run."""
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize(SPEC.mean, SPEC.std), nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10)
    ).eval()
    path = tmp_path / "sigmoid.onnx"
    path.write_bytes(onnx_bytes(model, SPEC.shape))
    converted, reason, difference = onnx_model(path.read_bytes(), str(path), SPEC, check_inputs(SPEC))
    assert type(converted) is not nn.Sequential and difference <= TOLERANCE
    assert reason is not None and reason.startswith(f"{path}: operator Sigmoid (node ")
    assert evaluate(config_file, tmp_path / "run", "--onnx", str(path)) == 0
    run = tmp_path / "run"
    assert read_json(run / "train.json")["external"]["certificates"] == reason
    for name, entry in read_json(run / "certify.json")["certificates"].items():
        assert not entry["applicable"] and entry["reason"] and "radius" not in entry, name
    evaluations = read_json(run / "attack.json")["evaluations"]
    assert {e["attack"] for e in evaluations} == set(CONFIG["evaluation"]["attacks"])
    assert any(any(e["success"]) for e in evaluations)


def parse_vnnlib(text: str) -> tuple[np.ndarray, np.ndarray, set[tuple[int, int]]]:
    """Input bounds and the output disjuncts (j, label) of a VNN-LIB property, by a reader of its own."""
    lower = {
        int(i): float(v) for i, v in re.findall(r"^\(assert \(>= X_(\d+) (\S+)\)\)$", text, re.MULTILINE)
    }
    upper = {
        int(i): float(v) for i, v in re.findall(r"^\(assert \(<= X_(\d+) (\S+)\)\)$", text, re.MULTILINE)
    }
    disjuncts = {(int(a), int(b)) for a, b in re.findall(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)", text)}
    declared = re.findall(r"^\(declare-const ([XY])_(\d+) Real\)$", text, re.MULTILINE)
    assert sorted(lower) == sorted(upper) == [int(i) for kind, i in declared if kind == "X"]
    return np.array([lower[i] for i in sorted(lower)]), np.array([upper[i] for i in sorted(upper)]), disjuncts


def test_a_vnnlib_property_parses_back() -> None:
    x = np.array([0.0, 0.05, 0.5, 0.97, 1.0], dtype=np.float32)
    text = vnnlib_property(x, label=2, eps=0.1, num_classes=4, comment="five pixels")
    lower, upper, disjuncts = parse_vnnlib(text)
    exact_lower, exact_upper = np.clip(x.astype(float) - 0.1, 0, 1), np.clip(x.astype(float) + 0.1, 0, 1)
    assert np.all(lower <= exact_lower) and np.all(upper >= exact_upper)  # the box holds the ball
    assert np.allclose(lower, exact_lower, rtol=0, atol=1e-15) and np.allclose(
        upper, exact_upper, rtol=0, atol=1e-15
    )
    assert lower.min() >= 0 and upper.max() <= 1
    assert disjuncts == {(0, 2), (1, 2), (3, 2)}
    assert len(re.findall(r"^\(declare-const Y_\d+ Real\)$", text, re.MULTILINE)) == 4


def test_export_writes_a_checked_benchmark_folder(tmp_path: Path, config_file: Path) -> None:
    """`certbench export`: one ONNX file per run whose onnxruntime logits are the model's, one
    property per test point and ℓ∞ ε, and instances.csv pairing them."""
    import onnxruntime

    from certbench.evaluate import load_model, test_points

    torch.save(small_model().state_dict(), tmp_path / "mlp.pt")
    source = ("--state-dict", str(tmp_path / "mlp.pt"), "--arch", "mlp", "--arch-params", '{"widths": [16]}')
    run = tmp_path / "run"
    assert evaluate(config_file, run, *source) == 0
    out = tmp_path / "export"
    assert cli.main(["export", "--out-dir", str(out), str(run)]) == 0
    result = read_json(out / "export.json")
    (entry,) = result["runs"].values()
    assert entry["status"] == "ok" and entry["relative_difference"] <= TOLERANCE
    run_config = read_json(run / "run.json")
    _, x, y = test_points(run_config)
    session = onnxruntime.InferenceSession(str(out / entry["onnx"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = load_model(run_config, run, torch.device("cpu"))(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-5
    instances = (out / "instances.csv").read_text().splitlines()
    assert len(instances) == len(x) * len(CONFIG["datasets"]["digits"]["eps_linf"])
    onnx_path, vnnlib_path, timeout = instances[0].split(",")
    assert onnx_path == entry["onnx"] and float(timeout) == 60
    lower, upper, disjuncts = parse_vnnlib((out / vnnlib_path).read_text())
    assert len(lower) == x[0].numel() and np.all(lower <= x[0].numpy().reshape(-1))
    assert disjuncts == {(j, int(y[0])) for j in range(SPEC.num_classes) if j != int(y[0])}


def test_the_dag_schedules_an_external_model(tmp_path: Path) -> None:
    """An `external:` entry plans its run config and import, then the certify, attack and record jobs
    every run has, into the audit and the summary; the export target plans one export job."""
    repo = copy_of_the_repository(tmp_path / "repo")
    (repo / "model.onnx").write_bytes(onnx_bytes(small_model(), SPEC.shape))
    config = {**CONFIG, "external": [{"name": "byo", "dataset": "digits", "onnx": "model.onnx"}]}
    (repo / "external.yaml").write_text(yaml.safe_dump(config))
    snakemake = str(Path(sys.executable).with_name("snakemake"))

    def plan(*targets: str) -> dict[str, int]:
        command = [snakemake, *targets, "-n", "--cores", "1", "--configfile", "external.yaml"]
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE)}

    jobs = plan()
    assert jobs["external_run_config"] == jobs["external_import"] == 1, jobs
    assert jobs["train"] == 1 and jobs["certify"] == jobs["attack"] == jobs["record"] == 2, jobs
    assert jobs["audit"] == jobs["collect"] == 1
    exports = plan("export")
    assert exports["export"] == 1 and "external_import" not in exports, exports


def test_a_state_dict_that_needs_pickle_is_refused(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"0.mean": torch.zeros(1), "hook": Path("anything")}, path)
    source = ("--state-dict", str(path), "--arch", "mlp")
    assert evaluate(config_file, tmp_path / "run", *source) == 1
    (line,) = certbench_lines(capsys)
    assert line.startswith(f"certbench: {path}: refused, it does not load with weights_only=True")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "m", "dataset": "mnist", "onnx": "m.onnx"},
            "external[0].dataset: 'mnist' is not in datasets",
        ),
        ({"name": "m", "dataset": "digits"}, "external[0]: give either onnx or state_dict"),
        ({"name": "m", "dataset": "digits", "state_dict": "m.pt"}, "external[0].arch: a state_dict needs"),
        (
            {"name": "m", "dataset": "digits", "onnx": "m.onnx", "arch": "mlp"},
            "external[0].arch: an ONNX file",
        ),
    ],
)
def test_a_bad_external_entry_is_one_line_naming_its_key(entry: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        external_entries({**CONFIG, "external": [entry]})
    assert str(error.value).startswith(message)


def test_two_external_models_of_one_name_are_refused() -> None:
    entry = {"name": "m", "dataset": "digits", "onnx": "m.onnx"}
    with pytest.raises(ConfigError, match=r"^external\[1\]\.name: 'm' on 'digits' repeats"):
        external_entries({**CONFIG, "external": [entry, entry]})


def test_a_run_that_cannot_be_exported_leaves_the_others(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TorchScript exporter cannot export the ℓ∞-dist layer: that run is one line and `failed`
    in export.json, the MLP next to it is exported, and the command succeeds (the DAG keeps it)."""
    runs = {}
    for arch, params in (("mlp", {"widths": [16]}), ("linf-dist-mlp", {"depth": 2, "width": 8})):
        torch.manual_seed(0)
        torch.save(build(arch, SPEC, **params).state_dict(), tmp_path / f"{arch}.pt")
        runs[arch] = tmp_path / arch
        source = (
            "--state-dict",
            str(tmp_path / f"{arch}.pt"),
            "--arch",
            arch,
            "--arch-params",
            json.dumps(params),
        )
        assert evaluate(config_file, runs[arch], *source) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert cli.main(["export", "--out-dir", str(out), str(runs["mlp"]), str(runs["linf-dist-mlp"])]) == 0
    (line,) = certbench_lines(capsys)
    assert line.startswith(f"certbench: {runs['linf-dist-mlp']}: export failed: ")
    statuses = {
        entry["run_dir"]: entry["status"] for entry in read_json(out / "export.json")["runs"].values()
    }
    assert statuses == {str(runs["mlp"]): "ok", str(runs["linf-dist-mlp"]): "failed"}
    assert {line.split(",")[0] for line in (out / "instances.csv").read_text().splitlines()} == {
        "onnx/digits_mlp_external_seed0.onnx"
    }
