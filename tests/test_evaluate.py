"""raycxr.evaluate (the ``raycxr evaluate`` command) on a model folder made without a search.
The card's internal-vs-external table after a real promote is checked in test_end_to_end."""

from __future__ import annotations

import csv
import json

import pytest

from raycxr.cli import main
from raycxr.data import split_arrays
from raycxr.errors import ConfigError
from raycxr.evaluate import evaluate_model
from tests.builders import promoted_model


def test_every_split_scores_every_known_label_once_and_writes_per_image_rows(dataset, tmp_path):
    model_dir = promoted_model(tmp_path / "m")
    result = evaluate_model(model_dir, dataset, split="all", n_boot=20)
    n = sum(len(split_arrays(dataset, s, "pneumonia").y) for s in ("train", "val", "holdout"))
    assert result["metrics"]["pooled"]["n"] == n == 300
    assert set(result["metrics"]["per_source"]) == {"kermany"}
    with open(result["predictions"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["label"] for r in rows} == {"0", "1"}
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    written = json.loads((model_dir / "evaluations" / f"{result['fingerprint']}-all.json").read_text())
    assert written["metrics"]["pooled"]["auc"] == pytest.approx(result["metrics"]["pooled"]["auc"])
    assert not (model_dir / "model_card.md").exists()  # a folder without a card is scored, not given one


def test_evaluate_refuses_a_split_that_does_not_exist_and_a_model_that_is_not_one(dataset, tmp_path, capsys):
    model_dir = promoted_model(tmp_path / "m")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        evaluate_model(model_dir, dataset, split="test")
    (model_dir / "config.json").write_text("[]")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(dataset)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
