"""raycxr.predict: the one scoring path, and predict() on files, without a search."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit

from raycxr.data import split_arrays
from raycxr.predict import load_promoted, predict, target_logits
from tests.builders import promoted_model


def test_predict_and_evaluate_give_the_probability_of_the_logit_even_beyond_16(dataset, tmp_path):
    """The classifier is scaled until logits pass |16|, where calibrating clipped probabilities
    (the old evaluate path) saturates: predict on PNG copies of the holdout films and evaluate on
    the holdout split must both give sigmoid(scale * logit + bias) of the model's own logit."""
    from raycxr.evaluate import evaluate_model

    cal = {"method": "platt", "scale": 0.5, "bias": -3.0}
    model_dir = promoted_model(tmp_path / "m", head_scale=400.0, calibration=cal)
    net, promoted = load_promoted(model_dir)
    hold = split_arrays(dataset, "holdout", "pneumonia")
    z = target_logits(net, promoted.spec, hold.images)
    assert np.abs(z).max() > 16 and len(z) > 20
    expected = expit(cal["scale"] * z + cal["bias"])

    result = evaluate_model(model_dir, dataset, split="holdout", n_boot=10)
    with open(result["predictions"]) as f:
        evaluated = np.array([float(r["probability"]) for r in csv.DictReader(f)])
    np.testing.assert_allclose(evaluated, expected, rtol=0, atol=1e-6)  # saturating at 16 was off by ~1e-2

    files = []
    for i, img in enumerate(hold.images[:, 0]):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(img).save(files[-1])
    predicted = np.array([r.probability for r in predict(model_dir, files)])
    np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-6)  # float32: batches of 32 vs 128
    labels = [r.label for r in predict(model_dir, files[:8])]
    assert labels == [promoted.class_names[int(p >= promoted.threshold)] for p in expected[:8]]


def test_one_row_per_input_with_errors_for_unreadable_files(tmp_path, sample_dir):
    model_dir = promoted_model(tmp_path / "m")
    good = sorted((sample_dir / "NORMAL").iterdir())[:2]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = predict(model_dir, [good[0], bad, good[1]])
    assert [r.file for r in rows] == [str(good[0]), str(bad), str(good[1])]
    assert rows[1].error and rows[1].probability is None
    assert all(0 <= r.probability <= 1 and r.label in ("not_pneumonia", "pneumonia") for r in (rows[0], rows[2]))


def test_the_scorer_accepts_torch_batches_and_numpy_alike(tmp_path, dataset):
    """Training's validation hands the scorer torch tensors; promote hands it NumPy: same logits."""
    import torch

    from raycxr.predict import logits

    net, promoted = load_promoted(promoted_model(tmp_path / "m"))
    images = split_arrays(dataset, "val", "pneumonia").images[:10]
    a = logits(net, promoted.spec, images, batch_size=3)
    b = logits(net, promoted.spec, torch.from_numpy(images.copy()), batch_size=4)
    assert a.shape == (10, len(promoted.spec.findings))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path, sample_dir, capsys):
    """A file named like a formula must not become one when predict's CSV is opened in Excel."""
    from raycxr.cli import main

    model_dir = promoted_model(tmp_path / "m")
    folder = tmp_path / "in"
    folder.mkdir()
    evil = folder / "=HYPERLINK(1)+2.png"
    Image.open(sorted((sample_dir / "NORMAL").iterdir())[0]).convert("L").save(evil)
    plus = folder / "+1.png"
    plus.write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), str(folder)]) == 1
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert {r["file"] for r in rows} == {str(evil), str(plus)}  # absolute paths start with "/"
    import os

    os.chdir(folder)  # relative names start with the formula character
    try:
        main(["predict", "--model", str(model_dir), evil.name, plus.name])
    finally:
        os.chdir(tmp_path)
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert [r["file"] for r in rows] == ["'" + evil.name, "'" + plus.name]
    assert rows[1]["error"] and not rows[1]["error"].startswith(("=", "+", "-", "@"))


def test_every_hostile_input_gets_its_own_row_and_the_good_files_are_still_scored(tmp_path, sample_dir, capsys):
    """DICOMs whose window, VOI LUT or frame count break decoding, a FIFO (which would block a
    reader for ever), a missing file and blank images: one row each, the good files scored, exit 1."""
    import os

    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from raycxr.cli import main
    from tests.builders import dicom_from_array

    model_dir = promoted_model(tmp_path / "m")
    arr = np.asarray(Image.open(sorted((sample_dir / "NORMAL").iterdir())[0]).convert("L")).astype(np.uint16) * 16
    good = sorted((sample_dir / "PNEUMONIA").iterdir())[:2]
    bad_lut = Dataset()
    bad_lut.LUTDescriptor = [4, 0, 16]  # 4 entries promised, 2 given
    bad_lut.add_new(0x00283006, "OW", b"\x01\x00\x02\x00")  # LUTData
    hostile = {
        "zero_width": dicom_from_array(tmp_path / "zero_width.dcm", arr, bits_stored=12, WindowCenter=2048,
                                       WindowWidth=0),
        "bad_voi_lut": dicom_from_array(tmp_path / "bad_voi_lut.dcm", arr, bits_stored=12,
                                        VOILUTSequence=Sequence([bad_lut])),
        "frames_ab": dicom_from_array(tmp_path / "frames_ab.dcm", arr, bits_stored=12, NumberOfFrames="2"),
    }
    # pydicom refuses to write NumberOfFrames "ab": patch the element's value in the file
    element = b"\x28\x00\x08\x00IS\x02\x002 "
    raw = hostile["frames_ab"].read_bytes()
    assert raw.count(element) == 1
    hostile["frames_ab"].write_bytes(raw.replace(element, element[:-2] + b"ab"))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    black = _png_of(tmp_path / "black.png", np.zeros((128, 128), np.uint8))
    slope0 = dicom_from_array(tmp_path / "slope0.dcm", arr, bits_stored=12, RescaleSlope=0, RescaleIntercept=100)
    inputs = [good[0], *hostile.values(), fifo, tmp_path / "missing.png", black, slope0, good[1]]

    rows = predict(model_dir, inputs)
    assert [r.file for r in rows] == [str(f) for f in inputs]
    by_name = {os.path.basename(r.file): r for r in rows}
    for r in (rows[0], rows[-1]):
        assert r.error == "" and 0 <= r.probability <= 1, r
    assert by_name["pipe.png"].error.startswith("a FIFO, not a regular file")
    assert by_name["missing.png"].error == "no such file"
    for name in ("black.png", "slope0.dcm"):  # read, scored, and flagged: the probability means nothing
        assert by_name[name].probability is not None and "near-constant image" in by_name[name].warning, by_name[name]
    for name in ("zero_width.dcm", "bad_voi_lut.dcm", "frames_ab.dcm"):
        r = by_name[name]
        assert r.error.startswith("DICOM pixel pipeline failed") and r.probability is None, r

    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), *map(str, inputs)]) == 1  # some rows are errors
    out = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(out) == len(inputs)


@pytest.mark.parametrize("low, high, rank_by", [
    (5.0, 15.0, "probability"),  # past 9.9 four decimals round to 1.0000; float64 keeps every step
    (40.0, 80.0, "logit"),       # past ~37 the float64 sigmoid is exactly 1.0: only the logit ranks
])
def test_predicts_output_keeps_the_models_ranking(tmp_path, sample_dir, capsys, low, high, rank_by):
    """An ROC of predict's CSV must be the model's own: 4 decimals tied films at 1.0000 (AUC 0.9495
    from the CSV where the logits gave 0.952). Real films, calibrated to logits in [low, high]; the
    ranking column read back from the CSV and the JSON gives the AUC of the network's logits."""
    import json

    from sklearn.metrics import roc_auc_score

    from raycxr.cli import main
    from raycxr.imaging import load_for_model

    files = [*sorted((sample_dir / "NORMAL").iterdir())[:30], *sorted((sample_dir / "PNEUMONIA").iterdir())[:30]]
    y = np.repeat([0, 1], 30)
    net, promoted = load_promoted(promoted_model(tmp_path / "raw"))
    spec = promoted.spec
    images = np.stack([load_for_model(f, spec.stored_size, policy=spec.resize) for f in files])
    z = target_logits(net, spec, images, batch_size=32)  # predict's batches
    scale = (high - low) / float(z.max() - z.min())
    cal = {"method": "platt", "scale": scale, "bias": low - scale * float(z.min())}
    model_dir = promoted_model(tmp_path / "m", calibration=cal)  # the same network (seeded), calibrated

    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), *map(str, files)]) == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert main(["predict", "--model", str(model_dir), "--format", "json", *map(str, files)]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [r["file"] for r in records] == [str(f) for f in files]
    for got in (rows, records):
        p = np.array([float(r["probability"]) for r in got])
        logit = np.array([float(r["logit"]) for r in got])
        np.testing.assert_array_equal(p, expit(logit))  # the probability is the logit's sigmoid, bit for bit
        np.testing.assert_allclose(logit, scale * z + cal["bias"], rtol=1e-12, atol=0)
        ranked = {"probability": p, "logit": logit}[rank_by]
        assert len(set(ranked)) == len(set(z)) and roc_auc_score(y, ranked) == roc_auc_score(y, z)
    assert roc_auc_score(y, np.round(p, 4)) != roc_auc_score(y, z)  # what 4 decimals did
    if rank_by == "logit":
        assert (p == 1.0).all() and len(set(logit)) == len(set(z))


def _png_of(path, arr):
    Image.fromarray(arr).save(path)
    return path


def test_grad_cam_of_an_ensemble_is_the_mean_of_its_members_maps_each_through_its_own_input():
    """Issue 26: an ensemble's saliency explained its last member only. Each member's map is taken
    at its own input size, equalisation and normalisation; a one-member ensemble gives its member's."""
    import torch

    from raycxr.predict import grad_cam
    from raycxr.transforms import Ensemble, to_model_input

    torch.manual_seed(0)

    def net():
        m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(64, 2))
        return m.eval()

    a, b = net(), net()
    rng = np.random.default_rng(0)
    films = torch.from_numpy(rng.integers(0, 256, (3, 1, 64, 64), dtype=np.uint8))
    stored = to_model_input(films, image_size=64, mean=0.0, std=1.0)  # an ensemble's input
    own_a = grad_cam(a, to_model_input(films, image_size=32, mean=0.5, std=0.25, equalize="hist"), 1, (64, 64))
    own_b = grad_cam(b, to_model_input(films, image_size=48, mean=0.4, std=0.3), 1, (64, 64))
    assert own_a.shape == (3, 64, 64) and np.allclose(own_a.max(axis=(1, 2)), 1) and not np.allclose(own_a, own_b)

    alone = Ensemble([a], image_sizes=[32], means=[0.5], stds=[0.25], equalizes=["hist"])
    assert np.allclose(grad_cam(alone, stored, 1, (64, 64)), own_a, atol=1e-5)
    both = Ensemble([a, b], image_sizes=[32, 48], means=[0.5, 0.4], stds=[0.25, 0.3], equalizes=["hist", "none"])
    assert np.allclose(grad_cam(both, stored, 1, (64, 64)), (own_a + own_b) / 2, atol=1e-5)
