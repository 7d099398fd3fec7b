"""raycxr.train without Ray: TrialConfig, build_trial, train_one_epoch, validate, CheckpointRecord.

The Ray Train path around them is exercised by test_end_to_end and test_faults."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raycxr.config import HYPERPARAMETERS, PARAMS
from raycxr.data import label_matrix, read_split, split_arrays
from raycxr.errors import ConfigError
from raycxr.labels import FINDINGS
from raycxr.train import CheckpointRecord, TrialConfig, build_trial, save_checkpoint, train_one_epoch, validate


def _tune_config(**overrides) -> dict:
    """What search.py hands the loop: the space's sampled values plus the static settings."""
    config = {k: default for k, (_, _, default) in PARAMS.items() if isinstance(default, (int, float, str))}
    config.update(model="test_resnet", lr=3e-3, image_size=32, batch_size=32, seed=0, findings=list(FINDINGS),
                  target="pneumonia", max_epochs=2, train_rows=200, ingest_image_size=64, resize="pad",
                  pos_weight=[1.0] * len(FINDINGS), cpus_per_worker=1, weights_dir=None, trial_id="t1")
    config.update(overrides)
    return config


def test_trial_config_has_a_field_per_hyperparameter_and_refuses_unknown_keys():
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    assert set(HYPERPARAMETERS) <= names  # derived from config.PARAMS: one edit adds a hyperparameter
    cfg = TrialConfig.from_tune(_tune_config())
    assert cfg.findings == FINDINGS and cfg.hyperparameters()["lr"] == 3e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    with pytest.raises(ConfigError, match="unknown trial setting"):
        TrialConfig.from_tune(_tune_config(learning_rate=0.1))
    older = _tune_config()
    del older["ema_decay"], older["mixup"]  # absent from the trials of runs made before they existed
    assert TrialConfig.from_tune(older).ema_decay == 0.0


def _batches(data, split, batch_size=32):
    table = read_split(data, split, columns=["image", "height", "width", "labels"])
    from raycxr.data import decode_images

    images = decode_images(table.select(["image", "height", "width"]).to_pydict())
    labels = label_matrix(table.column("labels")).astype(np.float32)
    return [{"image": torch.from_numpy(images[i:i + batch_size].copy()),
             "labels": torch.from_numpy(labels[i:i + batch_size])} for i in range(0, len(images), batch_size)]


def test_an_epoch_learns_and_validation_scores_through_the_one_path(dataset, tmp_path):
    """Two epochs on the bundled films lower the training loss; validate's AUC is what promote's
    path (split_arrays + predict.target_logits) gives for the same weights; the checkpoint's record
    rebuilds the network that scores the same."""
    from sklearn.metrics import roc_auc_score

    from raycxr.predict import target_logits

    cfg = TrialConfig.from_tune(_tune_config(ema_decay=0.9, mixup=0.2))
    t = build_trial(cfg, rank=0, world=1, device=torch.device("cpu"))
    train = _batches(dataset, "train")
    first = train_one_epoch(t, train)
    second = train_one_epoch(t, train)
    assert second["train_loss"] < first["train_loss"]
    assert 0 < second["train_compute_s"] <= second["train_time_s"]
    m = validate(t, _batches(dataset, "val", batch_size=17))
    val = split_arrays(dataset, "val", "pneumonia")
    assert m["val_images"] == len(val.y)
    assert m["val_auc"] == pytest.approx(roc_auc_score(val.y, target_logits(t.evaluated, t.spec, val.images)),
                                         abs=1e-9)

    record = CheckpointRecord(spec=t.spec, hyperparameters=cfg.hyperparameters(), seed=cfg.seed)
    save_checkpoint(tmp_path, model=t.evaluated, record=record)
    back = CheckpointRecord.load(tmp_path)
    assert back == record
    rebuilt = back.spec.load_network(tmp_path)
    np.testing.assert_allclose(target_logits(rebuilt, back.spec, val.images),
                               target_logits(t.evaluated, t.spec, val.images), atol=1e-6)


def test_a_resumed_trial_whose_checkpoint_ray_deleted_resumes_from_the_newest_it_kept(tmp_path, caplog):
    """Ray deletes a trial's previous latest checkpoint as soon as a newer one is registered; a
    driver killed before the search saved its state again hands the resumed trial a checkpoint that
    is gone (seen in CI as a trial that failed twice on resume)."""
    import os
    import shutil

    from ray.train import Checkpoint

    from raycxr.train import surviving_checkpoint

    trial = tmp_path / "trial_x"
    for i, name in enumerate(["checkpoint_000000", "checkpoint_000002", "checkpoint_000003"]):
        (trial / name).mkdir(parents=True)
        for f in ("model.safetensors", "train_state.pt"):
            (trial / name / f).write_bytes(b"x")
            os.utime(trial / name / f, ns=(10**18 + i * 10**9,) * 2)
    (trial / "checkpoint_000003" / "train_state.pt").unlink()  # a checkpoint cut short is no candidate
    kept = Checkpoint.from_directory(str(trial / "checkpoint_000000"))
    assert surviving_checkpoint(kept).path == kept.path  # present: used as it is
    assert surviving_checkpoint(None) is None
    gone = Checkpoint.from_directory(str(trial / "checkpoint_000001"))
    with caplog.at_level("WARNING"):
        resumed = surviving_checkpoint(gone)
    assert resumed.path == str(trial / "checkpoint_000002") and "deleted by Ray" in caplog.text
    for name in ("checkpoint_000000", "checkpoint_000002", "checkpoint_000003"):
        shutil.rmtree(trial / name)
    assert surviving_checkpoint(gone) is None
