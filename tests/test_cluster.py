"""Searches on shared and growing clusters: planning from what is free and what the autoscaler can
add, run names claimed atomically, a second Ray on the same host, and joining a token-auth head."""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from raycxr.config import parse_space
from raycxr.errors import ConfigError

SPACE = {"params": {"model": "test_resnet", "lr": 0.01}}


def _space(**resources):
    return parse_space({**SPACE, "resources": resources}, name="t")


def _cap(total, free=None, ceiling=None, node_cpus=None):
    free = free if free is not None else total
    return {"total": total, "free": free, "ceiling": ceiling,
            "node_cpus": node_cpus if node_cpus is not None else total.get("CPU", 0.0)}


@pytest.mark.parametrize("case,space,capacity,concurrent,gpus", [
    ("a laptop", {}, _cap({"CPU": 2.0}), 2, 0.0),
    ("another search holds a core", {}, _cap({"CPU": 2.0}, free={"CPU": 1.0}), 1, 0.0),
    ("0-CPU head that autoscales to 4 one-CPU workers", {}, _cap({"CPU": 0.0}, ceiling={"CPU": 4.0}, node_cpus=1.0),
     4, 0.0),
    ("GPU workers come only from the autoscaler", {"gpus_per_worker": 1},
     _cap({"CPU": 0.0}, ceiling={"CPU": 32.0, "GPU": 8.0}, node_cpus=4.0), 8, 1.0),
    ("no GPU anywhere: CPU training", {"gpus_per_worker": 1}, _cap({"CPU": 2.0}), 2, 0.0),
])
def test_plan_sizes_to_what_is_free_or_can_be_added(case, space, capacity, concurrent, gpus):
    from raycxr.search import plan_resources

    plan = plan_resources(_space(**space), trials=16, capacity=capacity)
    assert (plan["concurrent"], plan["gpus_per_worker"]) == (concurrent, gpus), case


@pytest.mark.parametrize("case,space,capacity,message", [
    ("0-CPU head, no autoscaler", {}, _cap({"CPU": 0.0}), "cluster has 0"),
    ("more than it can grow to", {"workers_per_trial": 4, "cpus_per_worker": 2},
     _cap({"CPU": 0.0}, ceiling={"CPU": 4.0}, node_cpus=2.0), "can grow to 4"),
    ("a worker larger than any node", {"cpus_per_worker": 4},
     _cap({"CPU": 2.0}, ceiling={"CPU": 8.0}, node_cpus=2.0), "no node has or can have more than 2"),
])
def test_plan_refuses_only_what_can_never_fit(case, space, capacity, message):
    from raycxr.search import plan_resources

    with pytest.raises(ConfigError, match=message):
        plan_resources(_space(**space), trials=4, capacity=capacity)


def test_a_run_name_is_claimed_by_exactly_one_of_many_searches(tmp_path):
    from raycxr.search import SearchConfig, _run_dir

    cfg = SearchConfig(data=tmp_path, space="demo", name="same", runs_dir=tmp_path / "runs")
    space = _space()
    barrier, won, refused = threading.Barrier(8), [], []

    def claim():
        barrier.wait()
        try:
            won.append(_run_dir(cfg, space))
        except ConfigError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7 and all("already exists" in r for r in refused)


@pytest.mark.slow
def test_a_search_that_fails_before_starting_gives_its_name_back(ray_local, dataset, tmp_path):
    from raycxr.search import SearchConfig, run_search

    space = tmp_path / "s.yaml"
    space.write_text("trials: 1\nmax_epochs: 1\nparams: {model: test_resnet, lr: 0.01, image_size: 32}\n")
    cfg = SearchConfig(data=dataset, space=str(space), name="typo", runs_dir=tmp_path / "runs", target="nodule")
    with pytest.raises(ConfigError, match="no known positive and negative nodule"):
        run_search(cfg)
    assert not (tmp_path / "runs" / "typo").exists()  # the corrected command may use the name


def _stop(proc_marker: str) -> None:
    """Kill the processes of the one Ray cluster whose command lines mention ``proc_marker``
    (its temp dir); `ray stop` would stop every Ray on the host, the test session's too."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and proc_marker.encode() in (d / "cmdline").read_bytes():
                os.kill(int(d.name), signal.SIGKILL)
        except OSError:
            continue  # already gone


@pytest.fixture
def second_ray(tmp_path_factory):
    """A second Ray on this host, started the documented way (`ray start --head`) with token
    authentication on, as a head does when its user has a token."""
    from raycxr.search import _free_port

    tmp = tmp_path_factory.mktemp("second-ray")
    temp_dir = Path("/tmp") / f"raycxr-second-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp_dir}",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    yield {"address": f"127.0.0.1:{port}", "token": token}
    _stop(str(temp_dir))


def _join(address: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **env_extra)
    code = ("import ray, sys\nfrom raycxr.search import init_ray\nfrom raycxr.errors import RaycxrError\n"
            "try:\n    init_ray(address=sys.argv[1])\nexcept RaycxrError as e:\n    print(e); sys.exit(2)\n"
            "print('CPUS', ray.cluster_resources().get('CPU'))\n")
    return subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_joining_a_token_auth_head_sends_the_users_token(second_ray):
    ok = _join(second_ray["address"], {"RAY_AUTH_TOKEN_PATH": str(second_ray["token"])})  # RAY_AUTH_MODE unset
    assert ok.returncode == 0 and "CPUS 1.0" in ok.stdout, ok.stdout + ok.stderr[-2000:]
    wrong = second_ray["token"].parent / "wrong"
    wrong.write_text(secrets.token_hex(32))
    refused = _join(second_ray["address"], {"RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert refused.returncode == 2 and "could not join the Ray cluster" in refused.stdout, refused.stdout


@pytest.mark.slow
def test_search_finishes_while_a_second_ray_runs_on_the_host(ray_local, dataset, tmp_path, second_ray):
    """Ray Train's placement-group cleaner asks the state API for its cluster; with two Rays on the
    host and no address pinned it raises "Found multiple active Ray instances", and the groups of
    finished trials leak. Every trial must finish and no placement group may be left."""
    import ray
    from ray.util import placement_group_table

    from raycxr.search import SearchConfig, run_search

    space = tmp_path / "s.yaml"
    space.write_text("trials: 3\nmax_epochs: 2\nseed: 0\nscheduler: {grace_period: 1, reduction_factor: 2}\n"
                     "params: {model: test_resnet, lr: {loguniform: [1.0e-3, 1.0e-2]}, image_size: 32}\n")
    board = run_search(SearchConfig(data=dataset, space=str(space), name="two-rays", runs_dir=tmp_path / "runs"))
    assert len(board) == 3 and all(r["status"] == "ok" for r in board)
    record = json.loads((tmp_path / "runs" / "two-rays" / "run.json").read_text())
    assert record["resources"]["free_cpus"] == 2.0
    # every placement group of this session's trials was removed (none left reserving CPUs)
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(2)
    assert not live, live
    assert ray.available_resources().get("CPU", 0) >= 1.99
