"""Every adapter pooled -> a search trained with masked labels and balanced sources -> promote; no PHI anywhere."""

import json
import math
from pathlib import Path

import pytest
import torch

from raycxr.labels import FINDINGS
from raycxr.train import masked_bce

pytestmark = pytest.mark.slow


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 4.0, -2.0]])
    known = torch.tensor([[1.0, 0.0, -1.0], [0.0, -1.0, -1.0]])
    flipped = known.clone()
    flipped[known < 0] = -1.0
    logits_changed = logits.clone()
    logits_changed[known < 0] = -50.0  # whatever the model says about unknowns...
    assert masked_bce(logits, known) == pytest.approx(masked_bce(logits_changed, flipped).item())  # ...costs nothing
    expect = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -1.0, 0.3]), torch.tensor([1.0, 0.0, 0.0]))
    assert masked_bce(logits, known).item() == pytest.approx(expect.item())


def test_pooled_sources_search_and_promote_without_phi(ray_local, tmp_path):
    from raycxr.cli import main
    from tests.builders import build_all, find_phi

    sources = build_all(tmp_path / "src")
    data, runs, model = tmp_path / "data", tmp_path / "runs", tmp_path / "model"
    argv = ["ingest", "--out", str(data), "--image-size", "32", "--source-option", "csv.name=kit"]
    for key, path in sources.items():
        argv += ["--source", f"{key}={path}"]
    assert main(argv) == 0
    space = tmp_path / "s.yaml"
    space.write_text("trials: 1\nmax_epochs: 1\n"
                     "params: {model: test_resnet, image_size: 32, lr: 0.003, source_balance: equal}\n")
    assert main(["search", "--data", str(data), "--space", str(space), "--name", "pool", "--runs-dir", str(runs)]) == 0
    _check_equal_source_balance(data, runs / "pool")
    assert main(["promote", "--run", str(runs / "pool"), "--out", str(model), "--bootstrap", "50", "--tta", "off"]) == 0

    card = json.loads((model / "model_card.json").read_text())
    per_source = card["holdout"]["per_source"]
    # pneumonia is scored only where a source labels it: no TB-only or JSRT rows in the metrics
    assert not {"montgomery", "shenzhen", "jsrt"} & set(per_source)
    assert sum(m["n"] for m in per_source.values()) == card["holdout"]["pooled"]["n"]
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["spec"]["findings"] == list(FINDINGS) and cfg["spec"]["target"] == "pneumonia"
    # predict on the KIT films, whose file names carry a planted name and ID: the overlays must not
    saliency = tmp_path / "saliency"
    kit_files = sorted((tmp_path / "src" / "kit" / "images").glob("*.png"))[:2]
    assert main(["predict", "--model", str(model), "--saliency", str(saliency), *map(str, kit_files)]) == 0
    assert len(list(saliency.glob("*.png"))) == 2
    # Ray's own logs of this session too: trial output, worker logs, Ray Data's logs
    import ray

    ray_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for folder in (data, runs, model, saliency, ray_logs):
        assert find_phi(folder) == [], folder


def _check_equal_source_balance(data, run):
    """``source_balance: equal``: the epoch's reported weight of each train source is N / (S n_s), and
    its rows trained n_s floor(w) plus a binomial(n_s, frac(w)) count: within its bounds and 5
    standard deviations of N / S."""
    from raycxr.data import read_manifest
    from raycxr.runs import run_history

    counts = read_manifest(data).counts["train"]["by_source"]
    assert len(counts) >= 2
    history = run_history(run)
    (row,) = history.board
    assert row["source_balance"] == "equal" and row["status"] == "ok"
    epoch = history.frames[row["trial_id"]].iloc[-1]
    total, n_sources = sum(counts.values()), len(counts)
    for src, n in counts.items():
        w = total / (n_sources * n)
        assert epoch[f"source_weight/{src}"] == pytest.approx(w, rel=1e-9)
        trained, frac = int(epoch[f"train_rows/{src}"]), w - math.floor(w)
        assert n * math.floor(w) <= trained <= n * math.ceil(w), (src, n, w, trained)
        assert abs(trained - total / n_sources) <= 5 * math.sqrt(n * frac * (1 - frac)) + 1e-9, (src, n, w, trained)
