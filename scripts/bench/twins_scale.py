"""Cross-source twin matching at scale: exact pairs against the FAISS inverted-file index.

Two made-up sites from the real Kermany224 train films (../shared/data): site B has N distinct
films, each a real film under its own random flip, rotation (up to 10 degrees), zoom (0.8-1.25),
shift (up to 10%) and gamma (0.6-1.6), squashed to 224 px as Kermany224 is; site A republishes M of
them the PneumoniaMNIST way (centre square shrunk to 28 px). Each A image has one true original in
B. For each size and each of ``index="exact"`` and ``"ivf"`` (raycxr.dedup.cross_source_twins):
match time, recall (A images paired with their own original), A images paired with another
variant of the same real film (a sibling: a near-copy, expected), with an unrelated film (wrong),
and how many pairs the two methods disagree on.

Usage: .venv/bin/python scripts/bench/twins_scale.py [--sizes 2000x20000,10000x100000]
Runs alone on the machine (two processes describe the films, then the matching uses both cores).
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raycxr.dedup import cross_source_twins, twin_views

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FILES = sorted(glob.glob(str(SHARED / "kermany224" / "train" / "*" / "*.jpeg")))


def _variant(k: int) -> np.ndarray:
    """Film k of site B: real film k mod 5,232 under transformation k's own random draw."""
    rng = np.random.default_rng(k)
    img = Image.open(FILES[k % len(FILES)]).convert("L")
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    zoom, (dx, dy) = rng.uniform(0.8, 1.25), rng.uniform(-0.1, 0.1, 2) * w
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, translate=(dx, dy))
    cw, ch = w / zoom, h / zoom
    img = img.transform((224, 224), Image.EXTENT, ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2), Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return np.clip(255.0 * a ** rng.uniform(0.6, 1.6), 0, 255).astype(np.uint8)


def _mnist_copy(film: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(film).resize((28, 28), Image.BILINEAR, reducing_gap=2.0))  # square already


def _describe(task: tuple[int, bool]) -> np.ndarray:
    k, copy = task
    film = _variant(k)
    return twin_views(_mnist_copy(film) if copy else film)


def _machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2"))]
    return f"{platform.node()} | {model} | {' '.join(keep)}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000x20000,10000x100000", help="MxN pairs: A images x B films")
    args = ap.parse_args()
    print("#", _machine(), flush=True)
    for size in args.sizes.split(","):
        m, n = map(int, size.split("x"))
        chosen = np.random.default_rng(0).choice(n, size=m, replace=False)
        t0 = time.perf_counter()
        with multiprocessing.Pool(2) as pool:
            views = pool.map(_describe, [(int(k), True) for k in chosen] + [(k, False) for k in range(n)],
                             chunksize=256)
        t1 = time.perf_counter()
        sources = ["a"] * m + ["b"] * n
        row = {"a_images": m, "b_films": n, "b_views": int(sum(len(v) for v in views[m:])),
               "describe_s": round(t1 - t0, 1)}
        found = {}
        for index in ("exact", "ivf"):
            t = time.perf_counter()
            pairs = cross_source_twins(views, sources, index=index)
            row[f"{index}_s"] = round(time.perf_counter() - t, 1)
            got = {(i, j - m) for i, j, _ in pairs}
            found[index] = got
            own = {i for i, b in got if b == chosen[i]}
            sibling = {i for i, b in got if b != chosen[i] and b % len(FILES) == chosen[i] % len(FILES)} - own
            wrong = {i for i, b in got if b % len(FILES) != chosen[i] % len(FILES)}
            row[f"{index}_recall"] = round(len(own) / m, 4)
            row[f"{index}_a_with_a_sibling_only"] = len(sibling)
            row[f"{index}_a_with_an_unrelated_film"] = len(wrong)
        row["pairs_exact_only"] = len(found["exact"] - found["ivf"])
        row["pairs_ivf_only"] = len(found["ivf"] - found["exact"])
        row["speedup"] = round(row["exact_s"] / max(row["ivf_s"], 1e-9), 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
