"""Benchmark: per-trial overhead of raycxr's Tune + Train + Ray Data stack on a CPU.

One search with one trial of about a minute of real training (resnet10t on the bundled sample),
on a fresh local Ray. Reports, from the trial's own metrics:
  trial wall time   Tune's time_total_s for the trial (actor start to last report)
  train compute     sum over epochs of forward/backward/step time (train_compute_s)
  epoch time        sum over epochs of train_time_s (compute + waiting for batches + augmentation)
  overhead          (wall - compute) / wall, and (wall - epoch time - eval) / wall

Usage: .venv/bin/python scripts/bench/trial_overhead.py [EPOCHS]
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
work = Path(tempfile.mkdtemp(prefix="raycxr-overhead-"))
ingest(IngestConfig(sources={"kermany": ROOT / "sample" / "kermany-mini"}, out=work / "data", image_size=96))
space = work / "space.yaml"
space.write_text(f"trials: 1\nmax_epochs: {epochs}\nscheduler: {{grace_period: {epochs}}}\n"
                 "resources: {workers_per_trial: 1, cpus_per_worker: 2}\n"
                 "params: {model: resnet10t, image_size: 96, lr: 0.002, batch_size: 32, augment: light}\n")
t0 = time.perf_counter()
run_search(SearchConfig(data=work / "data", space=str(space), name="overhead", runs_dir=work / "runs"))
search_wall = time.perf_counter() - t0

rows = [json.loads(line) for f in (work / "runs" / "overhead" / "tune").glob("trial_*/result.json")
        for line in f.read_text().splitlines() if line.strip()]
wall = rows[-1]["time_total_s"]
compute = sum(r["train_compute_s"] for r in rows)
epoch_time = sum(r["train_time_s"] for r in rows)
print(f"epochs {len(rows)}; search wall {search_wall:.1f} s (incl. ray.init and dataset load)")
print(f"trial wall {wall:.1f} s; train compute {compute:.1f} s; epoch loops {epoch_time:.1f} s")
print(f"overhead vs compute: {(wall - compute) / wall:.1%}; outside the epoch loops: {(wall - epoch_time) / wall:.1%}")
