"""Records as tidy data: the per-sample table and the summary carry ε, norm and the certificate or
attack name as typed columns, survive a write and a read, and give the metrics by row selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from certbench.collect import (
    ANY,
    SAMPLE_DTYPES,
    SUMMARY_COLUMNS,
    assemble,
    collect,
    metrics,
    read_samples,
    read_summary,
    sample_table,
    select,
    write_samples,
)
from certbench.storage import read_json, write_json

RUN_CONFIG = {
    "run": {"dataset": "digits", "name": "lmt", "arch": "mlp", "seed": 0},
    "method": "lmt",
    "dataset": {"name": "digits", "eps_linf": [0.1, 8 / 255], "eps_l2": [0.5]},
    "evaluation": {"audit_tolerance": 1e-4},
}
# four test points; the last one is misclassified
CERTIFY = {
    "status": "ok",
    "samples": {
        "index": [3, 5, 7, 9],
        "label": [0, 1, 2, 3],
        "prediction": [0, 1, 2, 0],
        "margin": [1.0, 2.0, 0.5, -1.0],
    },
    "certificates": {
        "lip": {
            "norm": "l2",
            "applicable": True,
            "seconds": 0.1,
            "extra": {"lipschitz_bound": 4.0},
            "radius": [0.6, 0.2, "inf", 0.0],
            "status": {"0.5": ["certified", "not_certified", "certified", "not_certified"]},
        },
        "box": {
            "norm": "linf",
            "applicable": True,
            "seconds": 0.2,
            "extra": {},
            "radius": None,
            "status": {
                "0.1": ["certified", "error", "not_certified", "not_certified"],
                "0.0313725": ["certified", "certified", "certified", "not_certified"],
            },
            # a cascade's record of the verifier that certified each sample
            "verifier": {"0.1": ["ibp", "", "", ""], "0.0313725": ["ibp", "crown", "alpha-crown", ""]},
            "certified_by": {"0.1": {"ibp": 1}, "0.0313725": {"alpha-crown": 1, "crown": 1, "ibp": 1}},
        },
        "never": {"norm": "l2", "applicable": False, "reason": "not this architecture"},
    },
}
ATTACK = {
    "status": "ok",
    "attacks": {
        "df": {"norm": "l2", "kind": "minimal", "settings": {}},
        "pgd": {"norm": "linf", "kind": "eps", "settings": {}},
    },
    "evaluations": [
        {
            "attack": "df",
            "norm": "l2",
            "eps": None,
            "success": [True, True, False, True],
            "error": [False, False, False, False],
            "adv_l2": [0.9, 0.3, "inf", 0.0],
            "adv_linf": [0.2, 0.05, "inf", 0.0],
            "error_msg": ["", "", "", ""],
        },
        *(
            {
                "attack": "pgd",
                "norm": "linf",
                "eps": eps,
                "success": [False, True, False, True],
                "error": [False, False, True, False],
                "adv_l2": [0.0, 0.4, np.nan, 0.0],
                "adv_linf": [0.0, eps, np.nan, 0.0],
                "error_msg": ["", "", "boom", ""],
            }
            for eps in (0.1, 8 / 255)
        ),
    ],
}


def test_the_per_sample_table_round_trips_with_typed_columns(tmp_path: Path) -> None:
    table = sample_table(RUN_CONFIG, CERTIFY, ATTACK)
    write_samples(table, tmp_path / "samples.csv")
    again = read_samples(tmp_path / "samples.csv")
    pd.testing.assert_frame_equal(again, table)
    assert again.dtypes.astype(str).to_dict() == SAMPLE_DTYPES
    # one row per sample and evaluation: clean; lip's radius and its status at ℓ2 0.5; box at two ε;
    # df without ε; pgd at two ε. The inapplicable certificate has no rows.
    groups = again.groupby(["kind", "evaluation", "norm", "eps"], dropna=False).size()
    assert len(again) == 4 * 8 and (groups == 4).all() and "never" not in set(again["evaluation"])
    box = again[(again["kind"] == "certificate") & (again["norm"] == "linf") & (again["eps"] == 8 / 255)]
    assert box["evaluation"].unique().tolist() == ["box"] and box["status"].tolist()[-1] == "not_certified"
    assert box["verifier"].tolist()[:3] == ["ibp", "crown", "alpha-crown"]
    assert pd.isna(box["verifier"].iloc[3])
    assert again.loc[again["evaluation"] != "box", "verifier"].isna().all()
    radius = again[(again["evaluation"] == "lip") & again["eps"].isna()]
    assert radius["radius"].tolist() == [0.6, 0.2, np.inf, 0.0] and radius["status"].isna().all()
    pgd = again[(again["evaluation"] == "pgd") & (again["eps"] == 0.1)]
    assert pgd["success"].tolist() == [False, True, False, True] and pgd["error"].tolist()[2]


def test_a_record_and_its_summary_round_trip_with_the_metrics_as_rows(tmp_path: Path) -> None:
    train = {
        "status": "ok",
        "message": "",
        "config_hash": "abc",
        "epochs": 2,
        "history": [],
        "cost": {"seconds_per_epoch": 1.0, "train_seconds": 2.0, "peak_memory_mb": 10.0, "parameters": 7},
        "provenance": {"git_sha": "0" * 40, "device": "cpu"},
    }
    for name, part in (("run", RUN_CONFIG), ("train", train), ("certify", CERTIFY), ("attack", ATTACK)):
        write_json(tmp_path / f"{name}.json", part)
    assemble(
        *(tmp_path / f"{name}.json" for name in ("run", "train", "certify", "attack", "record")),
        tmp_path / "samples.csv",
    )
    collect([tmp_path / "record.json"], tmp_path / "summary.csv", tmp_path / "radii.csv")
    box = read_json(tmp_path / "record.json")["certify"]["certificates"]["box"]
    assert "verifier" not in box and box["certified_by"]["0.1"] == {"ibp": 1}  # per sample: samples.csv
    summary = read_summary(tmp_path / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary["eps"].dtype == float and summary["value"].dtype == float
    assert summary[["dataset", "seed", "git_sha", "config_hash"]].drop_duplicates().to_numpy().tolist() == [
        ["digits", 0, "0" * 40, "abc"]
    ]  # provenance on every row

    def value(metric: str, **equal: object) -> float:
        return float(select(summary, metric, **equal)["value"].iloc[0])

    assert value("clean_accuracy") == 0.75
    assert value("certified_accuracy", evaluation="lip", eps=0.5) == 0.5
    assert value("certified_accuracy", evaluation="box", eps=8 / 255) == 0.75
    assert value("errors", kind="certificate", evaluation="box") == 1
    # the median of 0.6, 0.2, inf and 0 (misclassified)
    assert value("median_radius", evaluation="lip") == pytest.approx(0.4)
    assert value("lipschitz_bound", evaluation="lip") == 4.0
    # any certificate at ℓ∞ 0.1: box's statuses, and lip's ℓ2 radius r read as r/√64 (only inf reaches 0.1)
    assert value("certified_accuracy", evaluation=ANY, norm="linf", eps=0.1) == 0.5
    assert value("certified_accuracy", evaluation=ANY, norm="l2", eps=0.5) == 0.5
    assert value("robust_accuracy", evaluation="df", eps=0.5) == 0.5  # adv ℓ2 0.9 and inf stay above 0.5
    assert value("robust_accuracy", evaluation="pgd", eps=0.1) == 0.25  # the error is never robust
    assert value("robust_accuracy", evaluation=ANY, norm="l2", eps=0.5) == 0.5
    assert value("applicable", evaluation="never") == 0.0
    assert select(summary, "certified_accuracy", evaluation="never")["value"].isna().all()


def test_an_attack_named_like_the_start_of_another_keeps_its_own_errors() -> None:
    """Selecting rows by name, not by a column-name prefix: ``pgd``'s errors are not ``pgd2``'s."""
    failing = {
        "attack": "pgd2",
        "norm": "l2",
        "eps": None,
        "success": [False] * 4,
        "error": [True] * 4,
        "adv_l2": [np.nan] * 4,
        "adv_linf": [np.nan] * 4,
        "error_msg": ["boom"] * 4,
    }
    attack = {
        **ATTACK,
        "attacks": {**ATTACK["attacks"], "pgd2": {"norm": "l2", "kind": "minimal", "settings": {}}},
        "evaluations": [*ATTACK["evaluations"], failing],
    }
    record = {"run": RUN_CONFIG["run"], "config": RUN_CONFIG, "certify": CERTIFY, "attack": attack}
    errors = {
        row["evaluation"]: row["value"]
        for row in metrics(record, sample_table(RUN_CONFIG, CERTIFY, attack))
        if row["metric"] == "errors" and row["kind"] == "attack"
    }
    assert errors == {"df": 0, "pgd": 1, "pgd2": 4}
