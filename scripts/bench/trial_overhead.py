"""Benchmark: per-trial and per-search overhead of raycxr's search on a CPU, measured from the driver.

Two arms, each a fresh `raycxr search` process (its own local Ray) over the same space, one after
the other on an otherwise idle machine:
  tune       one-worker trials trained in Tune's own, reused trial processes (the default)
  ray-train  every trial a Ray Train TorchTrainer (resources.trainer: ray-train), the shape
             raycxr used before: a controller and a worker process per trial

Per trial, from the driver's clock (a Tune callback in the search process: trial start as the
driver schedules it, to the driver receiving its last report):
  wall       last report - start
  compute    the trial's summed train_compute_s (forward, backward, optimiser step)
  overhead   (wall - compute) / wall: start-up, data waits, augmentation, validation, checkpoints
First trial and later trials are reported separately (a later trial may find a warm process).
Per search: command wall (process start to exit, as a user runs it) x concurrent slots against the
summed compute of its trials.

Usage: .venv/bin/python scripts/bench/trial_overhead.py [--trials 4] [--epochs 3] [--model resnet18]
       [--image-size 128] [--arms tune,ray-train] [--out results.json]
Prints a Markdown table per arm and the ratio of the arms; --from-json prints it again from a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _arm(args) -> None:
    """One search in this process (run by the parent as a subprocess): writes per-trial timings."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from ray.tune import Callback

    from raycxr.search import SearchConfig, run_search

    class Clock(Callback):
        def __init__(self):
            self.trials = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.trials.setdefault(trial.trial_id, {"start": time.time(), "reports": []})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("reported_again"):
                self.trials[trial.trial_id]["reports"].append(
                    {"t": time.time(), "epoch": result.get("epoch"), "compute": result.get("train_compute_s"),
                     "epoch_s": result.get("train_time_s"), "val_s": result.get("val_time_s"),
                     "ckpt_s": result.get("checkpoint_write_s")})

    clock = Clock()
    work = Path(args.work)
    trainer = "ray-train" if args.arm == "ray-train" else "auto"
    space = work / f"space-{args.arm}.yaml"
    space.write_text(f"trials: {args.trials}\nmax_epochs: {args.epochs}\nseed: 0\n"
                     f"resources: {{workers_per_trial: 1, cpus_per_worker: 2, trainer: {trainer}}}\n"
                     f"params: {{model: {args.model}, image_size: {args.image_size}, lr: {{loguniform: [1.0e-3, 3.0e-3]}},"
                     " batch_size: 32, augment: light}\n")
    run_search(SearchConfig(data=work / "data", space=str(space), name=args.arm, runs_dir=work / "runs",
                            callbacks=(clock,)))
    (work / f"{args.arm}.json").write_text(json.dumps(clock.trials))


def _summary(arm: str, trials: dict, command_wall: float, slots: int) -> dict:
    rows = []
    for tid, t in sorted(trials.items(), key=lambda kv: kv[1]["start"]):
        reps = t["reports"]
        wall = reps[-1]["t"] - t["start"]
        compute = sum(r["compute"] for r in reps)
        rows.append({"trial": tid, "epochs": len(reps), "wall": wall, "compute": compute,
                     "before_first_report": reps[0]["t"] - t["start"] - reps[0]["epoch_s"],
                     "epoch_loops": sum(r["epoch_s"] for r in reps), "validation": sum(r["val_s"] or 0 for r in reps),
                     "checkpoints": sum(r["ckpt_s"] or 0 for r in reps), "overhead": (wall - compute) / wall})
    total_compute = sum(r["compute"] for r in rows)
    return {"arm": arm, "trials": rows, "command_wall": command_wall, "slots": slots,
            "search_overhead": (command_wall * slots - total_compute) / (command_wall * slots)}


def _print(results: list[dict]) -> None:
    for res in results:
        print(f"\n### {res['arm']}: command wall {res['command_wall']:.1f} s x {res['slots']} slot(s); "
              f"search overhead (slots x wall - compute) / (slots x wall) = {res['search_overhead']:.1%}\n")
        print("| trial | epochs | wall s | compute s | before 1st report s | epoch loops s | validation s | "
              "checkpoints s | overhead |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for i, r in enumerate(res["trials"], 1):
            print(f"| {i} | {r['epochs']} | {r['wall']:.1f} | {r['compute']:.1f} | {r['before_first_report']:.1f} | "
                  f"{r['epoch_loops']:.1f} | {r['validation']:.2f} | {r['checkpoints']:.2f} | {r['overhead']:.1%} |")
        later = res["trials"][1:]
        if later:
            wall, comp = sum(r["wall"] for r in later), sum(r["compute"] for r in later)
            print(f"\nfirst trial overhead {res['trials'][0]['overhead']:.1%}; later trials (pooled) "
                  f"{(wall - comp) / wall:.1%}")
    if len(results) == 2:
        a, b = results
        print(f"\n{a['arm']} / {b['arm']}: command wall {a['command_wall'] / b['command_wall']:.2f}x; mean trial wall "
              f"{_mean(a, 'wall') / _mean(b, 'wall'):.2f}x; mean trial compute {_mean(a, 'compute') / _mean(b, 'compute'):.2f}x")


def _mean(res: dict, key: str) -> float:
    return sum(r[key] for r in res["trials"]) / len(res["trials"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--arms", default="tune,ray-train")
    p.add_argument("--out", type=Path)
    p.add_argument("--from-json", type=Path)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        return _arm(args)
    if args.from_json:
        return _print(json.loads(args.from_json.read_text())["results"])

    work = Path(tempfile.mkdtemp(prefix="raycxr-overhead-"))
    env = {**os.environ, "RAYCXR_SALT": "bench", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([sys.executable, "-m", "raycxr.cli", "ingest", "--source", f"kermany={ROOT / 'sample/kermany-mini'}",
                    "--out", str(work / "data"), "--image-size", str(args.image_size)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    results = []
    for arm in args.arms.split(","):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--arm", arm, "--work", str(work), "--trials", str(args.trials),
                        "--epochs", str(args.epochs), "--model", args.model, "--image-size", str(args.image_size)],
                       check=True, env=env, stdout=open(work / f"{arm}.log", "w"), stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
        run = json.loads((work / "runs" / arm / "run.json").read_text())
        results.append(_summary(arm, json.loads((work / f"{arm}.json").read_text()), wall,
                                run["resources"]["concurrent"]))
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores", "argv": sys.argv[1:],
           "results": results}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    print(f"{doc['date']}, {doc['machine']}, {args.trials} trials x {args.epochs} epochs of {args.model} at "
          f"{args.image_size} px on the bundled sample, 1 worker x 2 CPUs, one trial at a time")
    _print(results)


if __name__ == "__main__":
    main()
