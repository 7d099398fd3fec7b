"""Scale: ingest and a one-epoch search at growing dataset sizes, materialised against streamed.

For each size N: N distinct 224 px films are written as JPEGs in Kermany's layout (each a real
Kermany224 train film under its own random flip, rotation, zoom, shift and gamma: see
twins_scale.py's _variant; one patient per film), then
- `raycxr ingest` (224 px, 2 decode workers): wall time and peak RSS of the whole process tree;
- `raycxr search --trials 1 --max-epochs 1` of a small network at 224 px (batch 32, 2 CPUs), once
  with `--data-path materialize` and once with `stream`: wall time, the search driver's peak RSS
  (the raycxr process alone), the object store's peak (the growth of /dev/shm, where Ray's plasma
  store keeps its objects on Linux, over its level before the search), the time to the trial's
  first training batch, its training images/s and how much of its epoch it waited for data
  (train_time_s - train_compute_s). ``--paths stream`` skips the materialised search (at sizes
  over the object store it cannot run).
Ratios are within one run. Usage: .venv/bin/python scripts/bench/scale.py [--sizes 10000] [--keep DIR]
[--ingest-only | --searches-only] [--paths materialize,stream]
Needs ../shared/data/kermany224. Runs alone on the machine (it starts its own Ray).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twins_scale import FILES, _machine, _variant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAYCXR = [str(ROOT / ".venv" / "bin" / "raycxr")]


def _write(task: tuple[int, str]) -> None:
    from PIL import Image

    k, root = task
    # film k: a permutation of the real films (2311 is prime to 5,232), so any N mixes both classes
    j = (k * 2311) % len(FILES) + len(FILES) * (k // len(FILES))
    pneumonia = "/PNEUMONIA/" in FILES[j % len(FILES)]
    name = f"person{k}_bacteria_{k}.jpeg" if pneumonia else f"IM-{k:06d}-0001.jpeg"
    Image.fromarray(_variant(j)).save(Path(root) / ("PNEUMONIA" if pneumonia else "NORMAL") / name, quality=90)


def _films(n: int, root: Path) -> None:
    for c in ("NORMAL", "PNEUMONIA"):
        (root / c).mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(2) as pool:
        pool.map(_write, [(k, str(root)) for k in range(n)], chunksize=256)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (children of each thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _shm() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _measured(cmd: list[str], *, tree: bool, log: Path) -> dict:
    """Run ``cmd``; its wall time, peak RSS (of it alone, or of it and its children) and the peak
    growth of /dev/shm."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    peak, shm0, shm = [0], _shm(), [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_rss(q) for q in (_tree(proc.pid) if tree else [proc.pid])))
            shm[0] = max(shm[0], _shm() - shm0)
            time.sleep(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}): {log.read_text()[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak[0] / 2**30, 2),
            "shm_peak_gib": round(shm[0] / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000")
    ap.add_argument("--keep", type=Path, help="keep the films and datasets here")
    ap.add_argument("--ingest-only", action="store_true", help="measure the ingest, not the searches")
    ap.add_argument("--paths", default="materialize,stream", help="the search data paths to measure")
    ap.add_argument("--searches-only", action="store_true",
                    help="with --keep: search the dataset an earlier run left there instead of ingesting again")
    args = ap.parse_args()
    print("#", _machine(), flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="raycxr-scale-"))
    space = work / "space.yaml"
    work.mkdir(parents=True, exist_ok=True)
    space.write_text("trials: 1\nmax_epochs: 1\nseed: 0\nresources: {cpus_per_worker: 2}\n"
                     "params: {model: test_resnet, image_size: 224, batch_size: 32, lr: 0.003}\n")
    try:
        for n in map(int, args.sizes.split(",")):
            films, data = work / f"films-{n}", work / f"data-{n}"
            t = time.perf_counter()
            if not films.exists():
                _films(n, films)
            row = {"films": n, "write_films_s": round(time.perf_counter() - t, 1)}
            if not (args.searches_only and (data / "manifest.json").is_file()):
                shutil.rmtree(data, ignore_errors=True)
                ing = _measured([*RAYCXR, "ingest", "-q", "--source", f"kermany={films}", "--out", str(data),
                                 "--image-size", "224", "--workers", "2"], tree=True, log=work / f"ingest-{n}.log")
                row.update({"ingest_s": ing["wall_s"], "ingest_peak_rss_gib": ing["peak_rss_gib"]})
            row["dataset_gib"] = round(sum(f.stat().st_size for f in data.rglob("*.parquet")) / 2**30, 2)
            if args.ingest_only:
                print(json.dumps(row), flush=True)
                continue
            for path in args.paths.split(","):
                name = f"{path}-{n}"
                shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a kept earlier run of the same size
                s = _measured([*RAYCXR, "search", "-q", "--data", str(data), "--space", str(space), "--name", name,
                               "--runs-dir", str(work / "runs"), "--num-cpus", "2", "--data-path", path],
                              tree=False, log=work / f"search-{name}.log")
                (result,) = (work / "runs" / name / "tune").glob("trial_*/result.json")
                r = json.loads(result.read_text().splitlines()[-1])
                row.update({f"{path}_search_s": s["wall_s"], f"{path}_driver_peak_rss_gib": s["peak_rss_gib"],
                            f"{path}_object_store_peak_gib": s["shm_peak_gib"],
                            f"{path}_first_batch_s": round(r["train_first_batch_s"], 1),
                            f"{path}_train_img_per_s": round(r["train_images_per_s"], 1),
                            f"{path}_data_wait_s": round(r["train_time_s"] - r["train_compute_s"], 1)})
            if "stream_train_img_per_s" in row and "materialize_train_img_per_s" in row:
                row["stream_vs_materialize_img_per_s"] = round(row["stream_train_img_per_s"] /
                                                               row["materialize_train_img_per_s"], 3)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
