"""Benchmark: Optuna TPE + ASHA against random search without early stopping.

Same space (search_spaces/mnist.yaml), same data (PneumoniaMNIST train/val from ../shared,
ingested once at 28 px), same wall budget per search, several seeds; every search is a real
`raycxr search` on a fresh local Ray. From each trial's reports: the best validation AUC seen
so far against wall time since the command started. Reports, per seed, random search's final
best and the time TPE+ASHA needed to reach it (as a fraction of the budget; target <= 1/3),
and draws both curves to search_efficiency.png in the work folder.

Usage: .venv/bin/python scripts/bench/search_efficiency.py [MINUTES_PER_SEARCH] [SEEDS] [WORK_DIR]
(default 5 minutes, seeds 0,1,2, /tmp/raycxr-bench-efficiency)
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RAYCXR = str(ROOT / ".venv" / "bin" / "raycxr")
minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
seeds = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "0,1,2").split(",")]
work = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/raycxr-bench-efficiency")
src = ROOT.parent / "shared/data/pneumoniamnist/pneumoniamnist_trainval.npz"
if not src.is_file():
    sys.exit(f"needs {src} (the shared data folder beside the checkout)")
env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "RAYCXR_SALT": os.environ.get("RAYCXR_SALT", "bench")}
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
subprocess.run([RAYCXR, "ingest", "--source", f"pneumoniamnist={src}", "--out", str(work / "data"),
                "--image-size", "28"], check=True, env=env, stdout=subprocess.DEVNULL)
base = yaml.safe_load((ROOT / "search_spaces" / "mnist.yaml").read_text())
METHODS = {"tpe+asha": [], "random": ["--searcher", "random", "--no-early-stopping"]}


def curve(run: Path, t0: float) -> list[tuple[float, float]]:
    """(seconds since the command started, best val AUC so far) at every report."""
    points = []
    for f in (run / "tune").glob("trial_*/result.json"):
        for line in f.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("val_auc") is not None and r["val_auc"] == r["val_auc"]:
                points.append((r["timestamp"] - t0, r["val_auc"]))
    best, out = 0.0, []
    for t, auc in sorted(points):
        best = max(best, auc)
        out.append((t, best))
    return out


results = {}
for seed in seeds:
    space = work / f"space-{seed}.yaml"
    space.write_text(yaml.safe_dump({**base, "seed": seed}))
    for method, flags in METHODS.items():
        name = f"{method.replace('+', '-')}-s{seed}"
        t0 = time.time()
        with open(work / f"{name}.log", "w") as log:
            subprocess.run([RAYCXR, "search", "--data", str(work / "data"), "--space", str(space), "--name", name,
                            "--runs-dir", str(work / "runs"), "--time-budget", str(minutes), *flags],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        run = work / "runs" / name
        r = results[(seed, method)] = {"curve": curve(run, t0), "wall": time.time() - t0,
                                       "trials": len(list((run / "tune").glob("trial_*/result.json")))}
        print(f"seed {seed} {method:9s}: {r['trials']} trials, best val AUC {r['curve'][-1][1]:.4f}, "
              f"wall {r['wall']:.0f} s", flush=True)

budget = minutes * 60
print(f"\nbudget {budget:.0f} s per search; machine: {os.cpu_count()} cores; date {time.strftime('%Y-%m-%d')}")
print("seed | random: final best | TPE+ASHA: final best | TPE+ASHA reached random's final best at | fraction")
fractions = []
for seed in seeds:
    rnd, tpe = results[(seed, "random")]["curve"], results[(seed, "tpe+asha")]["curve"]
    target = rnd[-1][1]
    hit = next((t for t, b in tpe if b >= target), None)
    frac = hit / budget if hit is not None else float("inf")
    fractions.append(frac)
    print(f"{seed} | {target:.4f} | {tpe[-1][1]:.4f} | {'never' if hit is None else f'{hit:.0f} s'} | {frac:.2f}")
fractions.sort()
print(f"median fraction of the budget: {fractions[len(fractions) // 2]:.2f} (target <= 0.33)")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
for (seed, method), r in sorted(results.items()):
    t, b = zip(*r["curve"]) if r["curve"] else ((), ())
    ax.step([x / 60 for x in t], b, where="post", color="C0" if method == "tpe+asha" else "C1", alpha=0.8,
            label=method if seed == seeds[0] else None)
ax.set_xlabel("wall time since the search command started (min)")
ax.set_ylabel("best validation AUC so far")
ax.set_title(f"PneumoniaMNIST 28 px, {len(seeds)} seeds, {minutes:g} min per search, 2 CPU cores")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(work / "search_efficiency.png")
print(f"plot: {work / 'search_efficiency.png'}")
