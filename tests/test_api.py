"""The Python API a notebook user calls: raycxr.ingest / search / promote return data, and
raycxr.Model gives calibrated P(target) and labels for paths, arrays and PIL images; the serving
ONNX export (pixels in, calibrated probability out) agrees with it. On the shared real search."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import raycxr

pytestmark = pytest.mark.slow


def _files(sample_dir: Path, n: int = 6) -> list[Path]:
    return sorted(sample_dir.rglob("*.jpeg"))[:n]


def test_the_stages_return_data(promoted_run):
    from raycxr.ingest import IngestSummary
    from raycxr.runs import leaderboard
    from raycxr.search import SearchResult

    ingested, searched, promoted = promoted_run["ingested"], promoted_run["searched"], promoted_run["promoted"]
    assert isinstance(ingested, IngestSummary) and ingested.rows_written > 0
    assert ingested.out == promoted_run["data"] and (ingested.out / "manifest.json").is_file()
    assert isinstance(searched, SearchResult) and Path(searched.run).name == "shared"
    assert [r["trial_id"] for r in searched.leaderboard] == [r["trial_id"] for r in leaderboard(searched.run)]
    assert len(searched.leaderboard) == 2 and all(r["status"] == "ok" for r in searched.leaderboard)
    assert promoted.holdout["pooled"]["auc"] == promoted_run["card"].holdout["pooled"]["auc"]
    assert callable(raycxr.ingest) and callable(raycxr.search) and callable(raycxr.promote)
    assert raycxr.search.run_search and raycxr.promote.PromoteConfig  # still the stage modules


def test_search_through_the_api_prints_nothing(promoted_run):
    """The shared run's search (``verbosity=0``) wrote nothing to the process's stdout (file descriptor 1)."""
    result = promoted_run["searched"]
    out = promoted_run["search_stdout"]
    assert out == "" and len(result.leaderboard) == 2 and all(r["status"] == "ok" for r in result.leaderboard), out[-2000:]


def test_model_gives_calibrated_probabilities_and_labels_for_paths_arrays_and_images(promoted_run, sample_dir):
    import torch
    from PIL import Image
    from scipy.special import expit

    from raycxr.imaging import load_for_model
    from raycxr.models import PromotedModel
    from raycxr.transforms import to_model_input

    model = raycxr.Model.load(promoted_run["model"])
    files = _files(sample_dir)
    p = model.predict_proba(files)
    # by hand: the promoted network on the files read as ingest reads them, then Platt calibration
    cfg = PromotedModel.load(promoted_run["model"])
    spec, net = cfg.spec, cfg.load_network(promoted_run["model"])
    pixels = np.stack([load_for_model(f, spec.stored_size, policy=spec.resize) for f in files])
    with torch.no_grad():
        z = net(to_model_input(torch.from_numpy(pixels[:, None]), image_size=spec.image_size, mean=spec.mean,
                               std=spec.std))[:, spec.target_index].numpy()
    expected = expit(cfg.calibration["scale"] * z + cfg.calibration["bias"])
    assert p.shape == (len(files),) and np.allclose(p, expected, atol=1e-5)
    assert model.predict(files) == [cfg.class_names[int(v >= cfg.threshold)] for v in expected]
    # the same pixels as arrays (a stack, a list of 2-D arrays) and as PIL images give the same answer
    assert np.allclose(model.predict_proba(pixels), p, atol=1e-6)
    assert np.allclose(model.predict_proba(list(pixels)), p, atol=1e-6)
    assert np.allclose(model.predict_proba([Image.fromarray(a) for a in pixels]), p, atol=1e-6)
    # a folder is every image in it, in name order; a full-size array is resized as ingest resizes
    folder = model.predict_proba(files[0].parent)
    assert len(folder) == len(list(files[0].parent.glob("*.jpeg")))
    big = np.asarray(Image.open(files[0]).convert("L"))
    assert abs(model.predict_proba(big)[0] - p[0]) < 0.05
    assert model.target == "pneumonia" and model.threshold == cfg.threshold and "Model(" in repr(model)
    with pytest.raises(ValueError, match="greyscale"):
        model.predict_proba(np.zeros((64, 64, 3), dtype=np.uint8))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
def test_model_on_a_gpu_agrees_with_the_cpu(promoted_run, sample_dir):
    files = _files(sample_dir)
    cpu = raycxr.Model.load(promoted_run["model"]).predict_proba(files)
    assert np.allclose(raycxr.Model.load(promoted_run["model"], device="cuda").predict_proba(files), cpu, atol=1e-4)


def test_the_serving_onnx_graph_returns_predict_probas_probability(promoted_run, sample_dir, tmp_path):
    import onnxruntime as ort

    model = raycxr.Model.load(promoted_run["model"])
    files = _files(sample_dir, 8)
    info = model.export_onnx(tmp_path / "serving.onnx")
    assert info["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "serving.onnx"), providers=["CPUExecutionProvider"])
    image = session.get_inputs()[0]
    size = model.config.spec.stored_size
    assert image.type == "tensor(uint8)" and image.shape[1:] == [1, size, size]
    pixels = model.pixels(files)
    served = session.run(None, {image.name: pixels[:, None]})[0]
    assert served.shape == (len(files),) and np.allclose(served, model.predict_proba(files), atol=1e-4)


def test_promote_through_the_api_prints_nothing_and_can_write_the_serving_graph(promoted_run, tmp_path, capfd):
    import onnxruntime as ort

    from raycxr.data import split_arrays

    run = shutil.copytree(promoted_run["run"], tmp_path / "run")  # a copy: the shared run's holdout log stays as is
    capfd.readouterr()
    card = raycxr.promote(run, tmp_path / "model", n_boot=50, serving_onnx=True)
    out = capfd.readouterr()
    assert out.out == "" and card.run == "shared" and (tmp_path / "model" / "model.safetensors").is_file()
    assert card.serving_onnx["max_abs_diff"] <= 1e-4 and card.serving_onnx["path"] == "model.serving.onnx"
    model = raycxr.Model.load(tmp_path / "model")
    hold = split_arrays(promoted_run["data"], "holdout", "pneumonia")
    session = ort.InferenceSession(str(tmp_path / "model" / "model.serving.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(None, {session.get_inputs()[0].name: hold.images.reshape(len(hold.y), 1,
                                                                                    *hold.images.shape[-2:])})[0]
    # the holdout predictions promote wrote are the serving graph's, image for image
    import csv

    written = [float(r["probability"]) for r in csv.DictReader(open(tmp_path / "model" / "holdout_predictions.csv"))]
    assert np.allclose(served, written, atol=1e-4)
    assert np.allclose(served, model.predict_proba(hold.images.reshape(len(hold.y), *hold.images.shape[-2:])),
                       atol=1e-4)


def test_status_sums_up_a_finished_search_and_watch_returns_when_it_is_done(promoted_run, capsys):
    from raycxr.cli import main
    from raycxr.runs import leaderboard, run_summary

    s = run_summary(promoted_run["run"])
    board = leaderboard(promoted_run["run"])
    assert (s["trials"], s["done"], s["running"], s["errored"], s["waiting"], s["finished"]) == (2, 2, 0, 0, 0, True)
    assert s["best"]["trial_id"] == board[0]["trial_id"] and s["elapsed_s"] > 0 and s["budget_left_s"] is None
    assert main(["status", str(promoted_run["run"]), "--watch", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shared: 2/2 trials done, 0 running, 0 errored, 0 waiting; best val_auc "
                               f"{board[0]['val_auc']:.4f} (trial {board[0]['trial_id']}")
    assert any(board[1]["trial_id"] in line for line in lines[1:])  # then the leaderboard


def test_tensorboard_has_an_hparams_view_of_every_trial(promoted_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from raycxr.runs import leaderboard

    for row in leaderboard(promoted_run["run"]):
        events = next((promoted_run["run"] / "tune" / f"trial_{row['trial_id']}").glob("events.out.tfevents.*"))
        acc = EventAccumulator(str(events))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = {k: v.string_value or v.number_value for k, v in start.session_start_info.hparams.items()}
        assert hparams["model"] == row["model"] and abs(hparams["lr"] - row["lr"]) < 1e-12
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert "ray/tune/val_auc_best" in {m.name.tag for m in experiment.metric_infos}
        assert acc.Scalars("ray/tune/val_auc_best")[-1].value == pytest.approx(row["val_auc"], abs=1e-6)


def test_the_readmes_model_example_runs(promoted_run, capsys, monkeypatch):
    import re

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "raycxr.Model.load" in b)
    monkeypatch.chdir(root)  # the example's sample paths are relative to the checkout
    exec(example.replace('"demo-output/models/demo"', repr(str(promoted_run["model"]))), {})
    out = capsys.readouterr().out
    assert "Model(" in out and ("'pneumonia'" in out or "'not_pneumonia'" in out)
