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
    from raycxr.config import PARAMS

    fields = {f.name: f for f in dataclasses.fields(TrialConfig)}
    assert set(HYPERPARAMETERS) <= set(fields)  # every searchable hyperparameter of config.PARAMS is a field
    for name, (typ, _, _) in PARAMS.items():  # of the declared type, None (the space leaves it) by default
        assert fields[name].type == f"{typ.__name__} | None" and fields[name].default is None, name
    searchable = [n for n in fields if n in PARAMS]
    assert searchable == list(PARAMS)  # in the same order: the leaderboard's and the card's columns
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
    assert 0 <= second["train_first_batch_s"] <= second["train_time_s"] - second["train_compute_s"]
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


# --- source_balance: the weights and the per-batch sampler on a stream of batches ---------------

COUNTS = {"a": 7000, "b": 100}  # one source 70 times the other (issue 36)
N = sum(COUNTS.values())


def _stream(counts=COUNTS, *, batch_size=32, seed=0):
    """A pooled train split as the loop meets it: a generator of collated batches in shuffled order,
    never a list (the sampler must not need the whole split). "row" names each row."""
    codes = np.concatenate([np.full(n, i) for i, n in enumerate(counts.values())])
    order = np.random.default_rng(seed).permutation(len(codes))
    for i in range(0, len(order), batch_size):
        rows = torch.from_numpy(order[i:i + batch_size])
        yield {"image": torch.zeros(len(rows), 1, 4, 4, dtype=torch.uint8), "row": rows,
               "labels": torch.zeros(len(rows), len(FINDINGS)), "source": torch.from_numpy(codes)[rows]}


def _balancer(how, *, epoch=0, rank=0, world=1, counts=COUNTS):
    from raycxr.train import SourceBalancer

    cfg = TrialConfig.from_tune(_tune_config(source_balance=how, train_sources=list(counts),
                                             train_source_counts=list(counts.values())))
    return SourceBalancer(cfg, epoch=epoch, rank=rank, world=world, device=torch.device("cpu"))


@pytest.mark.parametrize("how, expected", [
    ("none", [1.0, 1.0]),
    ("equal", [N / (2 * 7000), N / (2 * 100)]),  # each source N/2 rows
    ("sqrt", [N * 7000**0.5 / ((7000**0.5 + 10) * 7000), N * 10 / ((7000**0.5 + 10) * 100)]),
])
def test_source_weights_keep_the_epoch_size_and_set_each_share(how, expected):
    from raycxr.train import source_weights

    w = source_weights(list(COUNTS.values()), how)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert float(np.dot(w, list(COUNTS.values()))) == pytest.approx(N)
    with pytest.raises(ValueError, match="none, sqrt, equal"):
        source_weights([1, 2], "inverse")


@pytest.mark.parametrize("how, share", [
    ("equal", {"a": 0.5, "b": 0.5}),
    ("sqrt", {"a": 7000**0.5 / (7000**0.5 + 10), "b": 10 / (7000**0.5 + 10)}),  # ~ sqrt(70) : 1
])
def test_a_balanced_stream_gives_each_source_its_share_of_the_epoch(how, share):
    """Over a stream of batches each source trains about its share of N rows: within 5 standard
    deviations of the binomial draws (a row of weight w is trained floor(w) times, plus once with
    probability frac(w)), and each row floor(w) or ceil(w) times."""
    balancer = _balancer(how)
    batches = list(balancer(_stream()))
    assert all(len(b["row"]) > 0 and len(b["row"]) == len(b["image"]) == len(b["labels"]) for b in batches)
    rows = torch.cat([b["row"] for b in batches]).numpy()
    codes = torch.cat([b["source"] for b in batches]).numpy()
    times = np.bincount(rows, minlength=N)
    metrics = balancer.metrics()
    for i, (src, n) in enumerate(COUNTS.items()):
        w = metrics[f"source_weight/{src}"]
        assert n * w == pytest.approx(N * share[src])
        frac = w - np.floor(w)
        sd = (n * frac * (1 - frac)) ** 0.5
        trained = int((codes == i).sum())
        assert abs(trained - N * share[src]) <= 5 * sd, (src, trained, N * share[src], sd)
        assert metrics[f"train_rows/{src}"] == trained
        mine = times[:7000] if src == "a" else times[7000:]
        assert set(np.unique(mine)) <= {int(np.floor(w)), int(np.ceil(w))}


def test_none_trains_every_row_once_and_the_same_seed_draws_the_same_rows():
    balancer = _balancer("none")
    rows = torch.cat([b["row"] for b in balancer(_stream())]).numpy()
    np.testing.assert_array_equal(np.sort(rows), np.arange(N))
    assert balancer.metrics() == {"source_weight/a": 1.0, "source_weight/b": 1.0,
                                  "train_rows/a": 7000, "train_rows/b": 100}

    def drawn(**kw):
        return torch.cat([b["row"] for b in _balancer("equal", **kw)(_stream())]).numpy()

    first = drawn()
    np.testing.assert_array_equal(first, drawn())  # (seed, epoch, rank) fixes the draws
    for other in (drawn(epoch=1), drawn(rank=1)):
        assert len(other) != len(first) or (other != first).any()


@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_thinned_to_nothing_is_skipped_on_one_worker_and_keeps_one_row_under_ddp(world):
    """One-row batches of the large source (weight ~0.51 under equal): on one worker about half are
    dropped; under DDP every batch stays a step (each rank must take as many as the others)."""
    kept = list(_balancer("equal", world=world)(_stream({"a": 400}, batch_size=1)))
    assert all(len(b["row"]) == 1 for b in kept)
    if world == 1:
        w = N / (2 * 7000)
        assert abs(len(kept) - 400 * w) <= 5 * (400 * w * (1 - w)) ** 0.5
    else:
        assert len(kept) == 400
