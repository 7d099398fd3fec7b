"""Benchmark: how much of the driver's memory growth per trial is Optuna's study.

Drives raycxr's Optuna TPE searcher (the `mnist` space, Ray Tune's OptunaSearch as `raycxr
search` builds it) through N simulated trials of 3 reports each, in this process, without Ray
or training, and prints this process's resident memory as the trials accumulate. Compare with
scripts/bench/driver_memory.py, which measures the whole driver of a real search.

Usage: .venv/bin/python scripts/bench/optuna_memory.py [TRIALS]   (default 600)
"""

import gc
import os
import random
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from raycxr.config import load_space  # noqa: E402
from raycxr.samplers import sampler  # noqa: E402
from raycxr.search import _tune_space  # noqa: E402

trials = int(sys.argv[1]) if len(sys.argv) > 1 else 600


def rss_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


searcher = OptunaSearch(space=_tune_space(load_space("mnist")), metric="val_auc", mode="max",
                        sampler=sampler("tpe", seed=0, trials=trials))
rng = random.Random(0)
marks = {}
for i in range(1, trials + 1):
    searcher.suggest(f"t{i}")
    for epoch in range(1, 4):
        searcher.on_trial_result(f"t{i}", {"val_auc": rng.random(), "training_iteration": epoch})
    searcher.on_trial_complete(f"t{i}", {"val_auc": rng.random(), "training_iteration": 3})
    if i % 100 == 0:
        gc.collect()
        marks[i] = rss_mb()
print("trials -> RSS MB:", {k: round(v, 1) for k, v in marks.items()})
print(f"growth after trial 100: {(marks[max(marks)] - marks[100]) / ((max(marks) - 100) / 100):.2f} MB per 100 trials")
