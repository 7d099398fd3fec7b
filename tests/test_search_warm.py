"""One-worker trials train in Tune's own trial process, which Tune reuses trial after trial, and a
search run twice gives the same figures, epoch by epoch (a real search on the session's local Ray)."""

from __future__ import annotations

import json

import pytest

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
    for name in ("first", "again"):
        board = run_search(SearchConfig(data=dataset, space=str(space), name=name, runs_dir=tmp_path / "runs"))
        assert len(board) == 3 and all(r["status"] == "ok" for r in board), board
        runs[name] = _reports(tmp_path / "runs" / name)

    first, again = runs["first"], runs["again"]
    # warm: every trial of a search trained in the same process (Tune's reuse_actors), which
    # measured the trial's training itself (no Ray Train worker: world size 1, no start-up per trial)
    assert len({rows[0]["pid"] for rows in first}) == 1, [rows[0]["pid"] for rows in first]
    assert all(r["world_size"] == 1 and r["train_compute_s"] > 0 for rows in first for r in rows)
    # the same seed, space and data: the same configurations, and the same figures to the last bit
    figures = ("train_loss", "val_auc", "val_loss", "val_accuracy")
    assert [rows[0]["config"] for rows in first] == [rows[0]["config"] for rows in again]
    assert ([[{k: r[k] for k in figures} for r in rows] for rows in first] ==
            [[{k: r[k] for k in figures} for r in rows] for rows in again])
