"""Benchmark: raycxr's searcher and scheduler configurations on the LCBench surrogate, simulated clock.

The surrogate (YAHPO Gym v1.0.2's LCBench ONNX model, ../shared/data/lcbench) predicts, for an MLP's
7 hyperparameters on an OpenML task, the per-epoch validation cross-entropy and the cumulative
training time at epochs 1-52. Each search here is what `raycxr search` runs, on a simulated clock:
W asynchronous workers; a trial runs epoch by epoch for the surrogate's time; the scheduler sees
every epoch; the searcher (raycxr's own `raycxr.samplers.sampler` and the study protocol of `StudySearch`, or
Ray's as it was) chooses the next configuration when a worker frees. The budget is the simulated
time W workers need for 100 full-length (52-epoch) runs of the task's average configuration. The
score at any time is the best validation cross-entropy reported so far by any trial at any epoch
(raycxr ranks a trial by its best epoch); regret is that minus the best value seen for the task
in every run of every arm (and a random probe of 5,000 configurations at every epoch).

Arms (ASHA: raycxr's defaults, grace period 1 epoch, reduction factor 2, max 52 epochs):
  random          random search, every trial to 52 epochs
  random+asha     random search, ASHA
  tpe             TPE, every trial to 52 epochs
  tpe+asha(ray)   TPE + ASHA as Ray reported it before issue 14: ASHA and the study see each trial's
                  last epoch; a stopped trial is told COMPLETE with that early epoch's value
  tpe+asha        TPE + ASHA as raycxr now runs it: running best; stopped trials PRUNED with
                  their per-epoch values
  hyperband       random search with asynchronous HyperBand (ASHA with 3 brackets: grace 1, 2, 4)
  gp+asha         Optuna's GPSampler, ASHA, stopped trials pruned
  cmaes+asha      Optuna's CmaEsSampler, ASHA, stopped trials pruned

Usage: python scripts/bench/lcbench_searchers.py [--seeds 20] [--workers 2 8] [--tasks T ...]
         [--arms A ...] [--jobs 2] [--out DIR]   |   --from-json DIR/lcbench_searchers.json
Prints the tables BENCHMARKS.md quotes and writes lcbench_searchers.json and lcbench_regret.png
to --out (default: $OUT or the current folder). The figures are on the simulated clock: another
job on the machine changes how long the command takes, not what it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "lcbench"
TASKS = ("3945", "7593", "34539", "126025", "126026")
ARMS = ("random", "random+asha", "tpe", "tpe+asha(ray)", "tpe+asha", "hyperband", "gp+asha", "cmaes+asha")
MAX_EPOCHS, GRACE, RF, BUDGET_RUNS = 52, 1, 2, 100
# cont_names order of YAHPO's LCBench model; x_cont holds raw values (the model transforms them)
CONT = ("epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units", "max_dropout")


class Surrogate:
    def __init__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(DATA / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.encoding = json.loads((DATA / "encoding.json").read_text())["OpenML_task_id"]

    def curves(self, task: str, configs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(epoch durations, validation cross-entropy), each (len(configs), 52)."""
        epochs = np.arange(1, MAX_EPOCHS + 1, dtype=np.float32)
        rows = [[e] + [c[k] for k in CONT[1:]] for c in configs for e in epochs]
        x_cont = np.asarray(rows, dtype=np.float32)
        x_cat = np.full((len(rows), 1), self.encoding[task], dtype=np.int32)
        y = self.session.run(None, {"x_cat": x_cat, "x_cont": x_cont})[0].reshape(len(configs), MAX_EPOCHS, -1)
        total = np.maximum.accumulate(np.maximum(y[:, :, 0], 1e-3), axis=1)  # cumulative time, never decreasing
        durations = np.diff(np.concatenate([np.zeros((len(configs), 1)), total], axis=1), axis=1)
        return np.maximum(durations, 1e-3), y[:, :, 2]


def space():
    import optuna.distributions as d

    return {"batch_size": d.IntDistribution(16, 512, log=True), "learning_rate": d.FloatDistribution(1e-4, 1e-1, log=True),
            "momentum": d.FloatDistribution(0.1, 0.99), "weight_decay": d.FloatDistribution(1e-5, 0.1),
            "num_layers": d.IntDistribution(1, 5), "max_units": d.IntDistribution(64, 1024, log=True),
            "max_dropout": d.FloatDistribution(0.0, 1.0)}


class Asha:
    """Ray Tune's ASHAScheduler rule (one or more brackets), for minimisation: at each milestone a
    trial stops if its value is worse than the 1/rf quantile of the values recorded there before."""

    def __init__(self, brackets: int = 1, max_epochs: int = MAX_EPOCHS, grace: int = GRACE, rf: int = RF):
        self.brackets, self.rf = [], rf
        for s in range(brackets):
            rungs = []
            m = grace * rf ** s
            while m < max_epochs:
                rungs.append(m)
                m *= rf
            self.brackets.append({r: [] for r in rungs})
        self.of_trial = {}

    def stop(self, trial: int, epoch: int, value: float) -> bool:
        rungs = self.brackets[self.of_trial.setdefault(trial, trial % len(self.brackets))]
        if epoch not in rungs:
            return False
        recorded = rungs[epoch]
        cutoff = float(np.nanpercentile(recorded, 100 / self.rf)) if recorded else None
        recorded.append(value)
        return cutoff is not None and value > cutoff


ARM_SETTINGS = {  # sampler, scheduler brackets (0: none), protocol ("raycxr" or "ray")
    "random": ("random", 0, "raycxr"), "random+asha": ("random", 1, "raycxr"), "tpe": ("tpe", 0, "raycxr"),
    "tpe+asha(ray)": ("tpe", 1, "ray"), "tpe+asha": ("tpe", 1, "raycxr"), "hyperband": ("random", 3, "raycxr"),
    "gp+asha": ("gp", 1, "raycxr"), "cmaes+asha": ("cmaes", 1, "raycxr"), "gp": ("gp", 0, "raycxr"),
    "cmaes": ("cmaes", 0, "raycxr"),
}


def replay(arm: str, seed: int, workers: int, budget_s: float, grid: np.ndarray, curves, dist: dict, *,
           max_epochs: int, budget_runs: int) -> dict:
    """One search on the simulated clock, minimising: ``curves(params)`` gives a configuration's
    (epoch durations, values), each of length ``max_epochs``; ``dist`` is the Optuna space. Returns the
    incumbent (the best value any trial reported at any epoch) at each ``grid`` time, and counts."""
    import optuna
    from optuna.trial import TrialState

    from raycxr.samplers import sampler

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    name, brackets, protocol = ARM_SETTINGS[arm]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(sampler=sampler(name, seed=seed, trials=budget_runs), direction="minimize")
    scheduler = Asha(brackets, max_epochs) if brackets else None
    events = []  # (time, worker, trial index, epoch index)
    trials, incumbent_at = [], []  # incumbent_at: (time, value) whenever the incumbent improves
    best = math.inf
    epochs_run = 0

    def start(worker: int, now: float):
        t = study.ask(dist)
        durations, values = curves(t.params)
        trials.append({"trial": t, "durations": durations, "values": values, "best": math.inf})
        events.append((now + durations[0], worker, len(trials) - 1, 0))

    for w in range(workers):
        start(w, 0.0)
    while events:
        events.sort()
        now, worker, i, e = events.pop(0)
        if now > budget_s:
            break
        tr = trials[i]
        value = float(tr["values"][e])
        epochs_run += 1
        tr["best"] = min(tr["best"], value)
        if value < best:
            best = value
            incumbent_at.append((now, best))
        reported = tr["best"] if protocol == "raycxr" else value  # running best, or the last epoch as Ray had it
        tr["trial"].report(reported, e + 1)
        stopped = scheduler is not None and scheduler.stop(i, e + 1, reported)
        if e + 1 == max_epochs or stopped:
            if e + 1 == max_epochs or protocol == "ray":
                study.tell(tr["trial"], reported)  # Ray told a stopped trial COMPLETE with its last value
            else:
                study.tell(tr["trial"], state=TrialState.PRUNED)
            start(worker, now)
        else:
            events.append((now + tr["durations"][e + 1], worker, i, e + 1))
    times = np.array([t for t, _ in incumbent_at])
    values = np.array([v for _, v in incumbent_at])
    curve = [float(values[times <= g][-1]) if (times <= g).any() else math.inf for g in grid]
    return {"arm": arm, "seed": seed, "workers": workers, "curve": curve, "final": curve[-1],
            "trials": len(trials), "epochs": epochs_run}


def simulate(task: str, arm: str, seed: int, workers: int, budget_s: float, grid: np.ndarray,
             surrogate: Surrogate) -> dict:
    """One search of an LCBench task on the simulated clock (:func:`replay` on the surrogate)."""
    def curves(params):
        durations, ce = surrogate.curves(task, [params])
        return durations[0], ce[0]

    return {"task": task, **replay(arm, seed, workers, budget_s, grid, curves, space(), max_epochs=MAX_EPOCHS,
                                   budget_runs=BUDGET_RUNS)}


def _job(args):
    task, arm, seed, workers, budget_s, grid = args
    global _SURROGATE
    if "_SURROGATE" not in globals():
        _SURROGATE = Surrogate()
    t0 = time.perf_counter()
    out = simulate(task, arm, seed, workers, budget_s, np.asarray(grid), _SURROGATE)
    out["seconds"] = time.perf_counter() - t0
    return out


def probe(surrogate: Surrogate, task: str, n: int = 5000) -> tuple[float, float]:
    """(mean time of a full 52-epoch run, best validation cross-entropy) over n random configurations."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    configs = [study.ask(space()).params for _ in range(n)]
    durations, ce = [], []
    for i in range(0, n, 250):
        d, c = surrogate.curves(task, configs[i:i + 250])
        durations.append(d.sum(axis=1))
        ce.append(c.min(axis=1))
    return float(np.mean(np.concatenate(durations))), float(np.min(np.concatenate(ce)))


def analyse(results: list[dict], tasks, arms, workers_list, refs: dict, grid_fraction: np.ndarray) -> dict:
    from scipy.stats import wilcoxon

    summary = {}
    for w in workers_list:
        for task in tasks:
            opt = min([refs[task]] + [r["final"] for r in results if r["task"] == task])
            per_arm = {}
            for arm in arms:
                runs = sorted((r for r in results if (r["task"], r["arm"], r["workers"]) == (task, arm, w)),
                              key=lambda r: r["seed"])
                if not runs:
                    continue
                regret = np.array([r["curve"] for r in runs]) - opt
                per_arm[arm] = {"seeds": [r["seed"] for r in runs], "regret": regret,
                                "final": np.array([r["final"] for r in runs]),
                                "trials": float(np.mean([r["trials"] for r in runs]))}
            if "random" not in per_arm:
                continue
            target = float(np.median(per_arm["random"]["final"]))
            finals = {a: v["final"] for a, v in per_arm.items()}
            n = min(len(v) for v in finals.values())
            ranks = np.argsort(np.argsort(np.array([finals[a][:n] for a in per_arm]), axis=0), axis=0) + 1
            for k, (arm, v) in enumerate(per_arm.items()):
                med = np.median(v["regret"], axis=0)
                reach = np.flatnonzero(med + opt <= target)
                p = float("nan")
                if arm != "random":
                    diff = finals[arm][:n] - finals["random"][:n]
                    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
                summary[(w, task, arm)] = {
                    "median_final_regret": float(np.median(v["regret"][:, -1])),
                    "iqr_final_regret": [float(x) for x in np.percentile(v["regret"][:, -1], [25, 75])],
                    "time_to_random_final_median": float(grid_fraction[reach[0]]) if len(reach) else None,
                    "mean_rank": float(ranks[k].mean()), "wilcoxon_p_vs_random": p,
                    "better_than_random_seeds": int(np.sum(finals[arm][:n] < finals["random"][:n])),
                    "trials_per_search": v["trials"],
                    "median_regret_curve": [float(x) for x in med],
                    "q25_curve": [float(x) for x in np.percentile(v["regret"], 25, axis=0)],
                    "q75_curve": [float(x) for x in np.percentile(v["regret"], 75, axis=0)]}
    return summary


def plot(summary: dict, tasks, arms, workers_list, grid_fraction, path: Path, *, ylabel="regret (val. cross-entropy)",
         title="task {task}, {w} workers"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(workers_list), len(tasks), figsize=(4 * len(tasks), 3.4 * len(workers_list)),
                             squeeze=False)
    colours = dict(zip(arms, plt.cm.tab10.colors))
    for row, w in enumerate(workers_list):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            for arm in arms:
                s = summary.get((w, task, arm))
                if not s:
                    continue
                med = np.maximum(np.array(s["median_regret_curve"]), 1e-4)
                ax.plot(grid_fraction, med, label=arm, color=colours[arm], lw=1.6 if "tpe" in arm else 1.0)
                ax.fill_between(grid_fraction, np.maximum(s["q25_curve"], 1e-4), np.maximum(s["q75_curve"], 1e-4),
                                color=colours[arm], alpha=0.08)
            ax.set_yscale("log")
            ax.set_title(title.format(task=task, w=w), fontsize=9)
            ax.set_xlabel("fraction of the budget (simulated time)")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.axvline(1 / 3, color="grey", lw=0.6, ls=":")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--grid", type=int, default=60)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--from-json", type=Path, help="print the tables of an earlier run's lcbench_searchers.json")
    a = ap.parse_args()
    if a.from_json:
        print(tables(json.loads(a.from_json.read_text())))
        return
    t0 = time.time()
    surrogate = Surrogate()
    refs, mean_full = {}, {}
    for task in a.tasks:
        mean_full[task], refs[task] = probe(surrogate, task)
    grid_fraction = np.linspace(0, 1, a.grid + 1)[1:]
    jobs = []
    for w in a.workers:
        for task in a.tasks:
            budget_s = BUDGET_RUNS * mean_full[task] / w
            jobs += [(task, arm, seed, w, budget_s, list(grid_fraction * budget_s))
                     for arm in a.arms for seed in range(a.seeds)]
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(_job, jobs, chunksize=4))
    summary = analyse(results, a.tasks, a.arms, a.workers, refs, grid_fraction)
    a.out.mkdir(parents=True, exist_ok=True)
    plot(summary, a.tasks, a.arms, a.workers, grid_fraction, a.out / "lcbench_regret.png")
    print(f"LCBench surrogate, {len(a.tasks)} tasks x {a.seeds} seeds x {len(a.arms)} arms x workers {a.workers}; "
          f"budget {BUDGET_RUNS} full-length runs; {len(results)} searches in {time.time() - t0:.0f} s "
          f"(median {np.median([r['seconds'] for r in results]):.2f} s each)")
    (a.out / "lcbench_searchers.json").write_text(json.dumps(
        {"tasks": a.tasks, "arms": a.arms, "workers": a.workers, "seeds": a.seeds, "budget_runs": BUDGET_RUNS,
         "reference_best": refs, "mean_full_run_s": mean_full,
         "summary": {f"{w}|{t}|{arm}": v for (w, t, arm), v in summary.items()}}, indent=1))
    print(tables(json.loads((a.out / "lcbench_searchers.json").read_text())))


def tables(d: dict) -> str:
    """The Markdown tables BENCHMARKS.md quotes, from lcbench_searchers.json."""
    lines = []
    for w in d["workers"]:
        lines += [f"\n**{w} workers** (per task: time to random's final median as a fraction of the budget / mean rank "
                  f"among the {len(d['arms'])} arms / median final regret / trials per search):\n",
                  "| arm | " + " | ".join(d["tasks"]) + " | tasks within 1/3 | mean rank |",
                  "| --- |" + " --- |" * (len(d["tasks"]) + 2)]
        for arm in d["arms"]:
            cells, within, ranks = [], 0, []
            for t in d["tasks"]:
                s = d["summary"][f"{w}|{t}|{arm}"]
                r = s["time_to_random_final_median"]
                within += r is not None and r <= 1 / 3
                ranks.append(s["mean_rank"])
                cells.append(f"{'never' if r is None else f'{r:.2f}'} / {s['mean_rank']:.1f} / "
                             f"{s['median_final_regret']:.3g} / {s['trials_per_search']:.0f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + f" | {within}/{len(d['tasks'])} | "
                         f"{sum(ranks) / len(ranks):.2f} |")
        lines += ["", "Paired Wilcoxon over the seeds, final regret against random (two-sided p per task): " + "; ".join(
            f"{arm} " + ", ".join(f"{d['summary'][f'{w}|{t}|{arm}']['wilcoxon_p_vs_random']:.2g}" for t in d["tasks"])
            for arm in d["arms"] if arm != "random")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
