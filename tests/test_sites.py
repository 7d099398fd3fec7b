"""raycxr.sites and the site path end to end: a deploying site's films divided by patient into
site-val and site-test, scored every epoch, selected on, read once by promote; and the per-source
(worst-source) figures of a pooled dataset. Real films from the bundled sample, real Ray, real timm."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from raycxr.errors import ConfigError, DataError
from raycxr.sites import PARTS, assign, parse_site, plan_site, site_arrays

TINY_SPACE = ("trials: 2\nmax_epochs: 3\nseed: 0\nresources: {workers_per_trial: 1, cpus_per_worker: 1}\n"
              "params:\n  model: test_resnet\n  image_size: 64\n  lr: [3.0e-3, 1.0e-2]\n  batch_size: 16\n")


def _patient(name: str) -> str:
    m = re.match(r"(IM-\d+|person\d+)", name)
    return m.group(1) if m else name


def _split_sample(sample_dir: Path, dst: Path, *, every: int = 3) -> tuple[Path, Path]:
    """The bundled films in two patient-disjoint folders (Kaggle layout): every ``every``-th patient
    (sorted) to the "site", the rest to the "hospital"."""
    patients = sorted({_patient(f.name) for f in sample_dir.rglob("*.jpeg")})
    site_patients = set(patients[::every])
    for f in sample_dir.rglob("*.jpeg"):
        part = "site" if _patient(f.name) in site_patients else "hospital"
        (dst / part / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst / part / f.parent.name / f.name)
    return dst / "hospital", dst / "site"


@pytest.fixture(scope="module")
def hospital_and_site(tmp_path_factory, sample_dir):
    """Two ingested datasets at 64 px: the hospital's (2/3 of the bundled patients) and a site's (the rest)."""
    from raycxr.ingest import IngestConfig, ingest

    base = tmp_path_factory.mktemp("sites")
    hospital, site = _split_sample(sample_dir, base / "films")
    for name, folder in (("hospital", hospital), ("site", site)):
        ingest(IngestConfig(sources={"kermany": folder}, out=base / name, image_size=64, seed=0))
    return base / "hospital", base / "site"


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_assign_is_patient_disjoint_stratified_and_repeatable(fraction, seed):
    rng = np.random.default_rng(seed)
    patients = np.array([f"p{i // 3}" for i in range(600)])  # 200 patients, 3 films each
    positive_patient = rng.random(200) < 0.4
    y = positive_patient[np.arange(600) // 3].astype(int)
    test = assign(patients, y, test_fraction=fraction, seed=seed)
    assert np.array_equal(test, assign(patients, y, test_fraction=fraction, seed=seed))
    for p in np.unique(patients):  # a patient's films never straddle the two parts
        assert len(set(test[patients == p])) == 1
    for stratum in (0, 1):  # stratified: each label's patients split by the fraction
        n = int((positive_patient == stratum).sum())
        in_test = len(np.unique(patients[test & (y == stratum)]))
        assert in_test == round(fraction * n)
    assert not np.array_equal(test, assign(patients, y, test_fraction=fraction, seed=seed + 10))


@pytest.mark.parametrize("text, name", [("clinic=/data/x", "clinic"), ("/data/my-site", "my-site")])
def test_parse_site(text, name):
    assert parse_site(text)[0] == name


def test_parse_site_refuses_a_bad_name():
    with pytest.raises(ConfigError, match="site name"):
        parse_site("a b=/data/x")


def test_plan_site_records_parts_and_reads_them_back(hospital_and_site):
    hospital, site_dir = hospital_and_site
    site = plan_site("clinic", site_dir, target="pneumonia", test_fraction=0.5, seed=0, search_data=hospital)
    arrays = {part: site_arrays(site, part, "pneumonia") for part in PARTS}
    for part in PARTS:
        c = site.counts[part]
        assert len(arrays[part].y) == c["images"] and int(arrays[part].y.sum()) == c["positives"]
        assert set(arrays[part].sources) == {"clinic"}
    assert not set(arrays["site-val"].groups) & set(arrays["site-test"].groups)  # patient-disjoint
    total = sum(site.counts[p]["images"] for p in PARTS)
    manifest = json.loads((site_dir / "manifest.json").read_text())
    assert total == sum(c["images"] for c in manifest["counts"].values())  # every film of every split
    # the pixels are the site's own films: each part's rows are distinct images
    flat = arrays["site-test"].images.reshape(len(arrays["site-test"].y), -1)
    assert len({row.tobytes() for row in flat}) == len(flat)


def test_plan_site_refuses_films_shared_with_the_search_data(hospital_and_site):
    hospital, _ = hospital_and_site
    with pytest.raises(ConfigError, match="also in the search's data"):
        plan_site("same", hospital, target="pneumonia", test_fraction=0.5, seed=0, search_data=hospital)


def test_plan_site_refuses_another_image_size(tmp_path, hospital_and_site, sample_dir):
    from raycxr.ingest import IngestConfig, ingest

    hospital, _ = hospital_and_site
    _, site_films = _split_sample(sample_dir, tmp_path / "films")
    ingest(IngestConfig(sources={"kermany": site_films}, out=tmp_path / "site48", image_size=48, seed=0))
    with pytest.raises(ConfigError, match="--image-size 64"):
        plan_site("s", tmp_path / "site48", target="pneumonia", test_fraction=0.5, seed=0, search_data=hospital)


def test_a_changed_site_is_refused(tmp_path, hospital_and_site):
    hospital, site_dir = hospital_and_site
    site = plan_site("clinic", site_dir, target="pneumonia", test_fraction=0.5, seed=0, search_data=hospital)
    copy = tmp_path / "site"
    shutil.copytree(site_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not the dataset the search divided"):
        site_arrays(site, "site-test", "pneumonia", data=copy)


def test_site_search_selects_by_site_and_promote_reads_site_test_once(tmp_path, hospital_and_site, ray_local):
    """--site with --objective site: every epoch reports site figures, each trial's kept epoch is its best
    site-val epoch, the study carries them, and promote chooses on site-val and reads site-test once."""
    import optuna
    import torch

    import raycxr
    from raycxr.runs import RunRecord, run_history
    from raycxr.storage import RunStore

    hospital, site_dir = hospital_and_site
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    result = raycxr.search(hospital, space, name="site", runs_dir=tmp_path / "runs", verbosity=0,
                           sites=(f"clinic={site_dir}",), objective="site")
    run = Path(result.run)
    record = RunRecord.load(RunStore(run))
    (site,) = record.site_records()
    assert site.name == "clinic" and site.test_fraction == 0.5
    history = run_history(run)
    study = optuna.load_study(study_name="site", storage=f"sqlite:///{run / 'optuna.db'}")
    by_tune_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(history.board) == 2
    for row in history.board:
        df = history.frames[row["trial_id"]]
        assert df["site_auc"].between(0, 1).all() and (df["site_loss"] > 0).all()
        assert np.allclose(df["site_auc"], df["site_auc/clinic"])
        assert np.allclose(df["site_auc_best"], df["site_auc"].cummax())
        best = df[df["site_auc"] == df["site_auc"].max()].iloc[-1]
        assert row["best_epoch"] == int(best["epoch"]) and row["site_auc"] == pytest.approx(best["site_auc"])
        state = torch.load(Path(row["checkpoint"]) / "train_state.pt", weights_only=True)
        assert state["epoch"] + 1 == row["best_epoch"]  # the kept checkpoint is the best site-val epoch
        attrs = by_tune_id[row["trial_id"]].user_attrs["site_auc"]
        assert {int(k): v for k, v in attrs.items()} == pytest.approx(dict(zip(df["epoch"], df["site_auc"])))
    scores = [r["site_auc"] for r in history.board]
    assert scores == sorted(scores, reverse=True)  # ranked by the objective

    card = raycxr.promote(run, tmp_path / "model", n_boot=100)
    assert card.selection["rule"] == "site" and card.selection["on"] == "site-val"
    assert card.calibration["fitted_on"] == "site-val"
    assert "intercept only" in card.calibration["refit"]  # a few dozen films: < 100 events
    # the exported threshold: the fewest errors on site-val at the site's prevalence (auto for --select site)
    assert card.threshold_rule == "accuracy" and card.threshold == card.operating_points["accuracy"]["threshold"]
    assert {"youden", "sensitivity", "specificity", "accuracy"} <= set(card.operating_points)
    h = card.headline
    assert h["kind"] == "site" and h["previously_read"] == 0
    assert h["metrics"]["pooled"]["n"] == site.counts["site-test"]["images"]
    assert h["metrics"]["pooled"]["ci95"]["auc"][0] is not None
    rows = (tmp_path / "model" / "site_test_predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + site.counts["site-test"]["images"]
    assert "Headline: the deploying site (site-test)" in (tmp_path / "model" / "model_card.md").read_text()
    ledger = [json.loads(line) for line in (run / "holdout_reads.jsonl").read_text().splitlines()]
    assert [e["split"] for e in ledger] == ["holdout", "site-test"]
    assert ledger[1]["sites"] == {"clinic": site.digest["site-test"]}

    again = raycxr.promote(run, tmp_path / "model2", n_boot=50, tta="off")  # its reads only: no TTA to score
    assert again.headline["previously_read"] == 1 and again.holdout_previously_read == 1
    plain = raycxr.promote(run, tmp_path / "model3", n_boot=50, select="shift-auc", tta="off")
    assert plain.headline["kind"] == "none" and "site-test was not read" in plain.headline["statement"]
    assert plain.threshold_rule == "youden" and "accuracy" not in plain.operating_points


def test_objective_site_needs_a_site(tmp_path, hospital_and_site):
    import raycxr

    hospital, _ = hospital_and_site
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    with pytest.raises(ConfigError, match="--objective site needs"):
        raycxr.search(hospital, space, name="nosite", runs_dir=tmp_path / "runs", verbosity=0, objective="site")
    assert not (tmp_path / "runs" / "nosite").exists() or not any((tmp_path / "runs" / "nosite").iterdir())


def test_pooled_sources_report_worst_source(tmp_path, sample_dir, ray_local):
    """A pooled dataset of two sources: each epoch reports each source's validation AUC and the
    worst of them, and --objective worst-source ranks and keeps epochs by it."""
    import raycxr
    from raycxr.ingest import IngestConfig, ingest
    from raycxr.runs import run_history

    first, second = _split_sample(sample_dir, tmp_path / "films", every=2)
    manifest = tmp_path / "clinic2.csv"
    manifest.write_text("path,patient_id,labels\n" + "".join(
        f"{f},{_patient(f.name)},{'pneumonia' if f.parent.name == 'PNEUMONIA' else 'normal'}\n"
        for f in sorted(second.rglob("*.jpeg"))))
    ingest(IngestConfig(sources={"kermany": first, "csv": manifest}, out=tmp_path / "pooled", image_size=64, seed=0,
                        val_fraction=0.3, source_options={"csv": {"name": "clinic2"}}))
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    result = raycxr.search(tmp_path / "pooled", space, name="pooled", runs_dir=tmp_path / "runs", verbosity=0,
                           objective="worst-source")
    history = run_history(result.run)
    for row in history.board:
        df = history.frames[row["trial_id"]]
        per = df[["source_auc/clinic2", "source_auc/kermany"]]
        assert np.allclose(df["worst_source_auc"], per.min(axis=1))
        assert (df["worst_source"] == per.idxmin(axis=1).str.removeprefix("source_auc/")).all()
        best = df[df["worst_source_auc"] == df["worst_source_auc"].max()].iloc[-1]
        assert row["best_epoch"] == int(best["epoch"])
    scores = [r["worst_source_auc"] for r in history.board]
    assert scores == sorted(scores, reverse=True)


def test_objective_worst_source_needs_two_sources(tmp_path, dataset):
    import raycxr

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    with pytest.raises(ConfigError, match="two or more sources"):
        raycxr.search(dataset, space, name="one", runs_dir=tmp_path / "runs", verbosity=0, objective="worst-source")


def test_site_figures_reach_tune_from_a_torchtrainer_trial(tmp_path, hospital_and_site, ray_local):
    """The same site figures when a trial is a Ray Train TorchTrainer (the DDP path: the site-val
    films travel as one of the trainer's unsplit datasets), and its kept checkpoint is its best
    site-val epoch."""
    import torch

    import raycxr
    from raycxr.runs import run_history

    hospital, site_dir = hospital_and_site
    space = tmp_path / "ddp.yaml"
    space.write_text(TINY_SPACE.replace("trials: 2", "trials: 1").replace(
        "cpus_per_worker: 1}", "cpus_per_worker: 1, trainer: ray-train}"))
    result = raycxr.search(hospital, space, name="ddp", runs_dir=tmp_path / "runs", verbosity=0,
                           sites=(f"clinic={site_dir}",), objective="site")
    (row,) = run_history(result.run).board
    df = run_history(result.run).frames[row["trial_id"]]
    assert len(df) == 3 and df["site_auc"].between(0, 1).all()
    best = df[df["site_auc"] == df["site_auc"].max()].iloc[-1]
    assert row["best_epoch"] == int(best["epoch"]) and "/trials/" in row["checkpoint"]
    state = torch.load(Path(row["checkpoint"]) / "train_state.pt", weights_only=True)
    assert state["epoch"] + 1 == row["best_epoch"]
