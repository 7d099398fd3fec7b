"""The search's Ray Tune callbacks: a resumed trial keeps its history (:class:`KeepTrialHistory`),
and a line per trial on the console (:class:`ProgressLines`). Run-signing's callback is in
:mod:`raycxr.signing`, MLflow's in :mod:`raycxr.tracking`."""

from __future__ import annotations

import logging
from pathlib import Path

from ray.tune.callback import Callback

log = logging.getLogger("raycxr.search")  # the search's own lines, under the search's name


class KeepTrialHistory(Callback):
    """A Tune callback: a trial continued by ``--resume`` keeps the results it reported before.

    Tune writes each trial's result.json and progress.csv in a staging folder of the Ray session
    and copies that folder over the run's storage; it fetches the old files first only for trials
    that Tune itself checkpointed, which a Ray Train trial never is. On a fresh Ray (a killed driver
    that owned its Ray) the staging folder starts empty, so without this the resumed trial's
    history would be replaced by an empty file. Runs before Tune's own loggers (user callbacks come
    first) and fetches only files the staging folder lacks.
    """

    def on_trial_start(self, iteration, trials, trial, **info):
        import pyarrow.fs

        trial.init_local_path()
        for name in ("result.json", "progress.csv"):
            local = Path(trial.local_path) / name
            if local.exists():
                continue  # this session has been logging the trial already
            try:
                pyarrow.fs.copy_files(f"{trial.storage.trial_fs_path}/{name}", str(local),
                                      source_filesystem=trial.storage.storage_filesystem)
            except FileNotFoundError:
                pass  # a new trial


class ProgressLines(Callback):
    """A Tune callback: one log line when a trial starts and one when it ends (its best validation
    AUC, the search's best so far, how many are done), in place of Tune's own tables (``-v`` brings
    those back). Through raycxr's logger: the console shows it, ``-q`` and the Python API do not."""

    def __init__(self, trials: int, *, metric: str):
        self.trials, self.best, self.metric = trials, None, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial.config
        log.info("trial %s started: %s @ %s px, lr %.2g", trial.trial_id, cfg.get("model"), cfg.get("image_size"),
                 cfg.get("lr", float("nan")))

    def _ended(self, trials, trial, how: str) -> None:
        score = (trial.last_result or {}).get(self.metric)
        if score is not None and (self.best is None or score > self.best[0]):
            self.best = (score, trial.trial_id)
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        best = f"; best so far {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        what = self.metric.removesuffix("_best")
        mine = f"{what} {score:.4f}" if score is not None else f"no {what}"
        log.info("trial %s %s: %s%s [%d/%d trials done]", trial.trial_id, how, mine, best, min(done, self.trials),
                 self.trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trials, trial, "failed")
