"""Benchmark: memory of the `raycxr search` driver process over many short trials.

A real search (subprocess, fresh local Ray) of N one-epoch trials of timm's test_resnet at 32 px
on the bundled sample, with Optuna TPE + ASHA as usual. Every second: the driver's resident
memory (VmRSS from /proc) and how many trials have finished. Reports the RSS after the first
10% of trials (warm-up: imports, Ray, datasets) and at the end, the least-squares slope in MB
per 100 trials after warm-up, and draws RSS against finished trials to driver_memory.png.

Usage: .venv/bin/python scripts/bench/driver_memory.py [TRIALS] [LOGICAL_CPUS] [WORK_DIR]
(default 200 trials, 4 logical CPUs on the local Ray so that 4 short trials overlap,
/tmp/raycxr-bench-driver-memory)
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
trials = int(sys.argv[1]) if len(sys.argv) > 1 else 200
cpus = int(sys.argv[2]) if len(sys.argv) > 2 else 4
work = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/raycxr-bench-driver-memory")
env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "RAYCXR_SALT": os.environ.get("RAYCXR_SALT", "bench")}
RAYCXR = str(ROOT / ".venv" / "bin" / "raycxr")
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
subprocess.run([RAYCXR, "ingest", "--source", f"kermany={ROOT / 'sample' / 'kermany-mini'}", "--out",
                str(work / "data"), "--image-size", "32"], check=True, env=env, stdout=subprocess.DEVNULL)
space = work / "space.yaml"
space.write_text(f"trials: {trials}\nmax_epochs: 1\nseed: 0\nscheduler: {{grace_period: 1}}\n"
                 "params: {model: test_resnet, image_size: 32, lr: {loguniform: [1.0e-3, 1.0e-2]}, "
                 "batch_size: [32, 64], augment: [none, light]}\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def finished(run: Path) -> int:
    return sum(1 for f in (run / "tune").glob("trial_*/result.json") if f.stat().st_size > 0)


t0 = time.time()
log = open(work / "search.log", "w")
proc = subprocess.Popen([RAYCXR, "search", "--data", str(work / "data"), "--space", str(space), "--name", "mem",
                         "--runs-dir", str(work / "runs"), "--num-cpus", str(cpus)], env=env, stdout=log,
                        stderr=subprocess.STDOUT)
samples = []  # (seconds, finished trials, RSS MB)
while proc.poll() is None:
    try:
        samples.append((time.time() - t0, finished(work / "runs" / "mem"), rss_mb(proc.pid)))
    except (OSError, ValueError):
        pass
    time.sleep(1.0)
assert proc.returncode == 0, f"search failed; see {work / 'search.log'}"

s = np.array([x for x in samples if x[1] > 0 and np.isfinite(x[2])])  # no RSS once the driver has exited
warm = s[s[:, 1] >= max(1, trials // 10)]
slope = np.polyfit(warm[:, 1], warm[:, 2], 1)[0] * 100 if len(np.unique(warm[:, 1])) > 1 else float("nan")
print(f"{trials} trials, {cpus} logical CPUs on {os.cpu_count()} cores, wall {time.time() - t0:.0f} s, "
      f"date {time.strftime('%Y-%m-%d')}")
print(f"driver RSS after {int(warm[0, 1])} trials: {warm[0, 2]:.0f} MB; at the end ({int(s[-1, 1])} trials): "
      f"{s[-1, 2]:.0f} MB; peak {s[:, 2].max():.0f} MB")
print(f"slope after warm-up: {slope:+.1f} MB per 100 trials")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
ax.plot(s[:, 1], s[:, 2], ".", ms=3)
ax.set_xlabel("finished trials")
ax.set_ylabel("driver RSS (MB)")
ax.set_title(f"raycxr search driver memory, {trials} one-epoch trials")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(work / "driver_memory.png")
print(f"plot: {work / 'driver_memory.png'}")
