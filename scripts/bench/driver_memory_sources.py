"""Benchmark (diagnosis): where the `raycxr search` driver's per-trial memory goes, by Python allocation site.

Runs a real search (the driver_memory.py one: N one-epoch trials of timm's test_resnet at 32 px on the
bundled sample, 4 logical CPUs) in this process with tracemalloc on, snapshots the driver's Python
heap when 20% and when all of the trials have finished (a Tune callback), and prints the allocation
sites that grew most between the two, with the driver's RSS at both points. Python allocations only:
what grows in Ray's C++ core worker shows as RSS growth the sites do not account for.

Usage: .venv/bin/python scripts/bench/driver_memory_sources.py [TRIALS] [WORK_DIR]
(default 300 trials, /tmp/raycxr-bench-driver-sources)
"""

import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
trials = int(sys.argv[1]) if len(sys.argv) > 1 else 300
work = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/raycxr-bench-driver-sources")
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1",
                  RAYCXR_SALT=os.environ.get("RAYCXR_SALT", "bench"))
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
subprocess.run([str(ROOT / ".venv" / "bin" / "raycxr"), "ingest", "--source",
                f"kermany={ROOT / 'sample' / 'kermany-mini'}", "--out", str(work / "data"), "--image-size", "32"],
               check=True, stdout=subprocess.DEVNULL)
space = work / "space.yaml"
space.write_text(f"trials: {trials}\nmax_epochs: 1\nseed: 0\nscheduler: {{grace_period: 1}}\n"
                 "params: {model: test_resnet, image_size: 32, lr: {loguniform: [1.0e-3, 1.0e-2]}, "
                 "batch_size: [32, 64], augment: [none, light]}\n")

from ray.tune import Callback  # noqa: E402

import raycxr  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Snapshots(Callback):
    def __init__(self):
        self.done, self.taken = 0, {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done in (max(1, trials_total // 5), trials_total):
            self.taken[self.done] = (tracemalloc.take_snapshot(), rss_mb(), len(trials))


trials_total = trials
tracemalloc.start(12)
snaps = Snapshots()
t0 = time.time()
raycxr.search(work / "data", space, name="mem", runs_dir=work / "runs", num_cpus=4, verbosity=0,
              callbacks=[snaps])
(a_n, (a, a_rss, _)), (b_n, (b, b_rss, _)) = sorted(snaps.taken.items())
print(f"{trials} trials in {time.time() - t0:.0f} s, date {time.strftime('%Y-%m-%d')}; driver RSS {a_rss:.0f} MB "
      f"after {a_n} trials, {b_rss:.0f} MB after {b_n}: {100 * (b_rss - a_rss) / (b_n - a_n):+.1f} MB per 100 trials")
stats = b.compare_to(a, "traceback")
grown = sum(s.size_diff for s in stats)
print(f"Python heap (tracemalloc): {100 * grown / 2**20 / (b_n - a_n):+.1f} MB per 100 trials; the largest sites:")
for s in stats[:12]:
    frames = [f for f in s.traceback if "tracemalloc" not in f.filename]
    where = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in frames[-1:-6:-1])
    print(f"  {100 * s.size_diff / 2**20 / (b_n - a_n):+.2f} MB/100 trials ({s.count_diff:+d} blocks): {where}")
