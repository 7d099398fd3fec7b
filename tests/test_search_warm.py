"""One-worker trials train in Tune's own trial process, which Tune reuses trial after trial, and a
search run twice gives the same figures, epoch by epoch (a real search on the session's local Ray)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from raycxr.models import create_model
from raycxr.precision import resolve
from raycxr.search import SearchConfig, run_search

pytestmark = pytest.mark.slow


def _reports(run) -> list[list[dict]]:
    """Per trial (in the order Tune started them), its per-epoch results."""
    trials = []
    for f in (run / "tune").glob("trial_*/result.json"):
        trials.append([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
    return sorted(trials, key=lambda rows: rows[0]["timestamp"] - rows[0]["time_total_s"])


def test_trials_share_one_warm_process_and_a_search_repeats_exactly(ray_local, dataset, tmp_path):
    space = tmp_path / "space.yaml"
    # 2 CPUs per trial on the 2-CPU Ray: one trial at a time, so each can reuse the last one's process
    space.write_text("trials: 3\nmax_epochs: 2\nseed: 3\nresources: {cpus_per_worker: 2}\n"
                     "params: {model: [test_resnet, test_efficientnet], image_size: 64, batch_size: 16, "
                     "lr: {loguniform: [1.0e-3, 1.0e-2]}, augment: light, mixup: 0.2}\n")
    runs = {}
    # the repeat streams the train split (Ray Data tasks read its shard each epoch, beside a trial
    # that holds 1.9 of the 2 CPUs) where the first read it once into the object store
    for name, path in (("first", "materialize"), ("again", "stream")):
        board = run_search(SearchConfig(data=dataset, space=str(space), name=name, runs_dir=tmp_path / "runs",
                                        data_path=path))
        assert len(board) == 3 and all(r["status"] == "ok" for r in board), board
        runs[name] = _reports(tmp_path / "runs" / name)

    first, again = runs["first"], runs["again"]
    # warm: every trial of a search trained in the same process (Tune's reuse_actors), which
    # measured the trial's training itself (no Ray Train worker: world size 1, no start-up per trial)
    assert len({rows[0]["pid"] for rows in first}) == 1, [rows[0]["pid"] for rows in first]
    assert all(r["world_size"] == 1 and r["train_compute_s"] > 0 for rows in first for r in rows)
    # each trial trained in what `precision: auto` picks on this machine for its network (bf16 on an
    # AMX/AVX512-BF16 CPU, fp32 for the depthwise test_efficientnet), and says so with its speed
    for rows in first:
        expected = resolve("auto", device=torch.device("cpu"), model=create_model(rows[0]["config"]["model"]))
        assert all((r["precision"], r["channels_last"]) == (expected.name, expected.channels_last) for r in rows)
        assert all(r["train_images_per_s"] > 0 for r in rows)
    from raycxr.runs import leaderboard

    for row in leaderboard(tmp_path / "runs" / "first"):  # asked for and trained in, side by side
        expected = resolve("auto", device=torch.device("cpu"), model=create_model(row["model"]))
        assert row["precision"] == "auto" and row["trained_in"] == expected.name + (
            " + channels-last" if expected.channels_last else "")
    assert json.loads((tmp_path / "runs" / "again" / "run.json").read_text())["data_path"] == "stream"
    # the same seed, space and data, materialised or streamed: the same configurations, and the same
    # figures to the last bit (one shard: the same rows in the same order, the same shuffle buffer)
    figures = ("train_loss", "val_auc", "val_loss", "val_accuracy")
    assert [rows[0]["config"] for rows in first] == [rows[0]["config"] for rows in again]
    assert ([[{k: r[k] for k in figures} for r in rows] for rows in first] ==
            [[{k: r[k] for k in figures} for r in rows] for rows in again])


def test_a_grid_search_runs_every_combination_once(ray_local, dataset, tmp_path):
    import optuna

    from raycxr.runs import RunRecord
    from raycxr.storage import RunStore

    space = tmp_path / "grid.yaml"
    # trials: 9 is the space's own count: a grid runs its 2 x 2 combinations instead
    space.write_text("trials: 9\nmax_epochs: 1\nseed: 1\n"
                     "params: {model: [test_resnet, test_efficientnet], image_size: 64, batch_size: 16, "
                     "lr: [1.0e-3, 1.0e-2]}\n")
    board = run_search(SearchConfig(data=dataset, space=str(space), name="grid", runs_dir=tmp_path / "runs",
                                    searcher="grid"))
    assert sorted((r["model"], r["lr"]) for r in board) == [
        ("test_efficientnet", 1e-3), ("test_efficientnet", 1e-2), ("test_resnet", 1e-3), ("test_resnet", 1e-2)]
    assert all(r["status"] == "ok" for r in board), board
    # run.json says the search finished (status --watch stops on it)
    assert RunRecord.load(RunStore(tmp_path / "runs" / "grid")).ended.endswith(": finished")
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{tmp_path / 'runs' / 'grid' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    # Tune saved the searcher (with its grid) for --resume: pickle can read it back
    saved = list((tmp_path / "runs" / "grid" / "tune").glob("searcher-state-*.pkl"))
    assert saved and pickle.loads(saved[0].read_bytes())["_sampler"]._all_grids


def test_a_grid_needs_lists_not_ranges(dataset, tmp_path):
    from raycxr.errors import ConfigError

    space = tmp_path / "grid.yaml"
    space.write_text("params: {model: [test_resnet], lr: {loguniform: [1.0e-3, 1.0e-2]}, batch_size: [8, 16]}\n")
    with pytest.raises(ConfigError, match=r"params.lr: a grid needs a list of values, not a loguniform range"):
        run_search(SearchConfig(data=dataset, space=str(space), name="g", runs_dir=tmp_path / "runs",
                                searcher="grid"))
    assert not (tmp_path / "runs" / "g").exists()


def test_a_search_stopped_by_its_time_budget_says_so_and_status_watch_returns(ray_local, dataset, tmp_path, capsys):
    from raycxr.cli import main
    from raycxr.errors import NoEligibleTrialError
    from raycxr.runs import RunRecord, run_summary
    from raycxr.storage import RunStore

    space = tmp_path / "space.yaml"
    space.write_text("trials: 8\nmax_epochs: 6\nseed: 2\n"
                     "params: {model: test_resnet, image_size: 64, batch_size: 16, lr: {loguniform: [1.0e-3, 1.0e-2]}}\n")
    # 1.2 seconds: Tune stops the trials it started before any can report (a trial process alone takes
    # longer to start); Tune marks them TERMINATED, which used to read as "no trial reported: see the errors"
    with pytest.raises(NoEligibleTrialError, match=r"the time budget \(0.02 min\) of short ended before any trial"):
        run_search(SearchConfig(data=dataset, space=str(space), name="short", runs_dir=tmp_path / "runs",
                                time_budget_min=0.02))
    run = tmp_path / "runs" / "short"
    assert RunRecord.load(RunStore(run)).ended.endswith(": time budget")
    s = run_summary(run)
    assert s["finished"] and s["running"] == 0 and s["done"] < 8, s
    # --watch on a search that stopped short of its trials prints once and returns (it used to wait forever)
    assert main(["status", str(run), "--watch", "0.1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "the search stopped (time budget" in first and "raycxr search --resume continues it" in first, first


def _split_into_shards(dataset: Path, out: Path, pieces: int) -> Path:
    """A copy of ``dataset`` whose train split is ``pieces`` shards (the manifest lists them)."""
    import pyarrow.parquet as pq

    shutil.copytree(dataset, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (shard,) = manifest["shards"]["train"]
    table = pq.read_table(out / shard)
    (out / shard).unlink()
    step = -(-table.num_rows // pieces)
    names = []
    for k in range(pieces):
        names.append(f"train/part-{k:05d}-split.parquet")
        pq.write_table(table.slice(k * step, step), out / names[-1])
    manifest["shards"]["train"] = names
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_streamed_split_gives_each_epoch_the_materialised_examples_in_its_own_shard_order(
        ray_local, dataset, tmp_path):
    from raycxr.data import StreamedSplit, open_split
    from raycxr.train import _collate_fn

    data = _split_into_shards(dataset, tmp_path / "sharded", pieces=4)
    collate = _collate_fn()  # what the training loop decodes batches with

    def rows(batches) -> list[tuple]:
        return [(bytes(img.numpy().tobytes()), tuple(lab.tolist()))
                for b in batches for img, lab in zip(b["image"], b["labels"])]

    materialised = rows(open_split(data, "train").materialize().iter_torch_batches(batch_size=50, collate_fn=collate))
    streamed = StreamedSplit.open(data, "train")
    epochs = [rows(streamed.iter_torch_batches(batch_size=50, collate_fn=collate, local_shuffle_seed=seed))
              for seed in (0, 1)]
    train_rows = json.loads((data / "manifest.json").read_text())["counts"]["train"]["images"]
    assert len(materialised) == train_rows > 100 and len(set(materialised)) > 0.9 * train_rows
    for epoch in epochs:  # every example once per epoch, as materialised
        assert sorted(epoch) == sorted(materialised)
    assert epochs[0] != epochs[1]  # each epoch its own order
    # the same seed: the same order (a resumed or repeated trial sees the same batches)
    assert rows(streamed.iter_torch_batches(batch_size=50, collate_fn=collate, local_shuffle_seed=1)) == epochs[1]
    # no seed: the manifest's shard order, row for row the materialised path
    assert rows(streamed.iter_torch_batches(batch_size=50, collate_fn=collate)) == materialised


def test_a_streamed_split_read_a_few_shards_at_a_time_keeps_whole_batches_across_chunks(
        ray_local, dataset, tmp_path, monkeypatch):
    """Read two shards at a time (raycxr.data.STREAM_CHUNK_SHARDS, 4 by default), a 4-shard split
    is two chunks: every example once per epoch, every batch but the last of the epoch whole (a
    chunk's last rows begin the next chunk's first batch), each seed its own order, repeatable."""
    import raycxr.data
    from raycxr.data import StreamedSplit, open_split
    from raycxr.train import _collate_fn

    data = _split_into_shards(dataset, tmp_path / "sharded", pieces=4)
    collate = _collate_fn()
    monkeypatch.setattr(raycxr.data, "STREAM_CHUNK_SHARDS", 2)

    def batches(seed):
        return list(StreamedSplit.open(data, "train").iter_torch_batches(batch_size=48, collate_fn=collate,
                                                                         local_shuffle_seed=seed))

    def rows(bs) -> list[tuple]:
        return [(bytes(img.numpy().tobytes()), tuple(lab.tolist())) for b in bs for img, lab in zip(b["image"], b["labels"])]

    materialised = rows(open_split(data, "train").materialize().iter_torch_batches(batch_size=48, collate_fn=collate))
    first, second = batches(0), batches(1)
    for epoch in (first, second):
        assert sorted(rows(epoch)) == sorted(materialised)
        sizes = [len(b["labels"]) for b in epoch]
        assert set(sizes[:-1]) == {48} and 0 < sizes[-1] <= 48, sizes
    assert rows(first) != rows(second) and rows(batches(1)) == rows(second)


def test_auto_materialises_what_fits_half_the_object_store_and_streams_the_rest():
    from raycxr.errors import ConfigError
    from raycxr.trainables import data_path_for

    gib = 2**30
    assert data_path_for("auto", 2 * gib, 8 * gib)[0] == "materialize"
    path, why = data_path_for("auto", 10 * gib, 8 * gib)
    assert path == "stream" and "10.00 GiB" in why and "125%" in why
    assert data_path_for("materialize", 10 * gib, 8 * gib)[0] == "materialize"
    assert data_path_for("stream", 1, 8 * gib)[0] == "stream"
    with pytest.raises(ConfigError, match="choose one of auto, materialize, stream"):
        SearchConfig(data="d", space="s", data_path="lazy")
