"""raycxr.promote without a search: building one model or an ensemble from checkpoints, and the
errors a user can cause. A whole search-then-promote runs in test_end_to_end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycxr.cli import main
from raycxr.labels import FINDINGS
from raycxr.models import ModelSpec, PromotedModel
from raycxr.predict import logits
from raycxr.promote import PromoteConfig, _build, promote
from raycxr.train import CheckpointRecord, save_checkpoint


def _checkpoint(folder, architecture, image_size, seed):
    torch.manual_seed(seed)
    spec = ModelSpec(architecture=architecture, findings=FINDINGS, target="pneumonia", image_size=image_size,
                     stored_size=64, resize="pad", mean=0.5, std=0.25, trial_id=f"t{seed}")
    folder.mkdir(parents=True)
    save_checkpoint(folder, model=spec.network().eval(), record=CheckpointRecord(spec=spec, hyperparameters={}))
    return {"checkpoint": str(folder), "trial_id": spec.trial_id}


def test_an_ensemble_is_built_from_checkpoints_saved_and_scores_the_mean_logit(tmp_path):
    rows = [_checkpoint(tmp_path / "a", "test_resnet", 32, 1), _checkpoint(tmp_path / "b", "test_efficientnet", 48, 2)]
    model, spec, state = _build(rows)
    assert spec.architecture == "ensemble" and [m.trial_id for m in spec.members] == ["t1", "t2"]
    assert spec.image_size == spec.stored_size == 64 and (spec.mean, spec.std) == (0.0, 1.0)
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 64, 64), dtype=np.uint8)
    members = [CheckpointRecord.load(tmp_path / n).spec for n in ("a", "b")]
    expect = np.mean([logits(s.load_network(tmp_path / n), s, images) for s, n in zip(members, "ab")], axis=0)
    np.testing.assert_allclose(logits(model, spec, images), expect, atol=1e-5)

    out = tmp_path / "out"
    out.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"))
    PromotedModel(spec=spec, threshold=0.3, threshold_rule="youden", calibration={"method": "platt", "scale": 1.0,
                  "bias": 0.0}, class_names=("not_pneumonia", "pneumonia")).save(out)
    again = PromotedModel.load(out)
    np.testing.assert_allclose(logits(again.load_network(out), again.spec, images), expect, atol=1e-5)

    single_model, single_spec, single_state = _build(rows[:1])
    assert single_state is None and single_spec == members[0]


def test_the_card_keeps_a_data_folder_relative_to_the_model_folder(promoted_run):
    """No home folder in a card: the training data is recorded relative to the model folder (a
    URI dataset stays a URI: tests/test_storage.py), and resolves back to the folder."""
    card = promoted_run["card"]
    assert card.data["dir"] == "../data"
    assert card.data_dir(promoted_run["model"]) == promoted_run["data"].resolve()


def test_promote_refuses_what_a_user_can_get_wrong(tmp_path, capsys):
    assert main(["promote", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "is not a raycxr run" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"name": "x", "data": ')
    assert main(["promote", "--run", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "not valid JSON" in err and "Traceback" not in err
    (run / "run.json").write_text('{"name": "x", "claimed": "now"}')
    assert main(["promote", "--run", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "has not written its record yet" in capsys.readouterr().err
    with pytest.raises(Exception, match="needs --prevalence"):
        promote(PromoteConfig(run=str(run), out=tmp_path / "m", threshold_rule="bayes"))
    for flags in (["--select", "val-auc"], ["--fastest-within", "0.01"]):  # one trial cannot be an ensemble
        assert main(["promote", "--run", str(run), "--out", str(tmp_path / "m"), "--ensemble", "on", *flags]) == 2
        assert "--ensemble on asks for an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_force_replaces_only_a_promoted_model_and_a_failed_promote_keeps_the_old_one(promoted_run, second_promotion,
                                                                                   tmp_path):
    """Nothing destroyed by a flag or a crash (issue 27): --force at a folder that is not a promoted
    model refuses and touches nothing; a promote that fails midway (after it began building) leaves
    the model it would have replaced whole, and no half-built folder beside it."""
    import shutil

    from raycxr.errors import ConfigError, DataError

    run, out = second_promotion["run"], second_promotion["model"]
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not a model raycxr promoted"):
        promote(PromoteConfig(run=str(run), out=home, force=True, n_boot=20, tta="off"))
    assert [p.name for p in home.iterdir()] == ["thesis.tex"]

    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = tmp_path / "other"  # not the search's dataset: promote fails once it has begun building
    shutil.copytree(promoted_run["data"], other)
    manifest = other / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    with pytest.raises(DataError, match="not the dataset the search used"):
        promote(PromoteConfig(run=str(run), out=out, data=other, force=True, n_boot=20, tta="off"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    PromotedModel.load(out)  # still a whole model
