"""Searches on shared and growing clusters: planning from what is free and what the autoscaler can
add, run names claimed atomically, a second Ray on the same host, and joining a token-auth head."""

import csv
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raycxr.config import parse_space
from raycxr.errors import ConfigError
from raycxr.storage import RunStore

SPACE = {"params": {"model": "test_resnet", "lr": 0.01}}


def _space(**resources):
    return parse_space({**SPACE, "resources": resources}, name="t")


def _cap(total, free=None, ceiling=None, node_cpus=None, autoscaler=None):
    free = free if free is not None else total
    return {"total": total, "free": free, "ceiling": ceiling, "autoscaler": autoscaler or ceiling is not None,
            "node_cpus": node_cpus if node_cpus is not None else total.get("CPU", 0.0)}


@pytest.mark.parametrize("case,space,capacity,concurrent,gpus", [
    ("a laptop", {}, _cap({"CPU": 2.0}), 2, 0.0),
    ("another search holds a core", {}, _cap({"CPU": 2.0}, free={"CPU": 1.0}), 1, 0.0),
    ("0-CPU head that autoscales to 4 one-CPU workers", {}, _cap({"CPU": 0.0}, ceiling={"CPU": 4.0}, node_cpus=1.0),
     4, 0.0),
    ("GPU workers come only from the autoscaler", {"gpus_per_worker": 1},
     _cap({"CPU": 0.0}, ceiling={"CPU": 32.0, "GPU": 8.0}, node_cpus=4.0), 8, 1.0),
    ("no GPU anywhere: CPU training", {"gpus_per_worker": 1}, _cap({"CPU": 2.0}), 2, 0.0),
    ("autoscaler v1 (maximum unpublished), 0-CPU head: every trial queued, GPUs kept for the nodes it adds",
     {"gpus_per_worker": 1}, _cap({"CPU": 0.0}, autoscaler=True), 16, 1.0),
])
def test_plan_sizes_to_what_is_free_or_can_be_added(case, space, capacity, concurrent, gpus):
    from raycxr.cluster import plan_resources

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
    from raycxr.cluster import plan_resources

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


@pytest.mark.slow
def test_the_local_dashboard_runs_jobs_only_for_the_users_token(ray_local):
    """Issue 27: the search's local dashboard (127.0.0.1) and its Jobs API, which runs code, refuse a
    caller without this user's Ray token (Ray's token auth, which init_ray keeps on)."""
    import json
    import urllib.error
    import urllib.request

    import ray

    url = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or token_file.read_text().strip()
    submit = json.dumps({"entrypoint": "echo pwned"}).encode()
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", data=submit, method="POST",
                                                          headers={"Content-Type": "application/json", **headers}),
                                   timeout=30)
        assert refused.value.code in (401, 403)
    listed = urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/",
                                                           headers={"Authorization": f"Bearer {token}"}), timeout=30)
    jobs = json.loads(listed.read())  # the user's token: answered; the refused submissions ran nothing
    assert listed.status == 200 and not [j for j in jobs if j.get("entrypoint") == "echo pwned"]


@pytest.fixture(scope="module")
def second_ray(tmp_path_factory):
    """A second Ray on this host, started the documented way (`ray start --head`) with token
    authentication on, as a head does when its user has a token."""
    from raycxr.cluster import _free_port

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
    code = ("import ray, sys\nfrom raycxr.cluster import init_ray\nfrom raycxr.errors import RaycxrError\n"
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
    board = run_search(SearchConfig(data=dataset, space=str(space), name="two-rays", runs_dir=tmp_path / "runs",
                                    scheduler="asha"))
    assert len(board) == 3 and all(r["status"] == "ok" for r in board)
    record = json.loads((tmp_path / "runs" / "two-rays" / "run.json").read_text())
    assert record["resources"]["free_cpus"] == 2.0
    # every placement group of this session's trials was removed and every CPU given back (the
    # reused trial processes are stopped after the search returns: give Ray a moment to free them)
    deadline = time.time() + 60
    while time.time() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and ray.available_resources().get("CPU", 0) >= 1.99:
            break
        time.sleep(2)
    assert not live, live
    assert ray.available_resources().get("CPU", 0) >= 1.99, ray.available_resources()
    # The Optuna study (SQLite in the run folder) holds what the leaderboard ranks by: a finished
    # trial's best epoch; a trial ASHA stopped is pruned, with its epochs' running best.
    import optuna

    study = optuna.load_study(study_name="two-rays", storage=f"sqlite:///{tmp_path / 'runs' / 'two-rays' / 'optuna.db'}")
    rows = {r["trial_id"]: r for r in board}
    assert len(study.trials) == 3
    for t in study.trials:
        row = rows[t.user_attrs["tune_trial_id"]]
        assert max(t.intermediate_values.values()) == pytest.approx(row["val_auc"])
        if row["epochs"] == 2:
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(row["val_auc"])
        else:
            assert t.state == optuna.trial.TrialState.PRUNED and sorted(t.intermediate_values) == [1]


# --- Real multi-node clusters from Ray's own CLI, as README "Running on a cluster" does them ---

RAY_BIN = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]


class _Cluster:
    """Ray processes started with `ray start` under one temp dir (killed by it, never `ray stop`,
    which would stop every Ray on the host), token auth on as cluster.yaml has it."""

    def __init__(self, tmp: Path, extra_env: dict | None = None):
        from raycxr.cluster import _free_port

        self.temp_dir = Path("/tmp") / f"raycxr-c-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        # the environment of every node and client: an activated venv (`raycxr` on PATH), the token
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                        PATH=f"{RAY_BIN.parent}:{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1",
                        **(extra_env or {}))
        self.port, self.dashboard, self.agent = _free_port(), _free_port(), _free_port()
        self.workers = 0
        self.address = f"127.0.0.1:{self.port}"

    def ray(self, *args, env_extra: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([str(RAY_BIN), *args], env={**self.env, **(env_extra or {})}, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"ray {' '.join(args)}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
        return out

    def start_head(self, *extra: str, env_extra: dict | None = None):
        self.ray("start", "--head", f"--port={self.port}", "--num-cpus=0", f"--temp-dir={self.temp_dir}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                 f"--dashboard-agent-listen-port={self.agent}", "--disable-usage-stats",
                 "--object-store-memory=300000000", *extra, env_extra=env_extra)

    def add_worker(self, cpus: int = 1):
        """A worker node. Its own temp dir and agent port, as on its own machine: nodes sharing one
        temp dir share the jobs' working_dir cache, and one node's clean-up deletes another's."""
        from raycxr.cluster import _free_port

        self.workers += 1
        self.ray("start", f"--address={self.address}", f"--num-cpus={cpus}", "--object-store-memory=300000000",
                 f"--temp-dir={self.temp_dir}-w{self.workers}", f"--dashboard-agent-listen-port={_free_port()}",
                 "--disable-usage-stats")

    def nodes(self) -> list[dict]:
        """The alive nodes: {"id", "head", "cpus"}."""
        code = ("import json, ray\nray.init(address=%r, logging_level='ERROR')\n"
                "print('NODES', json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0), "
                "'head': 'node:__internal_head__' in n['Resources']} for n in ray.nodes() if n['Alive']]))"
                % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        # the autoscaler's events ("Resized to 1 CPUs") reach this driver's stdout too
        return json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("NODES "))[6:])

    def submit(self, *raycxr_args: str, job_id: str, working_dir: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . -- raycxr ...` through the dashboard: the driver runs on
        the head, with this checkout uploaded as its working directory (or, without, the raycxr
        installed on the nodes)."""
        upload = ["--working-dir", "."] if working_dir else []
        return subprocess.run([str(RAY_BIN), "job", "submit", *upload, "--submission-id", job_id, "--", "raycxr",
                               *raycxr_args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**self.env, "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard}"})

    def stop(self):
        _stop(str(self.temp_dir))


def _trial_nodes(results: list[str]) -> list[set[str]]:
    """Per trial: the node ids its epochs ran on, from the text of its result.json."""
    return [{n for line in text.splitlines() if line.strip() for n in json.loads(line)["nodes"].split(",")}
            for text in results]


def _tiny_space(tmp_path: Path, trials: int) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(f"trials: {trials}\nmax_epochs: 2\nseed: 3\n"
                     "params: {model: test_resnet, image_size: 32, lr: {loguniform: [1.0e-3, 1.0e-2]}}\n")
    return space


@pytest.mark.slow
def test_ray_job_submit_on_a_ray_start_cluster_runs_trials_on_the_workers_and_promotes_from_s3(
        sample_dir, tmp_path, s3_server):
    """README's cluster path on one machine: a 0-CPU head and two 1-CPU workers from `ray start`
    (token auth on), the search submitted with `ray job submit --working-dir .` on a dataset in S3
    that the trials stream (Ray Data tasks on the workers read its shards), results on S3; every
    trial ran on the workers."""
    import ray

    from raycxr.ingest import IngestConfig, ingest

    if ray.is_initialized():  # the cluster below needs the cores the session's Ray would hold
        ray.shutdown()
    data = "s3://raycxr/data/cluster"
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=data, image_size=64, seed=0))
    cluster = _Cluster(tmp_path)
    try:
        cluster.start_head()
        cluster.add_worker()
        cluster.add_worker()
        nodes = cluster.nodes()
        head = {n["id"] for n in nodes if n["head"]}
        workers = {n["id"] for n in nodes if not n["head"]}
        assert len(head) == 1 and len(workers) == 2, nodes
        submit = cluster.submit("search", "--data", data, "--data-path", "stream", "--space",
                                str(_tiny_space(tmp_path, 2)), "--name", "jobrun", "--storage", "s3://raycxr/jobs", "--searcher", "random",
                                "--no-early-stopping", job_id="raycxr-job-test")
        assert submit.returncode == 0 and "succeeded" in submit.stdout, submit.stdout[-4000:] + submit.stderr[-3000:]
        assert "Search jobrun: 2 trials" in submit.stdout and "2 at a time" in submit.stdout, submit.stdout[-4000:]
        assert "Data: --data-path stream" in submit.stdout, submit.stdout[-4000:]
        run = RunStore("s3://raycxr/jobs/jobrun")
        board = list(csv.DictReader(io.StringIO(run.read_text("leaderboard.csv"))))
        assert len(board) == 2 and all(r["status"] == "ok" and r["epochs"] == "2" for r in board), board
        ran_on = _trial_nodes([run.read_text(f"tune/trial_{r['trial_id']}/result.json") for r in board])
        assert all(ids and ids <= workers for ids in ran_on), (ran_on, workers)  # never the 0-CPU head
    finally:
        cluster.stop()
    # (a run on S3 promoted from the "laptop": tests/test_storage.py's S3 search)


def _fake_autoscaling_config(path: Path, gcs_address: str) -> Path:
    """Ray's fake multi-node provider (its example.yaml, which the 2.60 wheel does not ship):
    a 0-CPU head and a 1-CPU worker type the autoscaler may launch twice, idle after 6 s."""
    import yaml

    config = {
        "cluster_name": "raycxr-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 300_000_000}, "node_config": {},
                           "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_search_makes_the_autoscaler_add_workers_that_scale_down_when_idle(dataset, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = _Cluster(tmp_path)
    runs = tmp_path / "runs"
    try:
        cluster.start_head(f"--autoscaling-config={_fake_autoscaling_config(tmp_path / 'fake.yaml', cluster.address)}",
                           env_extra={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        assert [n["head"] for n in cluster.nodes()] == [True]  # no worker until a trial asks for one
        # As a job, so the driver runs on the head: Ray Data pins two small detached actors to the
        # driver's node, and a worker holding them would never be idle. Without --working-dir: the
        # fake provider's nodes share the head's temp dir, and a removed node takes the job's
        # unpacked working dir with it (on real machines each node has its own).
        search = cluster.submit("search", "--data", str(dataset), "--space", str(_tiny_space(tmp_path, 3)), "--name",
                                "grow", "--runs-dir", str(runs), "--searcher", "random", "--no-early-stopping",
                                job_id="raycxr-autoscale-test", working_dir=False)
        assert search.returncode == 0 and "succeeded" in search.stdout, search.stdout[-4000:] + search.stderr[-3000:]
        record = json.loads((runs / "grow" / "run.json").read_text())
        assert record["resources"]["autoscaler"] and record["resources"]["cluster_cpus"] == 0.0
        board = list(csv.DictReader(open(runs / "grow" / "leaderboard.csv")))
        assert len(board) == 3 and all(r["status"] == "ok" and r["epochs"] == "2" for r in board), board
        ran_on = _trial_nodes([(runs / "grow" / "tune" / f"trial_{r['trial_id']}" / "result.json").read_text()
                               for r in board])
        head = "f" * 51 + "00000"  # the fake provider's fixed head node id
        assert all(ids and head not in ids for ids in ran_on), ran_on
        assert len(set().union(*ran_on)) == 2, ran_on  # the autoscaler launched both workers it may
        deadline = time.time() + 120
        while len(cluster.nodes()) > 1 and time.time() < deadline:
            time.sleep(5)
        assert [n["head"] for n in cluster.nodes()] == [True], "idle workers were not scaled down"
    finally:
        cluster.stop()
