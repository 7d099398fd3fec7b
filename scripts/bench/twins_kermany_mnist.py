"""Cross-dataset twins: how many PneumoniaMNIST images does raycxr find in Kermany, and are they right?

PneumoniaMNIST's train and val (5,232 images) are the Kermany train and val films (5,216 + 16),
centre-cropped and shrunk to 28 px; ../shared has the Kermany train split squashed to 224 px and
the 16 val films at full size. So every MNIST image has exactly one true original here, and:
- recall = MNIST images matched to some Kermany image / 5,232;
- precision, by pixel comparison on a random sample of matches: the matched Kermany view, shrunk to
  28 px, against the MNIST image (Pearson r and mean absolute grey difference), beside the same
  figures for each MNIST image's best non-matching candidate (what a wrong match looks like).

Usage: .venv/bin/python scripts/bench/twins_kermany_mnist.py [--sample 300] [--sheet twins.png]
Needs ../shared/data (kermany224, kermany-val-original, pneumoniamnist). Runs alone on the machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raycxr.dedup import TWIN_CROPS, TWIN_SIMILARITY, _centre, cross_source_twins, twin_views
from raycxr.imaging import read_image

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _view(image: np.ndarray, k: int) -> np.ndarray:
    h, w = image.shape
    if k == 0:
        return _centre(image, min(h, w), min(h, w))
    fx, fy = TWIN_CROPS[k - 1]
    return _centre(image, max(8, round(h * fy)), max(8, round(w * fx)))


def _compare(mnist: np.ndarray, view: np.ndarray) -> tuple[float, float]:
    small = np.asarray(Image.fromarray(view).resize(mnist.shape[::-1], Image.BILINEAR, reducing_gap=2.0), np.float64)
    m = mnist.astype(np.float64)
    return float(np.corrcoef(m.ravel(), small.ravel())[0, 1]), float(np.abs(m - small).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", type=int, default=300)
    ap.add_argument("--sheet", type=Path, help="write a contact sheet of sampled matches (MNIST | Kermany view)")
    ap.add_argument("--min-similarity", type=float, default=TWIN_SIMILARITY)
    args = ap.parse_args()
    rng = np.random.default_rng(0)

    z = np.load(SHARED / "pneumoniamnist" / "pneumoniamnist_trainval.npz")
    mnist = list(np.concatenate([z["train_images"], z["val_images"]]))
    files = sorted(glob.glob(str(SHARED / "kermany224" / "train" / "*" / "*.jpeg")))
    files += sorted(glob.glob(str(SHARED / "kermany-val-original" / "*" / "*.jpeg")))
    kermany = [read_image(f) for f in files]
    t0 = time.perf_counter()
    views = [twin_views(a) for a in mnist] + [twin_views(a) for a in kermany]
    t1 = time.perf_counter()
    sources = ["pneumoniamnist"] * len(mnist) + ["kermany"] * len(kermany)
    pairs = cross_source_twins(views, sources, min_similarity=args.min_similarity)
    t2 = time.perf_counter()

    n = len(mnist)
    matched = {}
    for i, j, s in pairs:  # i < j: i is the MNIST image
        if s > matched.get(i, (None, -1))[1]:
            matched[i] = (j - n, s)
    # each matched MNIST image: which Kermany view matched best, and its best non-matching rival
    bank = np.concatenate([v.astype(np.float32) for v in views[n:]])
    owner = np.concatenate([np.full(len(v), k) for k, v in enumerate(views[n:])])
    first = np.concatenate([[0], np.cumsum([len(v) for v in views[n:]])[:-1]])
    sample = rng.choice(sorted(matched), size=min(args.sample, len(matched)), replace=False)
    true_r, true_d, rival_r, rival_d, sheet = [], [], [], [], []
    for i in sample:
        k, _ = matched[i]
        sim = bank @ views[i][0].astype(np.float32)
        own = slice(first[k], first[k] + len(views[n + k]))
        best_view = int(np.argmax(sim[own]))
        r, d = _compare(mnist[i], _view(kermany[k], best_view))
        true_r.append(r), true_d.append(d)
        sim[owner == k] = -2
        b = int(np.argmax(sim))
        rk, rv = int(owner[b]), b - first[owner[b]]
        r2, d2 = _compare(mnist[i], _view(kermany[rk], rv))
        rival_r.append(r2), rival_d.append(d2)
        if args.sheet and len(sheet) < 24:
            sheet.append(np.hstack([mnist[i], np.asarray(Image.fromarray(_view(kermany[k], best_view)).resize((28, 28)))]))
    true_r, rival_r = np.array(true_r), np.array(rival_r)
    true_d, rival_d = np.array(true_d), np.array(rival_d)
    verified = (true_r >= 0.95) & (true_d <= 8.0)  # same picture: correlated AND the same grey levels
    out = {
        "mnist_images": n, "kermany_images": len(kermany), "pairs": len(pairs), "mnist_matched": len(matched),
        "recall": round(len(matched) / n, 4), "min_similarity": args.min_similarity,
        "kermany_matched_by_several": int(sum(c > 1 for c in np.bincount([k for k, _ in matched.values()]))),
        "sample": len(sample), "sample_verified(r>=0.95,mad<=8)": int(verified.sum()),
        "precision_on_sample": round(float(verified.mean()), 4),
        "match_r_median": round(float(np.median(true_r)), 4), "match_r_p01": round(float(np.quantile(true_r, 0.01)), 4),
        "match_mad_median": round(float(np.median(true_d)), 2), "match_mad_p99": round(float(np.quantile(true_d, .99)), 2),
        "rival_r_median": round(float(np.median(rival_r)), 4), "rival_r_p99": round(float(np.quantile(rival_r, 0.99)), 4),
        "rival_mad_median": round(float(np.median(rival_d)), 2), "rival_mad_p01": round(float(np.quantile(rival_d, .01)), 2),
        "rivals_passing_the_check": int(((rival_r >= 0.95) & (rival_d <= 8.0)).sum()),
        "describe_s": round(t1 - t0, 1), "match_s": round(t2 - t1, 1),
    }
    print(json.dumps(out, indent=2))
    if args.sheet and sheet:
        rows = [np.vstack(sheet[c:c + 6]) for c in range(0, len(sheet) - len(sheet) % 6, 6)]
        Image.fromarray(np.hstack(rows)).resize((len(rows) * 56 * 4, 6 * 28 * 4), Image.NEAREST).save(args.sheet)


if __name__ == "__main__":
    main()
