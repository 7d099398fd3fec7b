"""raycxr.card.ModelCard: the one writer and reader of model_card.json (issue 26 item 8), and a card
that carries no user's folder (issue 27 item 8)."""

import dataclasses
import json

import pytest

from raycxr.card import CARD_SCHEMA_VERSION, ModelCard
from raycxr.errors import ConfigError


def _doc(promoted_run) -> dict:
    return json.loads((promoted_run["model"] / "model_card.json").read_text())


def test_a_promoted_card_has_every_section_and_none_for_those_that_do_not_apply(promoted_run):
    doc = _doc(promoted_run)
    assert doc["schema_version"] == CARD_SCHEMA_VERSION
    # every field is written, an absent section as null: no reader needs .get on an optional key
    assert set(doc) == {f.name for f in dataclasses.fields(ModelCard)}
    assert doc["int8"] is None and doc["prevalence"] is None and doc["registry"] is None
    assert doc["serving_onnx"] is None and doc["internal_validation"] is None  # no --serving-onnx, no site
    card = ModelCard.load(promoted_run["model"])
    assert card.to_dict() == doc  # what was written is what is read
    promoted = promoted_run["promoted"]  # what raycxr.promote returned
    assert isinstance(promoted, ModelCard) and promoted.trial["trial_id"] == card.trial["trial_id"]
    assert promoted.holdout["pooled"]["auc"] == card.holdout["pooled"]["auc"]


def test_a_card_names_no_folder_of_the_machine_that_promoted_it(promoted_run):
    """Paths in the card are relative to the model folder: model_card.json goes to MLflow and
    to colleagues, and a user's home folder is not theirs to read."""
    text = (promoted_run["model"] / "model_card.json").read_text()
    base = str(promoted_run["model"].resolve().parent)
    assert base not in text and str(promoted_run["data"]) not in text
    card = ModelCard.load(promoted_run["model"])
    assert card.data["dir"] == "../data" and card.data_dir(promoted_run["model"]) == promoted_run["data"].resolve()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema_version=CARD_SCHEMA_VERSION + 1), "upgrade raycxr"),
    (lambda d: d.update(surprise={"x": 1}), "does not know \\(surprise\\)"),
    (lambda d: d.pop("holdout"), "lacks holdout"),
    (lambda d: d.pop("int8"), "lacks int8"),  # optional sections are written as null, not left out
])
def test_a_card_that_does_not_fit_the_schema_is_refused_with_what_to_do(promoted_run, tmp_path, change, message):
    doc = _doc(promoted_run)
    change(doc)
    (tmp_path / "model_card.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message):
        ModelCard.load(tmp_path)


def test_a_card_from_before_the_schema_reads_with_none_for_what_it_lacks(promoted_run, tmp_path):
    doc = _doc(promoted_run)
    for key in ("schema_version", "int8", "latency", "latency_ms", "serving_onnx", "registry", "external"):
        doc.pop(key)
    (tmp_path / "model_card.json").write_text(json.dumps(doc))
    card = ModelCard.load(tmp_path)
    assert card.schema_version == CARD_SCHEMA_VERSION
    assert (card.int8, card.latency, card.registry, card.external) == (None, None, None, [])
    assert card.holdout == doc["holdout"]


def test_a_missing_or_torn_card_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model folder written by raycxr promote"):
        ModelCard.load(tmp_path)
    (tmp_path / "model_card.json").write_text('{"run": "x", "trial"')
    with pytest.raises(ConfigError, match="JSONDecodeError"):
        ModelCard.load(tmp_path)
