"""Shared fixtures: the bundled real sample, a small ingested dataset, ../shared when present."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "kermany-mini"
# ../shared is beside the checkout on developer machines and CI; users do not have it.
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ["RAYCXR_SALT"] = "test-salt"  # never touch the user's salt file from tests
os.environ["RAYCXR_CACHE"] = tempfile.mkdtemp(prefix="raycxr-test-cache-")  # nor the user's cache
# nor the user's run-signing key (created on first use, here)
os.environ["RAYCXR_KEY_FILE"] = str(Path(tempfile.mkdtemp(prefix="raycxr-test-key-")) / "run-signing.key")


# Fixtures that start Ray, a search, a promotion or moto's S3 server: a test using one (directly or
# through another fixture) is slow, whatever its own marks say, so `-m "not slow"` starts none of them.
SLOW_FIXTURES = {"ray_local", "_ray_session", "promoted_run", "second_promotion", "s3_server", "second_ray"}
# Tests that shut the session's Ray down (their clusters need its cores): run last, so the tests
# that share the session's Ray start it once instead of again after each of these.
OWN_RAY = ("test_cluster.py::test_ray_job_submit", "test_cluster.py::test_a_search_makes_the_autoscaler",
           "test_faults.py::test_two_node_cluster", "test_faults.py::test_killed_driver_that_owned",
           "test_storage.py::test_search_on_s3")


def pytest_configure(config):
    """The quick tier (``-m "not slow"``) starts no Ray: ``ray.init`` (which Ray Data and Tune call
    too) fails the test that reaches it, saying what to do."""
    if config.getoption("markexpr", "").replace(" ", "") == "notslow":
        import ray

        def refuse(*args, **kwargs):
            raise RuntimeError("a quick-tier test started Ray: mark it @pytest.mark.slow or use a Ray fixture "
                               f"({', '.join(sorted(SLOW_FIXTURES))})")

        ray.init = refuse


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: any(k in item.nodeid for k in OWN_RAY))  # stable: otherwise in file order


@pytest.fixture(autouse=True)
def _own_ledgers(tmp_path_factory, monkeypatch):
    """Each test its own user-level holdout ledgers (raycxr.ledger.user_ledgers): tests ingest the same
    bundled films, and one test's reads must not count in another's. Session fixtures (the shared
    promoted run) are built before this applies and keep the session's cache."""
    monkeypatch.setenv("RAYCXR_LEDGER_DIR", str(tmp_path_factory.mktemp("ledgers")))


def shared(path: str) -> Path:
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"../shared/data/{path} is not present")
    return p


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE.is_dir(), "the bundled sample is missing from the repo"
    return SAMPLE


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, sample_dir) -> Path:
    """The bundled sample ingested at 64 px (session-wide; tests must not modify it)."""
    from raycxr.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("ds") / "data"
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=64, seed=0))
    return out


@pytest.fixture
def sample_copy(tmp_path, sample_dir) -> Path:
    """A writable copy of the sample in Kaggle layout (train/ holds the class folders)."""
    dst = tmp_path / "chest_xray" / "train"
    shutil.copytree(sample_dir, dst)
    return dst.parent


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """One local Ray (2 CPUs, dashboard on 127.0.0.1) shared by the tests that search; started
    again if a test (the two-node cluster ones) had to shut it down."""
    import ray

    from raycxr.cluster import init_ray

    if not ray.is_initialized():
        init_ray(address=None, num_cpus=2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API on localhost (moto's server, started here), one bucket "raycxr", and the
    environment every client (pyarrow, Ray's workers, subprocesses) reads it from. Yields that
    environment; the test process's own os.environ gets it too."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto_server did not start on port {port}")
            time.sleep(0.3)
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raycxr")
    yield env
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def promoted_run(tmp_path_factory, sample_dir, _ray_session):
    """A real search (2 tiny trials, 2 epochs, local Ray) on the sample ingested at 64 px, promoted
    once, all through the Python API (raycxr.ingest / search / promote): {"data", "run", "model",
    "card" (model_card.json, read by raycxr.ModelCard), "promoted" (what raycxr.promote returned), "ingested" (the IngestSummary),
    "searched" (the SearchResult), "search_stdout" (what the search printed on file descriptor 1)}. Session-wide and
    read-only for tests (the card, report, MLflow and Python API tests share it; copy what you change)."""
    import ray

    import raycxr
    from raycxr.card import ModelCard
    from raycxr.cluster import init_ray

    base = tmp_path_factory.mktemp("promoted")
    ingested = raycxr.ingest({"kermany": sample_dir}, base / "data", image_size=64, seed=0)
    space = base / "tiny.yaml"
    space.write_text("trials: 2\nmax_epochs: 2\nseed: 0\nresources: {workers_per_trial: 1, cpus_per_worker: 1}\n"
                     "params:\n  model: [test_resnet, test_efficientnet]\n  image_size: 64\n"
                     "  lr: {loguniform: [2.0e-3, 1.0e-2]}\n  batch_size: 16\n")
    if not ray.is_initialized():
        init_ray(address=None, num_cpus=2)
    with tempfile.TemporaryFile() as printed:  # what the search writes to file descriptor 1 (none, at verbosity 0)
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(printed.fileno(), 1)
        try:
            searched = raycxr.search(base / "data", space, name="shared", runs_dir=base / "runs", verbosity=0)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        printed.seek(0)
        search_stdout = printed.read().decode(errors="replace")
    promoted = raycxr.promote(searched.run, base / "model", n_boot=200)
    return {"data": base / "data", "run": Path(searched.run), "model": base / "model",
            "card": ModelCard.load(base / "model"), "promoted": promoted,
            "ingested": ingested, "searched": searched, "search_stdout": search_stdout}


@pytest.fixture(scope="session")
def second_promotion(promoted_run, tmp_path_factory):
    """The shared run promoted a second time, from a copy of its folder (as a second search over the
    same data would be), with ``--quantize int8``: {"run", "model", "card"}. Read-only for tests:
    the int8 serving, the holdout ledger and the --force tests share it."""
    import shutil

    import raycxr

    base = tmp_path_factory.mktemp("second")
    run = shutil.copytree(promoted_run["run"], base / "run")  # the shared run's own ledger stays as it is
    card = raycxr.promote(run, base / "model", n_boot=200, tta="off", quantize="int8")
    return {"run": Path(run), "model": base / "model", "card": card}
