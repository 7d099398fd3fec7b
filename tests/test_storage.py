"""Runs kept anywhere pyarrow reaches: a real S3 API on localhost (moto's server), not a stand-in
for raycxr's code. A search with --storage s3://... is stopped, resumed, listed, promoted and
its model evaluated, and nothing of the run lands on the local disk."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess

import pytest

from raycxr.errors import ConfigError
from raycxr.storage import RunStore, local_copy
from tests.test_faults import RAYCXR, _wait_for



def _listing(uri: str) -> list[str]:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    return sorted(i.path[len(root) + 1:] for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True,
                                                                                           allow_not_found=True)))


def test_run_store_on_s3_claims_reads_writes_and_fetches(s3_server):
    store = RunStore("s3://raycxr/unit/run-a")
    assert not store.exists("run.json")
    assert store.claim("run.json", '{"name": "run-a"}\n')
    assert not store.claim("run.json", '{"name": "other"}\n')  # taken: the first claim stays
    assert json.loads(store.read_text("run.json")) == {"name": "run-a"}
    store.append_line("holdout_reads.jsonl", '{"n": 1}')
    store.append_line("holdout_reads.jsonl", '{"n": 2}')
    assert store.read_text("holdout_reads.jsonl").splitlines() == ['{"n": 1}', '{"n": 2}']
    # a checkpoint folder is fetched to the local cache, and fetched again when it changes
    store.write_text("trials/t1/epoch_001/trial.json", '{"v": 1}')
    first = local_copy(store.child("trials/t1/epoch_001"))
    assert json.loads((first / "trial.json").read_text()) == {"v": 1} and first.name == "epoch_001"
    assert local_copy(store.child("trials/t1/epoch_001")) == first  # unchanged: the same copy
    store.write_text("trials/t1/epoch_001/trial.json", '{"v": 22}')
    again = local_copy(store.child("trials/t1/epoch_001"))
    assert json.loads((again / "trial.json").read_text()) == {"v": 22}
    store.delete("run.json")
    assert not store.exists("run.json")


def test_a_run_name_on_s3_is_claimed_by_exactly_one_of_many_racing_searches(s3_server):
    """Issue 27: S3's conditional put decides the claim (check-then-put let several threads through);
    a loser never deletes what it did not create, even one that believed it had won."""
    import threading

    store = RunStore("s3://raycxr/unit/race")
    barrier, won = threading.Barrier(8), []

    def claim(i):
        barrier.wait()
        if store.claim("run.json", f'{{"by": {i}}}\n'):
            won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and json.loads(store.read_text("run.json")) == {"by": won[0]}
    loser = next(i for i in range(8) if i not in won)
    assert not store.release("run.json", f'{{"by": {loser}}}\n') and store.exists("run.json")
    assert store.release("run.json", f'{{"by": {won[0]}}}\n') and not store.exists("run.json")


def test_a_fetch_never_writes_outside_the_cache_nor_takes_a_whole_bucket(s3_server, tmp_path, monkeypatch):
    """Issue 27: a bucket key with '..' under a checkpoint would, joined onto the cache folder, write
    outside it; a location far larger than a checkpoint is not fetched; a checkpoint a run's results
    name in another bucket or above the run is not the run's."""
    import boto3

    from raycxr.errors import DataError

    monkeypatch.setenv("RAYCXR_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket="raycxr", Key="unit/evil/ckpt/trial.json", Body=b"{}")
    s3.put_object(Bucket="raycxr", Key="unit/evil/ckpt/../../../../../escaped.txt", Body=b"x")
    store = RunStore("s3://raycxr/unit/evil")
    with pytest.raises(DataError, match="outside itself"):
        local_copy(store.child("ckpt"))
    assert not list(tmp_path.rglob("escaped.txt"))
    store.write_text("big/ckpt/a.bin", "x" * 3 * 2**20)
    monkeypatch.setenv("RAYCXR_MAX_FETCH_MB", "2")
    with pytest.raises(DataError, match="more than a checkpoint"):
        local_copy(store.child("big/ckpt"))
    assert store.resolve("raycxr/unit/evil/tune/t/ckpt") == "s3://raycxr/unit/evil/tune/t/ckpt"
    for elsewhere in ("gs://raycxr/unit/evil/tune/t/ckpt", "raycxr/unit/other/x", "raycxr/unit/evil/../other/x"):
        assert store.resolve(elsewhere) is None, elsewhere


def test_a_run_uri_that_is_no_run_says_what_to_pass(s3_server):
    with pytest.raises(ConfigError, match="no run.json.*s3://bucket/raycxr/NAME"):
        RunStore("s3://raycxr/nothing-here").require_run("--run")


@pytest.mark.slow
def test_search_on_s3_stops_resumes_lists_promotes_and_evaluates(s3_server, dataset, sample_dir, tmp_path, monkeypatch,
                                                                 capsys):
    """A dataset ingested to S3, searched there on the streamed path, the run on S3 too, stopped and
    resumed, promoted from the S3 dataset and evaluated on it."""
    import ray

    from raycxr.data import read_manifest
    from raycxr.ingest import IngestConfig, ingest

    if ray.is_initialized():  # the searches below own their Rays; the session's would only crowd the cores
        ray.shutdown()
    data = "s3://raycxr/data/k"  # the session's dataset, ingested again straight to the bucket
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=data, image_size=64, seed=0))
    assert read_manifest(data).fingerprint == read_manifest(dataset).fingerprint
    space = tmp_path / "space.yaml"
    space.write_text("trials: 2\nmax_epochs: 3\nseed: 2\n"
                     "params: {model: test_resnet, image_size: 32, lr: {loguniform: [1.0e-3, 1.0e-2]}}\n")
    run = "s3://raycxr/runs/s3run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    work = tmp_path / "cwd"  # every command runs here: nothing of the run may land in it
    work.mkdir()

    def raycxr(args, n):
        return subprocess.Popen([*RAYCXR, *args], cwd=work, env=env, stdout=open(tmp_path / f"{n}.log", "w"),
                                stderr=subprocess.STDOUT)

    def log(n):
        return (tmp_path / f"{n}.log").read_text()[-4000:]

    search = raycxr(["search", "--data", data, "--data-path", "stream", "--space", str(space), "--name", "s3run",
                     "--storage", "s3://raycxr/runs", "--num-cpus", "2", "--searcher", "random", "--no-early-stopping"],
                    "search")
    _wait_for(lambda: any(p.endswith("/checkpoint_000000/model.safetensors") for p in _listing(run + "/tune")), 300,
              "a first checkpoint in S3", search)
    search.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    assert search.wait(timeout=180) == 130, log("search")  # interrupted, as a program stopped by Ctrl+C exits
    assert "raycxr search --resume s3://raycxr/runs/s3run" in log("search"), log("search")
    assert "streamed from storage each epoch" in log("search") or "--data-path stream" in log("search"), log("search")

    resumed = raycxr(["search", "--resume", run, "--num-cpus", "2"], "resume")
    assert resumed.wait(timeout=400) == 0, log("resume")

    # status, promote and evaluate start no Ray: run in this process (the command's own main), from work/
    from raycxr.cli import main

    monkeypatch.chdir(work)
    capsys.readouterr()
    assert main(["status", run]) == 0
    status = capsys.readouterr()
    lines = [ln for ln in status.out.splitlines() if ln.strip()]
    # the summary line (read from the bucket), then the leaderboard
    assert lines[0].startswith("s3run: 2/2 trials done, 0 running, 0 errored"), status.out
    assert lines[1].split()[:3] == ["rank", "trial_id", "val_auc"] and len(lines) == 4, status.out
    board = list(csv.DictReader(io.StringIO(RunStore(run).read_text("leaderboard.csv"))))
    assert len(board) == 2 and all(r["status"] == "ok" and r["epochs"] == "3" for r in board), board
    assert all(r["checkpoint"].startswith(run + "/tune/trial_") for r in board), board

    out = tmp_path / "model"
    assert main(["promote", "--run", run, "--data", data, "--out", str(out), "--bootstrap", "100", "--tta", "off"]) == 0, \
        capsys.readouterr().err[-3000:]
    card = json.loads((out / "model_card.json").read_text())
    assert card["run"] == "s3run" and card["members"][0]["trial_id"] in {r["trial_id"] for r in board}
    assert card["data"]["dir"] == data  # a URI stays a URI (a folder is kept relative: tests/test_promote.py)
    assert (out / "report.html").stat().st_size > 10_000  # the learning curves came from S3 too
    reads = RunStore(run).read_text("holdout_reads.jsonl").splitlines()
    assert len(reads) == 1 and json.loads(reads[0])["out"] == str(out.resolve())

    assert main(["evaluate", "--model", str(out), "--data", data, "--split", "val", "--bootstrap", "50"]) == 0, \
        capsys.readouterr().err[-3000:]
    evaluated = json.loads(next(out.glob("evaluations/*-val.json")).read_text())["metrics"]["pooled"]
    # the promoted model, scored on validation again, gives what promote measured there
    assert evaluated["auc"] == pytest.approx(card["validation"]["auc"], abs=1e-6)
    assert evaluated["n"] == card["validation"]["n"]

    stored = _listing(run)
    assert {"run.json", "leaderboard.csv", "holdout_reads.jsonl"} <= set(stored), stored
    assert sum(p.startswith("tune/trial_") and p.endswith("/result.json") for p in stored) == 2
    assert list(work.iterdir()) == []  # no runs/ folder on the local disk
