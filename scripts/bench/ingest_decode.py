"""Benchmark: decode + resize of original-resolution chest JPEGs, raycxr's ingest path vs a plain loop.

Baseline: the loop a person writes first: Pillow open -> convert("L") -> resize to the target
size, one process. raycxr: `raycxr.ingest._decode_all` (JPEG draft-mode decoding at a reduced
DCT scale + a process pool over all cores), which also hashes each file and computes its dHash.
Same files, same output size, same machine, one run; several repeats, best time each.

Usage: .venv/bin/python scripts/bench/ingest_decode.py [FOLDER] [SIZE]
(default ../shared/data/kermany-original-sample, 224)
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raycxr.ingest import IngestConfig, _decode_all  # noqa: E402
from raycxr.sources import scan_source  # noqa: E402

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/data/kermany-original-sample"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
records = list(scan_source("kermany", folder))
paths = [r.path for r in records]
mpx = sum(np.prod(Image.open(p).size) for p in paths) / 1e6


def baseline():
    return [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR)) for p in paths]


def raycxr_path():
    cfg = IngestConfig(sources={"kermany": folder}, out=Path("/tmp/unused"), image_size=size, resize="squash")
    return _decode_all(records, cfg)


def best_of(fn, n=3):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    a = np.stack(baseline())
    b = np.stack([np.frombuffer(r[1], np.uint8).reshape(size, size) for r in raycxr_path()])
    diff = np.abs(a.astype(int) - b.astype(int)).mean()
    tb, tr = best_of(baseline), best_of(raycxr_path)
    print(f"{len(paths)} JPEGs, {mpx / len(paths):.1f} MPx each on average, -> {size}x{size}, {os.cpu_count()} cores")
    print(f"plain Pillow loop : {tb:6.2f} s  ({len(paths) / tb:6.1f} img/s)")
    print(f"raycxr ingest path: {tr:6.2f} s  ({len(paths) / tr:6.1f} img/s)  ratio {tb / tr:.2f}x")
    print(f"mean |pixel difference| between the two outputs: {diff:.2f} grey levels of 255")
