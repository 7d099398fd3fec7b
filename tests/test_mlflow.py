"""raycxr.tracking against real MLflow: a search's trials as runs (SQLite store), a promoted model
registered (SQLite store and a real `mlflow server` on 127.0.0.1), and the errors a user sees."""

import base64
import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("mlflow", reason="the MLflow tests need mlflow: pip install 'raycxr[test]'")

from mlflow.tracking import MlflowClient  # noqa: E402

from raycxr.cli import main  # noqa: E402
from raycxr.config import HYPERPARAMETERS  # noqa: E402
from raycxr.errors import ConfigError  # noqa: E402
from raycxr.tracking import experiment_name, register_model, search_callbacks  # noqa: E402

pytestmark = pytest.mark.slow


def _space(tmp_path):
    f = tmp_path / "tiny.yaml"
    f.write_text("trials: 2\nmax_epochs: 2\nseed: 0\nresources: {workers_per_trial: 1, cpus_per_worker: 1}\n"
                 "params:\n  model: [test_resnet, test_efficientnet]\n  image_size: 64\n"
                 "  lr: {loguniform: [2.0e-3, 1.0e-2]}\n  batch_size: 32\n")
    return f


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _runs(client, run_name):
    exp = client.get_experiment_by_name(experiment_name(run_name))
    return client.search_runs([exp.experiment_id], filter_string="tags.`raycxr.kind` = 'trial'")


@contextlib.contextmanager
def _tracking_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite store, local artifacts): yields (uri, artifacts)."""
    port = _closed_port()
    artifacts = tmp_path / "artifacts"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db", "--artifacts-destination", str(artifacts)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)  # its own group: its workers too
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri, artifacts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_search_logs_each_trial_and_keeps_no_secret_in_the_run(ray_local, promoted_run, tmp_path, monkeypatch):
    """Each trial an MLflow run on a real tracking server, reached with a user:password URI, and
    that password in none of the run's files (run.json, Tune's tuner.pkl and state, results)."""
    from raycxr.runs import leaderboard

    monkeypatch.chdir(tmp_path)
    with _tracking_server(tmp_path) as (uri, _):
        secret_uri = uri.replace("http://", "http://alice:s3cr3t-pw@")
        assert main(["search", "--data", str(promoted_run["data"]), "--space", str(_space(tmp_path)), "--name",
                     "mlf", "--runs-dir", str(tmp_path / "runs"), "--mlflow", secret_uri]) == 0
        board = {r["trial_id"]: r for r in leaderboard(tmp_path / "runs" / "mlf")}
        client = MlflowClient(uri)
        runs = {r.data.tags["raycxr.trial_id"]: r for r in _runs(client, "mlf")}
        assert set(runs) == set(board) and len(board) == 2
        for tid, row in board.items():
            run = runs[tid]
            assert run.info.status == "FINISHED"
            assert run.data.params == {k: str(row[k]) for k in HYPERPARAMETERS if k in row}
            history = client.get_metric_history(run.info.run_id, "val_auc")
            assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, stepped by epoch
            assert max(m.value for m in history) == pytest.approx(row["val_auc"], abs=1e-12)
            for key in ("val_loss", "train_loss", "val_auc_best", "lr"):
                assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2], key
            assert not {"pid", "time_this_iter_s", "training_iteration", "epoch"} & set(run.data.metrics)
    files = [p for p in (tmp_path / "runs" / "mlf").rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in files) and any(p.name == "run.json" for p in files)
    leaked = [str(p) for p in files if b"s3cr3t-pw" in p.read_bytes()]
    assert leaked == []
    # the signed save of Tune's state holds its files base64-encoded: look inside too
    state = json.loads((tmp_path / "runs" / "mlf" / "tune-state.json").read_text())
    assert state["files"] and not [n for n, b in state["files"].items() if b"s3cr3t-pw" in base64.b64decode(b)]
    assert json.loads((tmp_path / "runs" / "mlf" / "run.json").read_text())["mlflow"] == uri


def test_callback_pickles_without_a_client_and_continues_a_trial_run(tmp_path, monkeypatch):
    """What a resumed search does: Tune unpickles the callback from tuner.pkl, and the trial's
    run is found again by tag; an epoch reported again is not logged twice."""
    from ray.tune.experiment import Trial

    monkeypatch.chdir(tmp_path)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (callback,) = search_callbacks(uri, run_name="resumed")
    trial = Trial("run_trial_in_process", config={"model": "test_resnet", "lr": 0.005}, trial_id="abc_00000",
                  stub=True)
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {"epoch": 1, "val_auc": 0.6, "train_loss": 0.7, "pid": 1})
    again = pickle.loads(pickle.dumps(callback))
    assert again._client is None and again._runs == {}
    again.on_trial_start(0, [trial], trial)
    again.on_trial_result(0, [trial], trial, {"epoch": 1, "val_auc": 0.6, "reported_again": True})
    again.on_trial_result(0, [trial], trial, {"epoch": 2, "val_auc": 0.8, "train_loss": 0.5})
    again.on_trial_complete(0, [trial], trial)
    assert not again._failed
    client = MlflowClient(uri)
    (run,) = _runs(client, "resumed")
    assert run.info.status == "FINISHED" and run.data.params == {"model": "test_resnet", "lr": "0.005"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_auc")] == [(1, 0.6), (2, 0.8)]
    assert "pid" not in run.data.metrics


def test_the_pickled_callback_carries_no_password():
    """What goes into tuner.pkl: the tracking URI without user:password@ (no server needed)."""
    from raycxr.tracking import MLflowTrials

    blob = pickle.dumps(MLflowTrials("https://alice:s3cr3t-pw@mlflow.example.org:5000/x", experiment="e"))
    assert b"s3cr3t-pw" not in blob and b"alice" not in blob
    assert pickle.loads(blob).uri == "https://mlflow.example.org:5000/x"


def _check_registered(client, name, version, out):
    card = json.loads((out / "model_card.json").read_text())
    mv = client.get_model_version(name, str(version))
    assert card["registry"]["version"] == version and card["registry"]["run_id"] == mv.run_id
    metrics = client.get_run(mv.run_id).data.metrics
    pooled = card["holdout"]["pooled"]
    assert metrics["holdout_auc"] == pytest.approx(pooled["auc"], abs=1e-12)
    assert [metrics["holdout_auc_ci95_low"], metrics["holdout_auc_ci95_high"]] == pytest.approx(pooled["ci95"]["auc"])
    assert metrics["threshold"] == pytest.approx(card["threshold"])
    return card, mv


def test_promote_registers_versions(promoted_run, tmp_path, monkeypatch):
    import mlflow
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    run = tmp_path / "run"
    shutil.copytree(promoted_run["run"], run)  # promote logs its holdout read in the run folder
    reads = (promoted_run["run"] / "holdout_reads.jsonl").read_text()
    uri = f"sqlite:///{tmp_path}/reg.db"
    args = ["promote", "--run", str(run), "--register", "cxr", "--mlflow", uri, "--bootstrap", "200"]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    client = MlflowClient(uri)
    card, mv = _check_registered(client, "cxr", 1, tmp_path / "m")
    assert card["registry"]["model_uri"] == "models:/cxr/1"
    # the copy's checkpoints, not the original's (relative to the model folder, as the card keeps paths)
    assert all(str((tmp_path / "m" / m["checkpoint"]).resolve()).startswith(str(run.resolve())) for m in card["members"])
    promoted = {a.path.removeprefix("promoted/") for a in client.list_artifacts(mv.run_id, "promoted")}
    assert {"model.onnx", "model_card.md", "model.safetensors", "config.json", "report.html", "roc.png"} <= promoted
    assert "holdout_predictions.csv" not in promoted  # one row per holdout image: not for a registry

    # A user loads the registered version back, and it computes what the promoted ONNX file does.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    session = ort.InferenceSession(str(tmp_path / "m" / "model.onnx"), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 2 for d in session.get_inputs()[0].shape]  # batch is dynamic
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    loaded = mlflow.pyfunc.load_model("models:/cxr/1").predict(x)
    np.testing.assert_allclose(np.asarray(next(iter(loaded.values()))), expected, rtol=1e-5, atol=1e-6)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    assert main([*args, "--out", str(tmp_path / "m2"), "--tta", "off", "--bootstrap", "20"]) == 0  # only its version
    _check_registered(client, "cxr", 2, tmp_path / "m2")
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'cxr'")) == [1, 2]
    assert (promoted_run["run"] / "holdout_reads.jsonl").read_text() == reads  # the shared run is untouched


def test_register_to_a_tracking_server(promoted_run, tmp_path):
    with _tracking_server(tmp_path) as (uri, artifacts):
        got = register_model(promoted_run["model"], promoted_run["card"], uri=uri, name="cxr")
        assert got["version"] == 1 and got["tracking_uri"] == uri
        mv = MlflowClient(uri).get_model_version("cxr", "1")
        assert mv.run_id == got["run_id"] and mv.status == "READY"
        uploaded = {p.name for p in artifacts.rglob("*") if p.is_file()}
        assert {"model.onnx", "model_card.md", "model_card.json", "config.json", "MLmodel"} <= uploaded


@pytest.mark.parametrize("case, match", [
    ("register: no uri", r"pass --mlflow URI"),
    ("register: not a promoted folder", r"missing model\.onnx, model\.safetensors"),
    ("register: mlflow not installed", r"pip install 'raycxr\[mlflow\]'"),
    ("search: no server", r"no MLflow server answers at http://127\.0\.0\.1:\d+ .*mlflow server"),
    ("search: unknown scheme", r"MLflow cannot use the tracking URI nosuch://x"),
])
def test_errors(case, match, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    if case == "register: mlflow not installed":
        monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` does where it is not installed
    with pytest.raises(ConfigError, match=match):
        if case.startswith("register"):
            register_model(tmp_path, {}, uri=None if case.endswith("no uri") else f"sqlite:///{tmp_path}/r.db",
                           name="cxr")
        else:
            search_callbacks(f"http://127.0.0.1:{_closed_port()}" if case.endswith("no server") else "nosuch://x",
                             run_name="x")
