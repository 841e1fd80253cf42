"""Figures: every figure is drawn from small synthetic results; the bounds are worded and
computed the right way round; fixed-ε certificates are markers, not curves; radii cross norms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from certbench.collect import (
    ANY,
    SAMPLE_DTYPES,
    SUMMARY_COLUMNS,
    best_certified_radius,
    radius_certificate_radius,
    status_certified_radius,
)
from certbench.figures import OPTIONAL_FIGURES, write_figures
from certbench.labels import experiment_label, styles
from certbench.outputs import FIGURE_NAMES, OPTIONAL_FIGURE_NAMES
from certbench.plotting.bounds import run_curves

EXPERIMENTS = [
    ("lmt", "lmt", "cnn-small"),
    ("ibp", "ibp", "cnn-small"),
    ("standard", "standard", "mlp"),
    ("standard", "standard", "cnn-small"),
]


def synthetic(tmp_path: Path) -> dict[str, Path]:
    """summary.csv, radii.csv, history.csv and published.csv for four experiments and two seeds
    (``ibp`` has only fixed-ε certificates: no radius)."""
    rng = np.random.default_rng(0)
    summary, radii, history = [], [], []
    for name, method, arch in EXPERIMENTS:
        for seed in (0, 1):
            run = {
                "dataset": "digits",
                "name": name,
                "method": method,
                "arch": arch,
                "seed": seed,
                "status": "ok",
                "seconds_per_epoch": 1.0 + seed,
            }
            summary += [
                {**run, "metric": "clean_accuracy", "kind": "clean", "value": 0.9 - 0.1 * seed},
                {
                    **run,
                    "metric": "lipschitz_bound",
                    "kind": "certificate",
                    "evaluation": "lipschitz-l2",
                    "norm": "l2",
                    "value": 3.0 + seed,
                },
            ]
            summary += [
                {
                    **run,
                    "metric": metric,
                    "kind": kind,
                    "evaluation": ANY,
                    "norm": norm,
                    "eps": eps,
                    "value": value,
                }
                for metric, kind, norm, eps, value in [
                    ("certified_accuracy", "certificate", "l2", 0.5, 0.3),
                    ("certified_accuracy", "certificate", "linf", 0.1, 0.4),
                    ("robust_accuracy", "attack", "l2", 0.5, 0.6),
                    ("robust_accuracy", "attack", "linf", 0.1, 0.7),
                ]
            ]
            for norm in ("l2", "linf"):
                radius = rng.uniform(0, 1, 20)
                radii.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "seed": seed,
                            "arch": arch,
                            "name": name,
                            "dataset": "digits",
                            "index": range(20),
                            "norm": norm,
                            "certified_radius": radius,
                            "radius_bound": np.nan if name == "ibp" else radius,
                            "adversarial_norm": radius + rng.uniform(0, 1, 20),
                        }
                    )
                )
            history += [
                {
                    "dataset": "digits",
                    "name": name,
                    "arch": arch,
                    "seed": seed,
                    "method": method,
                    "status": "ok",
                    "epoch": e,
                    "loss": 2.0 / e,
                    "train_accuracy": 0.5 + 0.1 * e,
                    "lr": 0.01,
                }
                for e in range(1, 4)
            ]
    paths = {key: tmp_path / f"{key}.csv" for key in ("summary", "radii", "history", "published")}
    pd.DataFrame(summary, columns=SUMMARY_COLUMNS).to_csv(paths["summary"], index=False)
    pd.concat(radii).to_csv(paths["radii"], index=False)
    pd.DataFrame(history).to_csv(paths["history"], index=False)
    pd.DataFrame(
        [
            {
                "dataset": "digits",
                "name": "lmt",
                "arch": "cnn-small",
                "paper:clean": 95.0,
                "paper:certified@0.1": 50.0,
            }
        ]
    ).to_csv(paths["published"], index=False)
    return paths


def test_every_figure_as_png_and_pdf(tmp_path: Path) -> None:
    paths = synthetic(tmp_path)
    out = tmp_path / "figures"
    write_figures(paths["summary"], paths["radii"], out, paths["history"], paths["published"])
    for name in FIGURE_NAMES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name


def test_no_results_give_placeholders(tmp_path: Path) -> None:
    (tmp_path / "summary.csv").write_text("dataset,name,method,arch,seed,status\n")
    (tmp_path / "radii.csv").write_text("\n")
    write_figures(tmp_path / "summary.csv", tmp_path / "radii.csv", tmp_path / "out")
    assert {p.stem for p in (tmp_path / "out").glob("*.png")} == set(FIGURE_NAMES)


def test_optional_figures_are_drawn_when_named_and_the_config_knows_them(tmp_path: Path) -> None:
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["extra_figures"]["items"]["enum"] == OPTIONAL_FIGURE_NAMES
    assert sorted(OPTIONAL_FIGURES) == sorted(OPTIONAL_FIGURE_NAMES)
    paths = synthetic(tmp_path)
    write_figures(paths["summary"], paths["radii"], tmp_path / "out", extra=OPTIONAL_FIGURE_NAMES)
    assert {p.stem for p in (tmp_path / "out").glob("*.png")} == {*FIGURE_NAMES, *OPTIONAL_FIGURE_NAMES}


def test_bounds_certified_is_strict_and_attacks_count_at_their_norm() -> None:
    part = pd.DataFrame({"seed": 0, "radius_bound": [0.0, 0.2, 0.5], "adversarial_norm": [0.0, 0.3, np.inf]})
    curves = run_curves(part, np.array([0.0, 0.2, 0.3, 1.0])).set_index("size")
    # certified at s iff radius > s (a lower bound); robust under attack iff no example of size ≤ s (upper)
    assert curves["certified"].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0])
    assert curves["attacked"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert (curves["certified"] <= curves["attacked"]).all()


def test_fixed_eps_certificates_draw_no_curve() -> None:
    part = pd.DataFrame({"seed": 0, "radius_bound": [np.nan, np.nan], "adversarial_norm": [0.1, 0.2]})
    assert run_curves(part, np.linspace(0, 1, 5))["certified"].isna().all()


def samples() -> pd.DataFrame:
    """A tidy per-sample table: an ℓ2 radius certificate and an ℓ∞ fixed-ε one at ε = 0.1 and 0.3;
    the third sample is misclassified."""
    points = pd.DataFrame({"index": [0, 1, 2], "label": [0, 1, 2], "prediction": [0, 1, 0], "margin": 1.0})
    return (
        pd.concat(
            [
                points.assign(kind="clean"),
                points.assign(
                    kind="certificate", evaluation="lipschitz-l2", norm="l2", radius=[0.8, 0.05, 0.9]
                ),
                points.assign(
                    kind="certificate",
                    evaluation="lipschitz-l2",
                    norm="l2",
                    eps=0.5,
                    status=["certified", "not_certified", "certified"],
                ),
                points.assign(
                    kind="certificate", evaluation="linf-dist", norm="linf", eps=0.1, status="certified"
                ),
                points.assign(
                    kind="certificate",
                    evaluation="linf-dist",
                    norm="linf",
                    eps=0.3,
                    status=["not_certified", "certified", "not_certified"],
                ),
            ],
            ignore_index=True,
        )
        .reindex(columns=list(SAMPLE_DTYPES))
        .astype(SAMPLE_DTYPES)
    )


def test_linf_guarantees_count_as_l2_radii_and_l2_radii_as_linf_over_sqrt_n() -> None:
    table = samples()
    # the ℓ∞ ball of radius ε holds the ℓ2 ball of radius ε: ℓ∞ statuses give ℓ2 radii
    assert status_certified_radius(table, "l2", 64).tolist() == [0.1, 0.3, 0.0]
    assert best_certified_radius(table, "l2", 64).tolist() == [0.8, 0.3, 0.0]
    # an ℓ2 radius r certifies the ℓ∞ radius r/√n
    assert radius_certificate_radius(table, "linf", 64).tolist() == pytest.approx([0.1, 0.05 / 8, 0])
    no_radius = table[table["evaluation"] != "lipschitz-l2"]
    assert np.isnan(radius_certificate_radius(no_radius, "l2", 64)).all()


def test_every_experiment_gets_its_own_colour_or_marker() -> None:
    names = [
        "standard",
        "weight-decay",
        "spectral",
        "parseval",
        "lipschitz-reg",
        "lmt",
        "ibp",
        "crown-ibp",
        "linf-dist",
        "linf-dist-head",
        "lipsdp-admm",
    ]
    triples = [(n, n, "cnn-small") for n in names] + [("standard", "standard", "mlp")]
    drawn = styles(triples)
    assert len({(s.color, s.marker) for s in drawn.values()}) == len(triples)
    assert len({drawn[(n, "cnn-small")].color for n in names}) == len(names)
    assert drawn[("standard", "mlp")].color == drawn[("standard", "cnn-small")].color
    assert drawn[("standard", "mlp")].marker != drawn[("standard", "cnn-small")].marker
    assert (
        experiment_label("linf-dist-head", "linf-dist-mlp+head") == "ℓ∞-dist net + MLP · ℓ∞-dist MLP + head"
    )
