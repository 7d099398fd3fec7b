"""raycxr.models: the allow-list, ModelSpec / PromotedModel round trips, and a model folder that
refuses to be trusted blindly (every tampered config.json exits 2 naming the field)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from raycxr.cli import main
from raycxr.errors import ConfigError
from raycxr.models import ModelSpec, PromotedModel, create_model, list_models
from tests.builders import promoted_model
from tests.conftest import SAMPLE


@pytest.fixture
def model_dir(tmp_path):
    return promoted_model(tmp_path / "model")


@pytest.fixture
def film(tmp_path):
    path = tmp_path / "film.png"
    Image.open(sorted((SAMPLE / "PNEUMONIA").iterdir())[0]).convert("L").save(path)
    return path


def test_every_allow_listed_architecture_is_created_with_one_channel_and_k_outputs():
    for name in ("test_resnet", "test_efficientnet", "resnet10t"):
        assert name in list_models()
        out = create_model(name, num_classes=3).eval()(torch.zeros(2, 1, 64, 64))
        assert out.shape == (2, 3)
    with pytest.raises(ConfigError, match="unknown model 'alexnet'"):
        create_model("alexnet")


def test_promoted_model_round_trip(model_dir):
    loaded = PromotedModel.load(model_dir)
    assert loaded.spec.architecture == "test_resnet" and loaded.spec.target_index == 0
    assert loaded.class_names == ("not_pneumonia", "pneumonia") and loaded.threshold == 0.5
    again = model_dir.parent / "again"
    again.mkdir()
    loaded.save(again)
    assert PromotedModel.load(again) == loaded
    net = loaded.load_network(model_dir)
    assert not net.training and net(torch.zeros(1, 1, 32, 32)).shape == (1, len(loaded.spec.findings))


def test_an_ensemble_spec_round_trips_through_json():
    from raycxr.models import MemberSpec, read_json_spec

    spec = ModelSpec(architecture="ensemble", findings=("pneumonia", "no_finding"), target="pneumonia", image_size=64,
                     stored_size=64, resize="squash", mean=0.0, std=1.0,
                     members=(MemberSpec("test_resnet", 32, 0.5, 0.25), MemberSpec("test_efficientnet", 48, 0.4, 0.3)))
    assert read_json_spec(json.loads(json.dumps(spec.to_dict())), source="t") == spec
    assert spec.network().eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("equalize", ["none", "hist"])
def test_a_spec_keeps_its_equalisation_through_json(equalize):
    from raycxr.models import MemberSpec, read_json_spec

    single = ModelSpec(architecture="test_resnet", findings=("pneumonia",), target="pneumonia", image_size=32,
                       stored_size=64, resize="pad", mean=0.5, std=0.25, equalize=equalize)
    ensemble = dataclasses.replace(single, architecture="ensemble", equalize="none", members=(
        MemberSpec("test_resnet", 32, 0.5, 0.25, equalize=equalize), MemberSpec("test_efficientnet", 48, 0.4, 0.3)))
    for spec in (single, ensemble):
        assert read_json_spec(json.loads(json.dumps(spec.to_dict())), source="t") == spec
    assert ensemble.network().equalizes == [equalize, "none"]


def _spec_dict(**changes) -> dict:
    spec = ModelSpec(architecture="test_resnet", findings=("pneumonia",), target="pneumonia", image_size=32,
                     stored_size=64, resize="pad", mean=0.5, std=0.25).to_dict()
    return {**spec, **changes}


def _without_equalize(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k != "equalize"}
    d["members"] = [{k: v for k, v in m.items() if k != "equalize"} for m in d["members"]]
    return d


@pytest.mark.parametrize("raw, problem", [
    (_spec_dict(equalize="clahe"), "equalize: 'clahe' is not one of none, hist"),
    (_spec_dict(equalize=False), "equalize: False is not a string"),
    (_spec_dict(architecture="ensemble", equalize="hist", members=[
        {"architecture": "test_resnet", "image_size": 32, "mean": 0.5, "std": 0.25},
        {"architecture": "test_resnet", "image_size": 48, "mean": 0.5, "std": 0.25}]),
     "equalize: an ensemble's members equalise their own input"),
    (_spec_dict(architecture="ensemble", members=[
        {"architecture": "test_resnet", "image_size": 32, "mean": 0.5, "std": 0.25, "equalize": "yes"},
        {"architecture": "test_resnet", "image_size": 48, "mean": 0.5, "std": 0.25}]),
     "members[0].equalize: 'yes' is not one of none, hist"),
])
def test_a_bad_equalisation_is_refused_naming_the_field(raw, problem):
    from raycxr.models import read_json_spec

    with pytest.raises(ConfigError) as exc:
        read_json_spec(raw, source="t")
    assert any(problem in p for p in exc.value.problems), exc.value.problems


def test_specs_written_before_equalize_existed_read_as_off(model_dir):
    """trial.json and config.json from earlier raycxr have no equalize field: those models were
    trained without equalisation, and must be scored without it."""
    from raycxr.models import read_json_spec

    old = _without_equalize(_spec_dict(architecture="ensemble", members=[
        {"architecture": "test_resnet", "image_size": 32, "mean": 0.5, "std": 0.25},
        {"architecture": "test_resnet", "image_size": 48, "mean": 0.5, "std": 0.25}]))
    spec = read_json_spec(old, source="t")
    assert spec.equalize == "none" and {m.equalize for m in spec.members} == {"none"}
    _tamper(model_dir, lambda doc: doc.update(spec=_without_equalize(doc["spec"])))
    assert "equalize" not in json.loads((model_dir / "config.json").read_text())["spec"]
    assert PromotedModel.load(model_dir).spec.equalize == "none"


def test_a_promoted_model_trained_on_equalised_films_is_scored_on_equalised_films(model_dir):
    from raycxr.predict import Model
    from raycxr.transforms import to_model_input

    _tamper(model_dir, _set("spec", "equalize", value="hist"))
    model = Model.load(model_dir)
    model.config.save(model_dir)  # saved again: the note for readers says so
    assert "histogram equalisation" in json.loads((model_dir / "config.json").read_text())["about"]["preprocessing"]
    films = np.stack([np.asarray(Image.open(f).convert("L").resize((64, 64))) for f in
                      sorted((SAMPLE / "PNEUMONIA").iterdir())[:3]])
    spec = model.config.spec
    from raycxr.metrics import calibrate_logits

    def by_hand(equalize):
        with torch.no_grad():
            x = to_model_input(torch.from_numpy(films[:, None]), image_size=spec.image_size, mean=spec.mean,
                               std=spec.std, equalize=equalize)
            return calibrate_logits(model.network(x)[:, spec.target_index].double().numpy(), model.config.calibration)

    got = model.predict_proba(films)
    assert np.allclose(got, by_hand("hist"), atol=1e-6) and not np.allclose(got, by_hand("none"), atol=1e-4)


def _tamper(model_dir, edit):
    path = model_dir / "config.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))  # NaN and Infinity are written as JSON's NaN / Infinity tokens


def _set(*keys, value):
    def edit(doc):
        d = doc
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(doc):
        d = doc
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


# (what was done to config.json, the field the message must name) -- each one reproduced against the
# earlier loader: a traceback, a wrong label with exit 0, or an OOM kill.
TAMPERED = {
    "stored size 100000": (_set("spec", "stored_size", value=100000), "spec.stored_size"),
    "negative image size": (_set("spec", "image_size", value=-4), "spec.image_size"),
    "NaN calibration scale": (_set("calibration", "scale", value=math.nan), "calibration.scale"),
    "infinite calibration bias": (_set("calibration", "bias", value=math.inf), "calibration.bias"),
    "threshold 5": (_set("threshold", value=5), "threshold"),
    "string threshold": (_set("threshold", value="0.5"), "threshold"),
    "missing threshold": (_drop("threshold"), "threshold: missing"),
    "one class name": (_set("class_names", value=["pneumonia"]), "class_names"),
    "unknown architecture": (_set("spec", "architecture", value="alexnet"), "spec.architecture"),
    "unknown finding": (_set("spec", "findings", value=["pneumonia", "ghost"]), "spec.findings"),
    "target not a finding": (_set("spec", "target", value="ghost"), "spec.target"),
    "zero std": (_set("spec", "std", value=0), "spec.std"),
    "resize policy": (_set("spec", "resize", value="crop"), "spec.resize"),
    "tta not a bool": (_set("tta", value="yes"), "tta"),
    "spec missing": (_drop("spec"), "spec: missing"),
    "older schema": (_drop("schema_version"), "schema_version"),
    "bool as size": (_set("spec", "image_size", value=True), "spec.image_size"),
    "unknown equalisation": (_set("spec", "equalize", value="clahe"), "spec.equalize"),
    "equalize as a bool": (_set("spec", "equalize", value=True), "spec.equalize"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_config_exits_2_naming_the_field(model_dir, film, capsys, case):
    edit, field = TAMPERED[case]
    _tamper(model_dir, edit)
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), str(film)]) == 2
    err = capsys.readouterr().err
    assert field in err and "config.json" in err and "Traceback" not in err, err


def test_bad_json_and_wrong_weights_exit_2(model_dir, film, capsys):
    (model_dir / "config.json").write_text('{"schema_version": 2, "spec": ')
    assert main(["predict", "--model", str(model_dir), str(film)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    promoted_model(model_dir)  # valid again; now weights of another architecture
    from safetensors.torch import save_file

    net = create_model("test_efficientnet", num_classes=16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(model_dir / "model.safetensors"))
    assert main(["predict", "--model", str(model_dir), str(film)]) == 2
    assert "does not hold the weights of a test_resnet" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir.parent / "nowhere"), str(film)]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_no_allocation_is_sized_by_the_file(model_dir, film):
    """stored_size 100000 once made predict allocate a 10^10-pixel canvas and get OOM-killed. Under
    a 6 GB address-space cap (raycxr with torch imported peaks near 3.7 GB of it) the refusal
    comes before any such allocation: exit 2 and a message, not a MemoryError."""
    _tamper(model_dir, _set("spec", "stored_size", value=100000))
    cap = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
           "from raycxr.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", cap, "predict", "--model", str(model_dir), str(film)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "spec.stored_size" in out.stderr and "MemoryError" not in out.stderr


def test_a_valid_but_edited_threshold_is_obeyed(model_dir, film, capsys):
    """Validation refuses what is wrong, not what is merely different: a threshold moved within (0, 1)
    changes the label exactly at the probability."""
    main(["predict", "--model", str(model_dir), "--format", "json", str(film)])
    p = json.loads(capsys.readouterr().out)[0]["probability"]
    for threshold, label in ((min(0.999, p + 1e-3), "not_pneumonia"), (max(0.001, p - 1e-3), "pneumonia")):
        _tamper(model_dir, _set("threshold", value=threshold))
        assert main(["predict", "--model", str(model_dir), "--format", "json", str(film)]) == 0
        assert json.loads(capsys.readouterr().out)[0]["label"] == label


def test_a_legacy_flat_trial_json_still_reads(tmp_path):
    """Checkpoints of raycxr 0.1 wrote trial.json flat; promote must still read a run made then."""
    from raycxr.train import CheckpointRecord

    (tmp_path / "trial.json").write_text(json.dumps({
        "model": "test_resnet", "image_size": 32, "ingest_image_size": 64, "resize": "pad", "mean": 0.5, "std": 0.25,
        "drop_rate": 0.0, "findings": ["pneumonia", "no_finding"], "target": "pneumonia", "lr": 0.001, "seed": 3,
        "trial_id": "abc", "pretrained": "none"}))
    rec = CheckpointRecord.load(tmp_path)
    assert rec.spec.architecture == "test_resnet" and rec.spec.stored_size == 64 and rec.seed == 3
    assert rec.hyperparameters["lr"] == 0.001 and rec.spec.trial_id == "abc"
    assert np.isfinite(rec.spec.mean)
