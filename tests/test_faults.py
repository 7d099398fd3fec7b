"""A search that survives: a killed trial process, a killed driver, then --resume.

Each search runs as its own `raycxr search` process (a second driver) on the test session's
local Ray, so that the test can SIGKILL workers and the driver for real.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
RAYCXR = [sys.executable, "-m", "raycxr.cli"]


def _pids(fragment: str) -> list[int]:
    """PIDs whose command line contains ``fragment`` (Ray sets titles such as ray::ImplicitFunc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if fragment.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _wait_for(predicate, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _space(tmp_path: Path, *, trials: int, epochs: int, asha: bool = True, trainer: str = "auto") -> Path:
    f = tmp_path / "space.yaml"
    # grace_period = max_epochs: ASHA stops nothing, so every trial must reach the last epoch.
    scheduler = f"scheduler: {{grace_period: {epochs}}}" if asha else ""
    f.write_text(f"""
trials: {trials}
max_epochs: {epochs}
seed: 1
{scheduler}
resources: {{trainer: {trainer}}}
params:
  model: test_resnet
  image_size: 64
  lr: {{loguniform: [1.0e-3, 1.0e-2]}}
  batch_size: 16
  ema_decay: 0.99   # a resumed trial must restore both the raw and the averaged weights
  mixup: 0.2
""")
    return f


def _search(args: list[str], tmp_path: Path) -> subprocess.Popen:
    import ray

    address = ray.get_runtime_context().gcs_address
    log = open(tmp_path / f"search-{len(list(tmp_path.glob('search-*.log')))}.log", "w")
    return subprocess.Popen([*RAYCXR, "search", *args, "--address", address], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _epochs_reported(run: Path) -> dict[str, list[int]]:
    """Per Tune trial directory: the epochs its result.json holds, in order. A resumed trial first
    reports its checkpoint's epoch again (``reported_again``: bookkeeping, nothing trained): skipped."""
    out = {}
    for f in sorted((run / "tune").glob("trial_*/result.json")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[f.parent.name] = [r["epoch"] for r in rows if not r.get("reported_again")]
    return out


def _board(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "leaderboard.csv")))


# Two in-process trials (one killed, one not); one Ray Train trial (its controller and worker group
# are the slow part: a second one would only add their start-up)
@pytest.mark.parametrize("trainer, victim, trials", [("auto", "ray::ImplicitFunc", 2),
                                                     ("ray-train", "ray::RayTrainWorker", 1)])
def test_killed_trial_process_resumes_from_its_checkpoint(ray_local, dataset, tmp_path, trainer, victim, trials):
    """A one-worker trial trains in Tune's trial process (a function trainable, ray::ImplicitFunc);
    with ``trainer: ray-train`` in Ray Train's worker. Either, killed, resumes from its checkpoint."""
    runs = tmp_path / "runs"
    epochs = 12  # an epoch takes about a second: the trials must still be running when one is killed
    # Random search without early stopping (the baseline options): every trial must reach the last epoch.
    proc = _search(["--data", str(dataset), "--space", str(_space(tmp_path, trials=trials, epochs=epochs, asha=False,
                                                                  trainer=trainer)),
                    "--name", "wk", "--runs-dir", str(runs), "--max-failures", "2", "--searcher", "random",
                    "--no-early-stopping"], tmp_path)
    # A checkpoint folder on disk is not yet a registered checkpoint: wait until Tune has each
    # trial's first report (the controller has registered its checkpoint by then).
    def all_reported():
        reported = _epochs_reported(runs / "wk")
        return len(reported) == trials and all(reported.values())

    _wait_for(all_reported, 240, "every trial's first reported epoch", proc)
    victims = _pids(victim)
    assert victims, f"no {victim} process found to kill"
    os.kill(victims[0], signal.SIGKILL)
    assert all(e[-1] < epochs for e in _epochs_reported(runs / "wk").values()), "a trial ended before the kill"
    assert proc.wait(timeout=400) == 0, (tmp_path / "search-0.log").read_text()[-3000:]
    board = _board(runs / "wk")
    assert len(board) == trials and all(r["status"] == "ok" and r["epochs"] == str(epochs) for r in board)
    resumed = [int(r["resumed_from_epoch"]) for r in board]
    assert max(resumed) >= 1, f"no trial resumed from a checkpoint: {resumed}"
    record = json.loads((runs / "wk" / "run.json").read_text())
    assert record["searcher"] == "random" and record["early_stopping"] is False
    # the resumed trial did not start again from epoch 1
    for epochs in _epochs_reported(runs / "wk").values():
        assert epochs.count(1) == 1, epochs


def test_killed_driver_then_resume_loses_and_repeats_nothing(ray_local, dataset, tmp_path):
    runs = tmp_path / "runs"
    run = runs / "dk"
    space = _space(tmp_path, trials=3, epochs=3)
    proc = _search(["--data", str(dataset), "--space", str(space), "--name", "dk", "--runs-dir", str(runs)], tmp_path)
    _wait_for(lambda: any(e and e[-1] == 3 for e in _epochs_reported(run).values()) and
              list((run / "tune").glob("experiment_state*.json")), 300, "a finished trial", proc)
    time.sleep(1.0)
    finished_before = {k: v for k, v in _epochs_reported(run).items() if v and v[-1] == 3}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    resumed = _search(["--resume", str(run)], tmp_path)
    assert resumed.wait(timeout=400) == 0, (tmp_path / "search-1.log").read_text()[-3000:]
    board = _board(run)
    assert len(board) == 3 and all(r["status"] == "ok" and r["epochs"] == "3" for r in board), \
        ([{k: r[k] for k in ("trial_id", "status", "tune_status", "epochs", "resumed_from_epoch")} for r in board],
         (tmp_path / "search-1.log").read_text()[-3000:])
    after = _epochs_reported(run)
    for trial, epochs in finished_before.items():
        assert after[trial] == epochs, f"finished trial {trial} was re-run: {epochs} -> {after[trial]}"

    # The restored searcher is still Optuna and knows every finished trial (Optuna's study is
    # not public API; the pinned Ray version's OptunaSearch keeps it as _ot_study).
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric="val_auc", mode="max")
    searcher.restore_from_dir(str(run / "tune"))
    completed = [t for t in searcher._ot_study.trials if t.state.name == "COMPLETE"]
    assert len(completed) == 3


MULTINODE = Path(__file__).with_name("multinode_search.py")


@pytest.mark.parametrize("mode", ["ddp", "remove-node"])
def test_two_node_cluster(dataset, tmp_path, mode, request):
    """In a fresh two-node local cluster (ray.cluster_utils.Cluster, its own process): one trial's
    TorchTrainer spans both nodes over gloo, or a node is removed mid-search and its trial is
    rescheduled on the other and still finishes."""
    import ray

    if ray.is_initialized():  # the session's Ray must not hold the CPUs these nodes claim
        ray.shutdown()
    out = subprocess.run([sys.executable, str(MULTINODE), mode, str(dataset), str(tmp_path)], capture_output=True,
                         text=True, timeout=540, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    reports = result["reports"]
    if mode == "ddp":
        assert result["world_sizes"] == [2] and result["nodes"] == 2
        assert result["board"][0]["status"] == "ok" and result["board"][0]["epochs"] == 2
        # both workers of the one trial, on both nodes, every epoch
        (epochs,) = reports.values()
        assert all(sorted(r["nodes"].split(",")) == sorted(result["node_ids"]) for r in epochs), epochs
    else:
        assert result["removed"] and all(r["status"] == "ok" and r["epochs"] == 3 for r in result["board"])
        assert len(result["board"]) == 2
        (gone,) = result["removed"]
        # every trial ended on the node that is left (a trial that was on the removed node moved)
        assert all(rs and rs[-1]["nodes"] != gone and rs[-1]["epoch"] == 3 for rs in reports.values()), reports


def test_killed_driver_that_owned_its_ray_resumes_mid_run_trials_on_a_fresh_ray(dataset, tmp_path):
    """The default: no --address, so the search starts its own local Ray and dies with it. Killed
    while both trials are mid-run, `--resume` starts a fresh Ray and each trial continues from its
    last checkpoint: no trial starts again from epoch 1."""
    import ray

    if ray.is_initialized():  # this test's searches own their Rays; the session's would only crowd the cores
        ray.shutdown()
    runs = tmp_path / "runs"
    run = runs / "own"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"

    def search(args, n):
        return subprocess.Popen([*RAYCXR, "search", *args], env=env, stdout=open(tmp_path / f"own-{n}.log", "w"),
                                stderr=subprocess.STDOUT)

    # An epoch of this tiny model takes under a second in a warm trial process: enough epochs that
    # both trials are still running when the driver is killed.
    epochs = 30
    proc = search(["--data", str(dataset), "--space", str(_space(tmp_path, trials=2, epochs=epochs, asha=False)),
                   "--name", "own", "--runs-dir", str(runs), "--num-cpus", "2", "--searcher", "random",
                   "--no-early-stopping"], 0)

    def mid_run():
        reported = _epochs_reported(run)
        return len(reported) == 2 and all(e and 2 <= e[-1] <= 10 for e in reported.values())

    _wait_for(mid_run, 300, "both trials mid-run", proc)
    time.sleep(2.5)  # Tune saves its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _epochs_reported(run)
    assert all(e[-1] < epochs for e in before.values()), f"a trial finished before the driver was killed: {before}"

    resumed = search(["--resume", str(run)], 1)
    assert resumed.wait(timeout=500) == 0, (tmp_path / "own-1.log").read_text()[-3000:]
    board = _board(run)
    assert len(board) == 2 and all(r["status"] == "ok" and r["epochs"] == str(epochs) for r in board), board
    after = _epochs_reported(run)
    for trial, seen in before.items():
        assert after[trial][:len(seen)] == seen and after[trial].count(1) == 1, (seen, after[trial])
    assert all(int(r["resumed_from_epoch"]) >= 1 for r in board), board
    # Tune's history of each trial survived the fresh Ray (its staging folder started empty), and
    # the checkpoint each row names is the one Ray Train kept, so promote can use it
    assert all(Path(r["checkpoint"]).is_dir() for r in board), board
