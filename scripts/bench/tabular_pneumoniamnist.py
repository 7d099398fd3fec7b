"""Benchmark: raycxr's searcher and scheduler configurations replayed on a table of real PneumoniaMNIST runs.

`record` trains a grid of 64 configurations (scripts/bench/spaces/pneumoniamnist_grid.yaml: 2 models x
4 learning rates x augmentation x weight EMA x mixup, 8 epochs each) once, with a real
`raycxr search --searcher grid` on ../shared/data/pneumoniamnist (train+val ingested at 28 px, the
project's patient-disjoint splits), and writes each trial's per-epoch validation AUC, validation
log-loss and epoch wall time (Tune's time_this_iter_s: training, validation, checkpoint; the first
epoch also builds the model) to a table (JSON).

`replay` runs every arm of scripts/bench/lcbench_searchers.py (raycxr's own `raycxr.samplers.sampler` settings and
Ray Tune's ASHA rule, grace period 1 epoch, reduction factor 2) on that table, on a simulated clock
(the recorded epoch times; 2 and 8 asynchronous workers), for two objectives: "auc" (1 - the best
validation AUC so far: what raycxr ranks trials by) and "loss" (validation log-loss). The searchers
see the space a user would write (learning rate log-uniform over the grid's range, snapped to the
nearest recorded rate; the rest categorical). Budget: the time the workers need for --budget-runs
full-length runs of the table's average configuration. Regret: the incumbent minus the table's best
value at any epoch of any configuration (exact: the table is the whole space).

Usage: python scripts/bench/tabular_pneumoniamnist.py record [--work DIR] [--table FILE]
       python scripts/bench/tabular_pneumoniamnist.py replay [--table FILE] [--seeds 20] [--workers 2 8]
              [--budget-runs 32] [--arms A ...] [--jobs 2] [--out DIR]
Prints the tables BENCHMARKS.md quotes; replay writes tabular_searchers.json and tabular_regret.png to
--out (default: $OUT or the current folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lcbench_searchers import analyse, plot, replay, tables  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
SPACE = Path(__file__).resolve().parent / "spaces" / "pneumoniamnist_grid.yaml"
TABLE = ROOT / "docs" / "bench" / "pneumoniamnist_table.json"
ARMS = ("random", "random+asha", "tpe", "tpe+asha(ray)", "tpe+asha", "hyperband", "gp", "cmaes", "cmaes+asha")
OBJECTIVES = ("auc", "loss")
KEYS = ("model", "lr", "augment", "ema_decay", "mixup")


def record(work: Path, table_path: Path) -> None:
    import raycxr
    from raycxr.runs import run_history

    if not SOURCE.exists():
        sys.exit(f"needs {SOURCE} (the shared data folder beside the checkout)")
    t0 = time.time()
    data = work / "data"
    if not (data / "manifest.json").exists():
        raycxr.ingest({"pneumoniamnist": SOURCE}, data, image_size=28)
    t1 = time.time()
    result = raycxr.search(data, SPACE, searcher="grid", name="grid", runs_dir=work / "runs")
    t2 = time.time()
    history = run_history(result.run)
    rows = []
    for r in history.board:
        df = history.frames.get(r["trial_id"])
        if df is None or len(df) == 0:
            continue
        rows.append({**{k: r[k] for k in KEYS}, "trial_id": r["trial_id"], "epochs": int(df["epoch"].max()),
                     "val_auc": [float(x) for x in df["val_auc"]], "val_loss": [float(x) for x in df["val_loss"]],
                     "epoch_s": [float(x) for x in df["time_this_iter_s"]],
                     "train_compute_s": [float(x) for x in df["train_compute_s"]]})
    table = {"source": "PneumoniaMNIST train+val (../shared/data/pneumoniamnist), ingested at 28 px",
             "space": SPACE.name, "max_epochs": 8, "run": str(result.run), "configs": rows,
             "machine": f"{os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
             "commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(),
             "wall_s": {"ingest": round(t1 - t0), "search": round(t2 - t1)}}
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(json.dumps(table, indent=1))
    print(f"recorded {len(rows)} configurations x up to {table['max_epochs']} epochs in {t2 - t1:.0f} s "
          f"(ingest {t1 - t0:.0f} s) -> {table_path}")
    print(describe(table))


def describe(table: dict) -> str:
    """What the table holds: the spread of the objectives and of the epoch times."""
    rows = table["configs"]
    best_auc = np.array([max(r["val_auc"]) for r in rows])
    best_loss = np.array([min(r["val_loss"]) for r in rows])
    full = np.array([sum(r["epoch_s"]) for r in rows])
    first = np.array([r["epoch_s"][0] for r in rows])
    later = np.array([x for r in rows for x in r["epoch_s"][1:]])
    compute = np.array([x for r in rows for x in r["train_compute_s"]])
    top = sorted(rows, key=lambda r: -max(r["val_auc"]))[:3]
    near = {d: int(np.sum(best_auc >= best_auc.max() - d)) for d in (0.001, 0.01)}
    near_loss = {d: int(np.sum(best_loss <= best_loss.min() + d)) for d in (0.005, 0.02)}
    lines = [f"{len(rows)} configurations; best validation AUC per configuration: min {best_auc.min():.4f}, "
             f"median {np.median(best_auc):.4f}, max {best_auc.max():.4f}; best validation log-loss: min "
             f"{best_loss.min():.4f}, median {np.median(best_loss):.4f}, max {best_loss.max():.4f}",
             f"configurations within 0.001 / 0.01 of the best AUC: {near[0.001]} / {near[0.01]}; within 0.005 / 0.02 "
             f"of the best log-loss: {near_loss[0.005]} / {near_loss[0.02]}; the two best log-losses "
             f"{np.sort(best_loss)[0]:.4f}, {np.sort(best_loss)[1]:.4f}",
             f"epoch wall: first {np.median(first):.1f} s (median), later {np.median(later):.1f} s; training compute "
             f"{np.median(compute):.1f} s per epoch; a full run {np.mean(full):.0f} s on average "
             f"({np.min(full):.0f}-{np.max(full):.0f})",
             "best three by validation AUC: " + "; ".join(
                 f"{r['model']} lr {r['lr']:g} aug {r['augment']} ema {r['ema_decay']:g} mixup {r['mixup']:g}: "
                 f"{max(r['val_auc']):.4f} (epoch {int(np.argmax(r['val_auc'])) + 1})" for r in top)]
    return "\n".join(lines)


class Table:
    """The recorded grid as the searchers see it: a space, and a configuration's curves."""

    def __init__(self, table: dict):
        self.rows = table["configs"]
        self.max_epochs = table["max_epochs"]
        self.lrs = sorted({r["lr"] for r in self.rows})
        self.by_key = {tuple(r[k] for k in KEYS): r for r in self.rows}
        missing = [r for r in self.rows if r["epochs"] < self.max_epochs]
        if missing:
            raise SystemExit(f"{len(missing)} configurations of the table have fewer than {self.max_epochs} epochs")

    def space(self) -> dict:
        import optuna.distributions as d

        def choices(k):
            return d.CategoricalDistribution(sorted({r[k] for r in self.rows}))

        lo, hi = math.log(self.lrs[0]), math.log(self.lrs[-1])
        half = (hi - lo) / (len(self.lrs) - 1) / 2  # half a step between recorded rates, in log space
        return {"model": choices("model"), "augment": choices("augment"), "ema_decay": choices("ema_decay"),
                "mixup": choices("mixup"), "lr": d.FloatDistribution(math.exp(lo - half), math.exp(hi + half), log=True)}

    def curves(self, params: dict, objective: str) -> tuple[np.ndarray, np.ndarray]:
        lr = min(self.lrs, key=lambda x: abs(math.log(x) - math.log(params["lr"])))
        r = self.by_key[tuple(lr if k == "lr" else params[k] for k in KEYS)]
        values = 1.0 - np.asarray(r["val_auc"]) if objective == "auc" else np.asarray(r["val_loss"])
        return np.asarray(r["epoch_s"]), values

    def best(self, objective: str) -> float:
        return float(min(self.curves(r, objective)[1].min() for r in self.rows))

    def mean_full_run_s(self) -> float:
        return float(np.mean([sum(r["epoch_s"]) for r in self.rows]))


@functools.lru_cache(maxsize=None)
def _table(path: str) -> Table:
    """The table, read once per worker process (not once per search)."""
    return Table(json.loads(Path(path).read_text()))


def _job(args):
    table_path, objective, arm, seed, workers, budget_s, grid, budget_runs = args
    table = _table(table_path)
    t0 = time.perf_counter()
    out = replay(arm, seed, workers, budget_s, np.asarray(grid), lambda p: table.curves(p, objective), table.space(),
                 max_epochs=table.max_epochs, budget_runs=budget_runs)
    return {**out, "task": objective, "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="train the grid once and write the table")
    r.add_argument("--work", type=Path, default=Path("/tmp/raycxr-bench-tabular"))
    r.add_argument("--table", type=Path, default=TABLE)
    p = sub.add_parser("replay", help="replay the searchers on the table")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    p.add_argument("--budget-runs", type=int, default=32)
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--grid", type=int, default=60)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args()
    if a.command == "record":
        record(a.work, a.table)
        return
    t0 = time.time()
    doc = json.loads(a.table.read_text())
    table = Table(doc)
    print(describe(doc))
    mean_full = table.mean_full_run_s()
    refs = {o: table.best(o) for o in a.objectives}
    grid_fraction = np.linspace(0, 1, a.grid + 1)[1:]
    jobs = []
    for w in a.workers:
        budget_s = a.budget_runs * mean_full / w
        jobs += [(str(a.table), o, arm, seed, w, budget_s, list(grid_fraction * budget_s), a.budget_runs)
                 for o in a.objectives for arm in a.arms for seed in range(a.seeds)]
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(_job, jobs, chunksize=4))
    summary = analyse(results, a.objectives, a.arms, a.workers, refs, grid_fraction)
    a.out.mkdir(parents=True, exist_ok=True)
    plot(summary, a.objectives, a.arms, a.workers, grid_fraction, a.out / "tabular_regret.png",
         ylabel="regret", title="PneumoniaMNIST table, {task}, {w} workers")
    print(f"PneumoniaMNIST table ({len(table.rows)} configurations x {table.max_epochs} epochs, recorded "
          f"{doc['date']} at {doc['commit']}), objectives {a.objectives} x {a.seeds} seeds x {len(a.arms)} arms x "
          f"workers {a.workers}; budget {a.budget_runs} full-length runs ({mean_full:.0f} s each on average); "
          f"{len(results)} searches in {time.time() - t0:.0f} s")
    out = {"tasks": a.objectives, "arms": a.arms, "workers": a.workers, "seeds": a.seeds,
           "budget_runs": a.budget_runs, "reference_best": refs, "mean_full_run_s": mean_full,
           "summary": {f"{w}|{t}|{arm}": v for (w, t, arm), v in summary.items()}}
    (a.out / "tabular_searchers.json").write_text(json.dumps(out, indent=1))
    print(tables(out).replace("per task", "per objective"))


if __name__ == "__main__":
    main()
