"""raycxr.evaluate (the ``raycxr evaluate`` command) on a model folder made without a search.
The card's internal-vs-external table after a real promote is checked in test_end_to_end."""

from __future__ import annotations

import csv
import json

import pytest

from raycxr.cli import main
from raycxr.data import read_split, split_arrays
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


@pytest.mark.slow
def test_small_centre_cropped_copies_of_training_films_are_not_external(promoted_run, sample_dir, tmp_path):
    """PneumoniaMNIST's make-up (MedMNIST: centre-cropped 28 px copies of Kermany's films) applied to
    the bundled films: their files differ from the training files, yet evaluating the model on them
    is not external validation. Ingest's cross-dataset twin test on the stored pixels finds the copies
    of films the model trained or validated on; the model's own holdout films (never seen, but from
    the same source and patients apart) are not flagged (issue 26)."""
    import hashlib

    from PIL import Image

    from raycxr.data import read_manifest
    from raycxr.evaluate import training_overlap
    from raycxr.ingest import IngestConfig, ingest

    data = promoted_run["data"]
    seen = {h for s in ("train", "val") for h in read_split(data, s, columns=["content_hash"]).column("content_hash")
            .to_pylist()}
    films = sorted(p for d in ("NORMAL", "PNEUMONIA") for p in (sample_dir / d).iterdir())[::6]  # 50 films
    copies = tmp_path / "mnist-like"
    for i, f in enumerate(films):
        img = Image.open(f).convert("L")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        out = copies / f.parent.name / f"IM-{9000 + i}-0001.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.crop((left, top, left + side, top + side)).resize((28, 28), Image.LANCZOS).save(out)
    trained_on = sum(hashlib.sha256(f.read_bytes()).hexdigest() in seen for f in films)
    assert 25 <= trained_on < len(films)
    ingest(IngestConfig(sources={"kermany": copies}, out=tmp_path / "d", image_size=64, seed=0,
                        allow_empty_splits=True))
    card, model = promoted_run["card"], promoted_run["model"]  # trained on `data`
    assert card.data_dir(model) == data.resolve() and card.data["fingerprint"] == read_manifest(data).fingerprint
    o = training_overlap(card, model, tmp_path / "d", ["train", "val", "holdout"])
    assert o["checked"] and o["same_files"] == 0 and o["verdict"].startswith("overlaps training data")
    assert 0.8 * trained_on <= o["twins"] <= trained_on, (o, trained_on)
    # the model's own holdout films, which it never saw: no overlap
    far = training_overlap(card, model, data, ["holdout"])
    assert far["checked"] and far["images"] == 0 and far["verdict"].startswith("external")
