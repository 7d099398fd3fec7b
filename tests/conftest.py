"""Shared fixtures: the bundled real sample, a small ingested dataset, ../shared when present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "kermany-mini"
# ../shared is beside the checkout on developer machines and CI; users do not have it.
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ["RAYCXR_SALT"] = "test-salt"  # never touch the user's salt file from tests


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

    from raycxr.search import init_ray

    if not ray.is_initialized():
        init_ray(address=None, num_cpus=2)
