"""Scale on a cluster: a dataset on (moto's) S3, searched by a two-node local cluster, both nodes reading.

The README's cluster path at size, on one machine: moto's S3 server on loopback; the films that
scale.py made (``--films DIR``, e.g. /tmp/scale-keep/films-50000 from ``scale.py --keep``) ingested
straight to ``s3://raycxr/data/NAME``; a `ray start` cluster of a 0-CPU head and two 1-CPU worker
nodes (each its own temp dir and object store, token auth on, as cluster.yaml has it); then
``ray job submit -- raycxr search`` of one trial of two DDP workers (one per node), one epoch,
``--data-path stream``, the run on S3. Reports the ingest's wall time and peak RSS, the search's
wall time, the trial's training images/s (both workers), time to first batch and data wait, and on
which nodes the shard-reading tasks and the training workers ran (Ray's state API).

Usage: .venv/bin/python scripts/bench/scale_cluster.py --films /tmp/scale-keep/films-50000
Runs alone on the machine (it starts its own Ray processes and moto).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from scale import RAYCXR, _measured  # noqa: E402
from test_cluster import _Cluster  # noqa: E402  (the test suite's `ray start` cluster, token auth on)
from twins_scale import _machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OBJECT_STORE = 2_000_000_000  # per node


def _moto(work: Path) -> tuple[subprocess.Popen, dict]:
    from raycxr.cluster import _free_port

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(work / "moto.log", "w"), stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for _ in range(200):
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raycxr")
    return server, env


_WHERE = """
import collections, json, ray
from ray.util.state import list_tasks, list_actors
ray.init(address=%r, logging_level="ERROR")
heads = {n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]}
name = {n["NodeID"]: ("head" if n["NodeID"] in heads else "worker-" + n["NodeID"][:6]) for n in ray.nodes()}
reads = collections.Counter(name.get(t.node_id, "?") for t in list_tasks(limit=100000, detail=True, raise_on_missing_output=False)
                            if "ReadShards" in (t.name or ""))
train = collections.Counter(name.get(a.node_id, "?") for a in list_actors(limit=10000, detail=True, raise_on_missing_output=False)
                            if "RayTrainWorker" in (a.class_name or ""))
print("WHERE", json.dumps({"read_tasks_by_node": dict(reads), "train_workers_by_node": dict(train)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--films", type=Path, required=True, help="a folder of films in Kermany's layout (scale.py --keep)")
    args = ap.parse_args()
    print("#", _machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="raycxr-scale-cluster-"))
    server, env = _moto(work)
    n = sum(1 for _ in args.films.rglob("*.jpeg"))
    data = f"s3://raycxr/data/films-{n}"
    row = {"films": n}
    cluster = None
    try:
        ing = _measured([*RAYCXR, "ingest", "-q", "--source", f"kermany={args.films}", "--out", data,
                         "--image-size", "224", "--workers", "2"], tree=True, log=work / "ingest.log")
        row.update({"ingest_to_s3_s": ing["wall_s"], "ingest_peak_rss_gib": ing["peak_rss_gib"]})
        space = work / "space.yaml"
        space.write_text("trials: 1\nmax_epochs: 1\nseed: 0\nresources: {workers_per_trial: 2, cpus_per_worker: 1}\n"
                         "params: {model: test_resnet, image_size: 224, batch_size: 32, lr: 0.003}\n")
        cluster = _Cluster(work)
        cluster.start_head(f"--object-store-memory={OBJECT_STORE}")  # the later flag wins: the driver's val split
        from raycxr.cluster import _free_port

        for w in (1, 2):  # as _Cluster.add_worker, with object stores for 224 px blocks (its 300 MB are for tests)
            cluster.ray("start", f"--address={cluster.address}", "--num-cpus=1", f"--object-store-memory={OBJECT_STORE}",
                        f"--temp-dir={cluster.temp_dir}-w{w}", f"--dashboard-agent-listen-port={_free_port()}",
                        "--disable-usage-stats")
        t0 = time.perf_counter()
        submit = cluster.submit("search", "-q", "--data", data, "--data-path", "stream", "--space", str(space),
                                "--name", "s3run", "--storage", "s3://raycxr/runs", job_id="scale-cluster",
                                working_dir=False)
        row["search_s"] = round(time.perf_counter() - t0, 1)
        (work / "job.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0 or "succeeded" not in submit.stdout:
            raise SystemExit(f"the search failed: {submit.stdout[-3000:]}{submit.stderr[-2000:]}")
        where = subprocess.run([sys.executable, "-c", _WHERE % cluster.address], env=cluster.env,
                               capture_output=True, text=True, timeout=300)
        row.update(json.loads(next((ln[6:] for ln in where.stdout.splitlines() if ln.startswith("WHERE ")), "{}")))
        from raycxr.storage import RunStore

        import csv
        import io

        run = RunStore("s3://raycxr/runs/s3run")
        (trial,) = list(csv.DictReader(io.StringIO(run.read_text("leaderboard.csv"))))
        text = run.read_text(f"tune/trial_{trial['trial_id']}/result.json")
        r = json.loads(text.splitlines()[-1]) if text else {}
        row.update({"world_size": r.get("world_size"), "trial_nodes": len(set(str(r.get("nodes", "")).split(","))),
                    "train_img_per_s": round(r.get("train_images_per_s", float("nan")), 1),
                    "first_batch_s": round(r.get("train_first_batch_s", float("nan")), 1),
                    "data_wait_s": round(r.get("train_time_s", 0) - r.get("train_compute_s", 0), 1),
                    "val_auc": r.get("val_auc")})
        print(json.dumps(row), flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
