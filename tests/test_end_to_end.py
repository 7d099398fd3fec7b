"""ingest -> search (real local Ray, Tune + Optuna + ASHA, Train workers) -> promote -> predict.

On the bundled real sample, with timm's tiny test models. About a minute on 2 cores.
"""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raycxr.cli import main
from raycxr.data import read_split

pytestmark = pytest.mark.slow


def _space(tmp_path):
    f = tmp_path / "tiny.yaml"
    f.write_text("""
trials: 2
max_epochs: 1
seed: 0
resources: {workers_per_trial: 1, cpus_per_worker: 1}
params:
  model: [test_resnet, test_efficientnet]
  image_size: 64
  augment: [none, light]
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  batch_size: 32
  ema_decay: 0.99
""")
    return f


def test_search_refuses_trials_larger_than_the_cluster(ray_local, tmp_path):
    from raycxr.config import parse_space
    from raycxr.errors import ConfigError
    from raycxr.cluster import cluster_capacity, plan_resources

    space = parse_space({"params": {"model": "test_resnet", "lr": 0.01},
                         "resources": {"workers_per_trial": 2, "cpus_per_worker": 2}}, name="big")
    with pytest.raises(ConfigError, match="needs 4 CPUs .* cluster has 2"):
        plan_resources(space, trials=2, capacity=cluster_capacity())
    fits = parse_space({"params": {"model": "test_resnet", "lr": 0.01}}, name="ok")
    assert plan_resources(fits, trials=8, capacity=cluster_capacity())["concurrent"] == 2


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, sample_dir, _ray_session):
    """The README's path through the CLI, once for this module: ingest the sample at 64 px; search
    (2 trials, EMA) with the holdout folder moved away; promote with --tta on. {"data", "runs",
    "model", "board" (leaderboard.csv rows), "card" (model_card.json), "out", "err" (the search's
    console), "tmp"}. Tests read it; what they write goes to their own folders."""
    import contextlib

    import ray

    from raycxr.cluster import init_ray

    if not ray.is_initialized():
        init_ray(address=None, num_cpus=2)
    tmp = tmp_path_factory.mktemp("e2e")
    data, runs, model_dir = tmp / "data", tmp / "runs", tmp / "model"
    # its own user-level holdout ledger, as each test has (conftest's _own_ledgers): these are the
    # bundled films other tests' promotions read too
    ledgers = pytest.MonkeyPatch()
    ledgers.setenv("RAYCXR_LEDGER_DIR", str(tmp / "ledgers"))
    assert main(["ingest", "--source", f"kermany={sample_dir}", "--out", str(data), "--image-size", "64"]) == 0
    # The search must not need the holdout: hide it while searching.
    hidden = tmp / "holdout-hidden"
    shutil.move(data / "holdout", hidden)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["search", "--data", str(data), "--space", str(_space(tmp)), "--name", "e2e",
                     "--runs-dir", str(runs)]) == 0
    shutil.move(hidden, data / "holdout")
    # --tta on: the promoted model (and its exports, checked below) averages the views.
    try:
        assert main(["promote", "--run", str(runs / "e2e"), "--out", str(model_dir), "--bootstrap", "200",
                     "--tta", "on"]) == 0
    finally:
        ledgers.undo()
    return {"data": data, "runs": runs, "model": model_dir, "board": list(csv.DictReader(open(runs / "e2e" / "leaderboard.csv"))),
            "card": json.loads((model_dir / "model_card.json").read_text()), "out": out.getvalue(),
            "err": err.getvalue(), "tmp": tmp}


def test_a_search_without_the_holdout_logs_a_line_per_trial_and_keeps_checkpoints_and_tensorboard(e2e):
    out, runs, board = e2e["out"], e2e["runs"], e2e["board"]
    assert "Leaderboard" in out
    # the console shows a line per trial start and end, not Tune's tables (those come with -v)
    assert "Trial status" not in out and "Current best trial" not in out
    assert sum("finished: val_auc" in line and "trials done]" in line for line in e2e["err"].splitlines()) == 2
    assert len(board) == 2 and all(r["status"] == "ok" for r in board)
    aucs = [float(r["val_auc"]) for r in board]
    assert all(0.0 <= a <= 1.0 for a in aucs) and aucs == sorted(aucs, reverse=True)
    # one-worker trials train in Tune's own trial processes: their checkpoints are Tune's
    assert all(Path(r["checkpoint"]).parent == runs / "e2e" / "tune" / f"trial_{r['trial_id']}" and
               (Path(r["checkpoint"]) / "model.safetensors").is_file() for r in board)
    assert len(list((runs / "e2e" / "tune").glob("trial_*/events.out.tfevents.*"))) == 2  # TensorBoard

    # Checkpoints hold the EMA average for evaluation and the raw weights to resume from.
    from safetensors.torch import load_file

    ckpt = Path(board[0]["checkpoint"])
    averaged, raw = load_file(str(ckpt / "model.safetensors")), torch.load(ckpt / "train_state.pt")["model"]
    assert averaged.keys() == raw.keys() and any(not torch.equal(averaged[k], raw[k]) for k in raw)


def test_promote_writes_the_exports_plots_and_a_card_chosen_on_validation(e2e):
    from PIL import Image

    data, runs, model_dir, board, card = e2e["data"], e2e["runs"], e2e["model"], e2e["board"], e2e["card"]
    for name in ("model.safetensors", "model.torchscript.pt", "model.onnx", "config.json", "model_card.md",
                 "model_card.json", "report.html", "roc.png", "pr.png", "reliability.png", "confusion.png",
                 "learning_curves.png", "search_history.png"):
        assert (model_dir / name).is_file(), name
    for png in model_dir.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 5, png  # a drawn figure
    assert (model_dir / "report.html").read_text().count("data:image/png;base64,") == 7
    # Noise-aware selection among the finalists (both trials here), on validation only.
    sel = card["selection"]
    assert sel["rule"] == "shift-auc" and [f["trial_id"] for f in sel["finalists"]] == [r["trial_id"] for r in board]
    assert {m["trial_id"] for m in card["members"]} <= {r["trial_id"] for r in board}
    assert sel["finalists"][0]["tied_with_best"] or sel["finalists"][1]["tied_with_best"]
    for f in sel["finalists"]:
        lo, hi = f["shift_auc_ci95"]
        assert 0 <= lo <= f["shift_auc"] <= hi <= 1 and f["latency_ms"] > 0
    if sel["kind"] == "single":  # the best scored of the tied finalists as fast as the quickest (within noise)
        from raycxr.select import LATENCY_NOISE
        tied = [f for f in sel["finalists"] if f["tied_with_best"]]
        quick = [f for f in tied if f["latency_ms"] <= min(t["latency_ms"] for t in tied) * (1 + LATENCY_NOISE)]
        assert card["trial"]["trial_id"] == max(quick, key=lambda f: f["shift_auc"])["trial_id"]
    assert card["tta"]["used"] and 0 <= card["tta"]["val_auc_with"] <= 1 and 0 <= card["tta"]["val_auc_without"] <= 1
    pooled = card["holdout"]["pooled"]
    assert pooled["n"] == json.loads((data / "manifest.json").read_text())["counts"]["holdout"]["images"]
    for k in ("auc", "accuracy", "sensitivity", "specificity"):
        lo, hi = pooled["ci95"][k]
        assert 0.0 <= lo <= pooled[k] <= hi <= 1.0, k
    assert len((runs / "e2e" / "holdout_reads.jsonl").read_text().splitlines()) == 1
    assert "Holdout metrics" in (model_dir / "model_card.md").read_text()


def test_the_threshold_and_calibration_come_from_validation_alone_and_loading_never_unpickles(e2e, monkeypatch):
    # The threshold and calibration come from validation alone: recompute them from val predictions.
    from raycxr.metrics import calibrate_logits, choose_operating_threshold, fit_calibration
    from raycxr.data import split_arrays
    from raycxr.predict import load_promoted, target_logits

    # Loading a promoted model never unpickles: every unpickling entry point fails while it loads.
    import pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("a promoted model must load without unpickling")

    with monkeypatch.context() as m:
        for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            m.setattr(mod, name, no_pickle)
        model_v, cfg_v = load_promoted(e2e["model"])
    from raycxr.transforms import TestTimeAugment

    assert isinstance(model_v, TestTimeAugment) and cfg_v.tta is True
    val = split_arrays(e2e["data"], "val", "pneumonia")
    vz, vy, vg = target_logits(model_v, cfg_v.spec, val.images), val.y, val.groups
    cal = fit_calibration(vy, vz)
    thr, _ = choose_operating_threshold(vy, calibrate_logits(vz, cal), vg, rule="youden")
    assert cfg_v.calibration["scale"] == pytest.approx(cal["scale"])
    assert cfg_v.calibration["bias"] == pytest.approx(cal["bias"]) and cfg_v.threshold == pytest.approx(thr)


def test_promote_evaluate_and_predict_score_the_same_films_alike(e2e, tmp_path):
    """External validation: the same metrics on any ingested split, written next to the model. One
    scoring path: promote's holdout probabilities, evaluate's on the same split and
    predict's on PNG copies of the same stored films are the same numbers (tests/test_predict.py:
    also past |16|)."""
    from PIL import Image

    from raycxr.data import split_arrays
    from raycxr.predict import predict as predict_files

    data, card = e2e["data"], e2e["card"]
    model_dir = e2e["model"]  # evaluations/ lands beside it (checked for file names below)
    val = split_arrays(data, "val", "pneumonia")
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--split", "val", "--bootstrap", "100"]) == 0
    evaluation = json.loads(next((model_dir / "evaluations").glob("*-val.json")).read_text())
    assert evaluation["metrics"]["pooled"]["n"] == len(val.y)
    assert evaluation["metrics"]["pooled"]["auc"] == pytest.approx(card["validation"]["auc"])
    assert main(["evaluate", "--model", str(model_dir), "--data", str(data), "--split", "holdout",
                 "--bootstrap", "20"]) == 0

    def probabilities(path):
        with open(path) as f:
            return np.array([float(r["probability"]) for r in csv.DictReader(f)])

    promoted_p = probabilities(model_dir / "holdout_predictions.csv")
    evaluated_p = probabilities(next((model_dir / "evaluations").glob("*-holdout-predictions.csv")))
    np.testing.assert_allclose(evaluated_p, promoted_p, rtol=1e-12)
    hold = split_arrays(data, "holdout", "pneumonia")
    pngs = []
    for i, img in enumerate(hold.images[:6, 0]):
        pngs.append(tmp_path / "holdout-png" / f"{i}.png")
        pngs[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(pngs[-1])
    # float32 convolutions give last-bit differences between a batch of 6 and one of 128: 1e-6, not 0
    np.testing.assert_allclose([r.probability for r in predict_files(model_dir, pngs)], promoted_p[:6], atol=1e-6)


def test_the_exports_agree_with_the_eager_model_on_real_images(e2e):
    """Loaded independently of promote."""
    import onnxruntime as ort

    from raycxr.data import decode_images
    from raycxr.predict import load_promoted
    from raycxr.transforms import to_model_input

    model_dir = e2e["model"]
    model, _ = load_promoted(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())["spec"]  # read as a user would, not through raycxr
    rows = read_split(e2e["data"], "holdout", columns=["image", "height", "width"]).to_pydict()
    x = to_model_input(torch.from_numpy(decode_images(rows).copy()), image_size=cfg["image_size"],
                       mean=cfg["mean"], std=cfg["std"])
    with torch.no_grad():
        eager = model(x).numpy()
        scripted = torch.jit.load(str(model_dir / "model.torchscript.pt"))(x).numpy()
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert eager.shape == (len(x), len(cfg["findings"])) and np.abs(eager).max() > 0
    assert np.abs(scripted - eager).max() <= 1e-4
    assert np.abs(onnx_out - eager).max() <= 1e-4


def test_predict_gives_calibrated_probabilities_json_saliency_and_a_lateral_warning(e2e, sample_dir, tmp_path,
                                                                                     capsys):
    """Real files get the model's probability; a broken file gets an error row and exit 1."""
    from PIL import Image

    from raycxr.imaging import load_for_model
    from raycxr.predict import load_promoted
    from raycxr.transforms import to_model_input
    from tests.builders import dicom_from_array

    model_dir = e2e["model"]
    model, promoted = load_promoted(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())["spec"]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = sorted((sample_dir / "PNEUMONIA").iterdir())[:3]
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), *map(str, good), str(bad)]) == 1
    pred = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file"] for r in pred] == [*map(str, good), str(bad)]
    assert pred[-1]["error"] and not pred[-1]["probability"]
    for r in pred[:3]:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and r["label"] in ("not_pneumonia", "pneumonia")
        img = torch.from_numpy(load_for_model(r["file"], cfg["stored_size"], policy=cfg["resize"]))[None, None]
        with torch.no_grad():
            logits = model(to_model_input(img, image_size=cfg["image_size"], mean=cfg["mean"], std=cfg["std"]))
            # the calibrated probability: Platt scaling of the logit, fitted on validation
            cal = promoted.calibration
            expect = torch.sigmoid(logits[0, cfg["findings"].index("pneumonia")] * cal["scale"] + cal["bias"]).item()
        assert p == pytest.approx(expect, abs=1e-4)
        assert r["label"] == ("pneumonia" if p >= promoted.threshold else "not_pneumonia")

    # JSON output, Grad-CAM overlays, and a warning for a lateral DICOM.
    lateral = dicom_from_array(tmp_path / "lateral.dcm", np.asarray(Image.open(good[0]).convert("L")), view="LL",
                               phi=False)
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), "--format", "json", "--saliency", str(tmp_path / "sal"),
                 str(good[0]), str(lateral)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["warning"] == "" and "lateral view" in rows[1]["warning"]
    for r in rows:
        with Image.open(r["saliency"]) as im:
            assert im.size[0] > 100


def test_no_file_name_reaches_any_artefact_of_the_run_or_model(e2e, sample_dir):
    """Kermany's file names carry patient numbers."""
    stems = [p.stem for p in sample_dir.rglob("*.jpeg")]
    for folder in (e2e["runs"], e2e["model"]):
        for f in folder.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                blob = f.read_bytes()
                assert not [s for s in stems if s.encode() in blob], f


def test_an_ensemble_at_a_clinics_prevalence_and_specificity_is_one_graph_of_its_members_mean(e2e, tmp_path):
    """Promote again from the same run: an ensemble of both trials, a clinic's prevalence and a
    specificity operating point. The ensemble is one graph (exports checked within 1e-4 inside
    promote) that loads back and scores exactly the mean of its members' logits."""
    from raycxr.data import split_arrays
    from raycxr.predict import load_promoted, logits
    from raycxr.train import CheckpointRecord

    ens_dir = tmp_path / "model-ensemble"
    assert main(["promote", "--run", str(e2e["runs"] / "e2e"), "--out", str(ens_dir), "--bootstrap", "100",
                 "--tta", "off", "--ensemble", "on", "--prevalence", "0.3", "--threshold-rule", "specificity",
                 "--target-specificity", "0.9"]) == 0
    ens_card = json.loads((ens_dir / "model_card.json").read_text())
    ens, ens_cfg = load_promoted(ens_dir)
    assert ens_card["selection"]["kind"] == "ensemble" and len(ens_cfg.spec.members) == 2
    assert ens_cfg.calibration["prior_shift"]["target_prevalence"] == 0.3
    assert set(ens_card["operating_points"]) == {"youden", "sensitivity", "specificity", "bayes"}
    assert ens_cfg.threshold == ens_card["operating_points"]["specificity"]["threshold"]
    assert ens_card["operating_points"]["specificity"]["val_specificity"] >= 0.9
    checkpoints = {r["trial_id"]: Path(r["checkpoint"]) for r in e2e["board"]}
    folders = [checkpoints[m.trial_id] for m in ens_cfg.spec.members]
    specs = [CheckpointRecord.load(f).spec for f in folders]
    members = [spec.load_network(f) for spec, f in zip(specs, folders)]
    imgs = split_arrays(e2e["data"], "val", "pneumonia").images[:12]
    expect = np.mean([logits(m, spec, imgs) for m, spec in zip(members, specs)], axis=0)
    got = logits(ens, ens_cfg.spec, imgs)
    assert np.abs(got - expect).max() < 1e-5
    md = (ens_dir / "model_card.md").read_text()
    assert "PPV at 30%" in md and "specificity (exported)" in md and "Ensemble of the best finalists, forced" in md


def test_fastest_within_and_an_evaluation_that_overlaps_training_is_not_called_external(e2e, sample_dir, tmp_path):
    """--fastest-within: the quickest trial whose validation AUC is within the delta of the best.
    Another ingested dataset lands in the card beside the internal holdout, but external only if it
    shares no film with training and validation (issue 26): a re-ingest of the sample at another size
    (a different fingerprint) holds the training films, so it is listed as overlapping, not external."""
    data = e2e["data"]
    fast_dir = tmp_path / "model-fast"
    assert main(["promote", "--run", str(e2e["runs"] / "e2e"), "--out", str(fast_dir), "--bootstrap", "100",
                 "--tta", "off", "--fastest-within", "1.0"]) == 0
    fast = json.loads((fast_dir / "model_card.json").read_text())
    lat = {r["trial_id"]: float(r["latency_ms"]) for r in e2e["board"]}
    assert fast["trial"]["trial_id"] == min(lat, key=lat.get) and fast["selection"]["rule"] == "fastest-within"

    other = tmp_path / "other"
    assert main(["ingest", "--source", f"kermany={sample_dir}", "--out", str(other), "--image-size", "80"]) == 0
    assert main(["evaluate", "--model", str(fast_dir), "--data", str(other), "--split", "all", "--bootstrap", "50"]) == 0
    fast = json.loads((fast_dir / "model_card.json").read_text())

    def hashes(folder, splits):
        return [h for s in splits for h in read_split(folder, s, columns=["content_hash"]).column("content_hash")
                .to_pylist()]

    seen = set(hashes(data, ("train", "val")))
    shared = sum(h in seen for h in hashes(other, ("train", "val", "holdout")))  # the sample's one copy counts twice
    overlap = fast["external"][0]["overlap"]
    assert len(fast["external"]) == 1 and fast["external"][0]["n"] == 300 and shared >= len(seen)
    assert overlap["checked"] and overlap["same_files"] == shared and overlap["images"] >= shared
    for page in ("model_card.md", "report.html"):  # the report too
        text = (fast_dir / page).read_text()
        assert "overlaps training data" in text and "No evaluation below is external" in text, page
        assert "measured for this model, holdout AUC" not in text


def test_multi_objective_search_reports_latency_to_optuna(ray_local, tmp_path, sample_dir):
    """--objective auc-latency: Optuna's study receives (best validation AUC, ONNX CPU latency) per
    trial, the same values the leaderboard shows."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    assert main(["ingest", "--source", f"kermany={sample_dir}", "--out", str(data), "--image-size", "64"]) == 0
    assert main(["search", "--data", str(data), "--space", str(_space(tmp_path)), "--name", "mo",
                 "--runs-dir", str(runs), "--objective", "auc-latency", "--no-early-stopping"]) == 0
    board = list(csv.DictReader(open(runs / "mo" / "leaderboard.csv")))
    assert len(board) == 2 and all(float(r["latency_ms"]) > 0 for r in board)
    assert json.loads((runs / "mo" / "run.json").read_text())["objective"] == "auc-latency"
    # The searcher's saved state holds the Optuna study (Tune pickles it; this test reads its own run).
    import pickle

    state = pickle.loads(next((runs / "mo" / "tune").glob("searcher-state-*.pkl")).read_bytes())
    study = state["_ot_study"] if isinstance(state, dict) else state._ot_study
    values = sorted(tuple(round(v, 6) for v in t.values) for t in study.trials if t.values)
    expect = sorted((round(float(r["val_auc"]), 6), round(float(r["latency_ms"]), 6)) for r in board)
    assert values == expect
