"""Benchmark: per-trial overhead of raycxr's Tune + Train + Ray Data stack on a CPU.

One search of TRIALS trials, one at a time, each about a minute of real training (resnet10t on
the bundled sample), on a fresh local Ray. Reports per trial, from the trial's own metrics:
  trial wall time   Tune's time_total_s for the trial (actor start to last report)
  train compute     sum over epochs of forward/backward/step time (train_compute_s)
  epoch time        sum over epochs of train_time_s (compute + waiting for batches + augmentation)
  overhead          (wall - compute) / wall, and (wall - epoch time - eval) / wall

Usage: .venv/bin/python scripts/bench/trial_overhead.py [EPOCHS] [TRIALS]
Ray settings in the environment reach the local Ray (e.g. RAY_preload_python_modules=torch,timm
to compare worker preloading; it made start-up slower here, see BENCHMARKS.md).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAYCXR_SALT", "bench")

from raycxr.ingest import IngestConfig, ingest  # noqa: E402
from raycxr.search import SearchConfig, run_search  # noqa: E402

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 12
trials = int(sys.argv[2]) if len(sys.argv) > 2 else 1
work = Path(tempfile.mkdtemp(prefix="raycxr-overhead-"))
ingest(IngestConfig(sources={"kermany": ROOT / "sample" / "kermany-mini"}, out=work / "data", image_size=96))
space = work / "space.yaml"
space.write_text(f"trials: {trials}\nmax_epochs: {epochs}\nscheduler: {{grace_period: {epochs}}}\n"
                 "resources: {workers_per_trial: 1, cpus_per_worker: 2}\n"
                 "params: {model: resnet10t, image_size: 96, lr: 0.002, batch_size: 32, augment: light}\n")
t0 = time.perf_counter()
run_search(SearchConfig(data=work / "data", space=str(space), name="overhead", runs_dir=work / "runs"))
search_wall = time.perf_counter() - t0

print(f"search wall {search_wall:.1f} s (incl. ray.init and dataset load); "
      f"RAY_preload_python_modules={os.environ.get('RAY_preload_python_modules')!r}")
results = sorted((work / "runs" / "overhead" / "tune").glob("trial_*/result.json"), key=lambda f: f.stat().st_mtime)
for i, f in enumerate(results):
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    wall = rows[-1]["time_total_s"]
    compute = sum(r["train_compute_s"] for r in rows)
    epoch_time = sum(r["train_time_s"] for r in rows)
    first = rows[0]["time_total_s"] - rows[0]["train_time_s"]
    print(f"trial {i + 1}: epochs {len(rows)}; wall {wall:.1f} s; train compute {compute:.1f} s; epoch loops "
          f"{epoch_time:.1f} s; before epoch 1 {first:.1f} s; overhead vs compute {(wall - compute) / wall:.1%}; "
          f"outside the epoch loops {(wall - epoch_time) / wall:.1%}")
