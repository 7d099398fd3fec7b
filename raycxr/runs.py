"""Reading a run: the one place a run folder is parsed, checked and handed on as typed records.

status, promote, report, evaluate, resume and the benchmarks read a run through this module, never
through the search's write side (:mod:`raycxr.search`) and never through Ray Tune: ``run.json`` is
read by :class:`RunRecord`, each trial's results from its ``result.json`` lines, and Tune's
experiment state as plain JSON (:func:`_tune_trials`), so reading a run copied from a bucket or a
colleague runs no code planted in it. Checkpoint locations stay inside the run's own storage root
(:meth:`raycxr.storage.RunStore.resolve`); the signed files are checked by :mod:`raycxr.signing`
before a resume hands them to Ray.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from raycxr.config import HYPERPARAMETERS
from raycxr.errors import ConfigError, NoEligibleTrialError
from raycxr.storage import RunStore
from raycxr.train import METRIC, SELECTION_METRICS

log = logging.getLogger(__name__)


LEADERBOARD_COLUMNS = ["rank", "trial_id", METRIC, "best_epoch", "epochs", "val_accuracy", "val_loss", "site_auc",
                       "site_loss", "worst_source_auc", "worst_source", "latency_ms", "train_images_per_s",
                       "trained_in", *HYPERPARAMETERS, "status", "tune_status", "resumed_from_epoch", "checkpoint"]


class RunStarting(ConfigError):
    """run.json holds only the claim of a search that has not written its record yet."""


@dataclass(frozen=True)
class RunRecord:
    """A run's ``run.json``: the resolved search, enough to resume, promote and repeat it.
    This class is the file's only reader and writer."""

    name: str
    space: str
    target: str
    space_config: dict
    data: str
    data_fingerprint: str
    trials: int
    max_epochs: int
    seed: int
    resources: dict
    storage: str
    max_failures: int = 1
    searcher: str = "tpe"
    early_stopping: bool = True
    scheduler: str = "none"
    objective: str = "auc"
    versions: dict = dataclasses.field(default_factory=dict)
    started: str = ""
    metric: str = METRIC
    mlflow: str | None = None   # the MLflow tracking URI the search logs to, if any
    time_budget_min: float | None = None  # --time-budget, for status's "budget left"
    ended: str = ""  # when and how the search last stopped ("" while it runs): status --watch stops there
    sites: list = dataclasses.field(default_factory=list)  # raycxr.sites.Site.to_dict() of each --site
    data_path: str = "auto"  # --data-path: how trials read the train split (raycxr.search.DATA_PATHS)
    schema_version: int = 2

    FILE = "run.json"

    def save(self, store: RunStore) -> None:
        store.write_text(self.FILE, json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")

    @classmethod
    def load(cls, store: RunStore) -> "RunRecord":
        """Read and check ``run.json``: a corrupt or half-written file is named, never a traceback."""
        try:
            raw = json.loads(store.read_text(cls.FILE))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid JSON ({exc}): the file is damaged; restore it from a copy of the run, "
                              "or start the search again", source=store.child(cls.FILE)) from None
        if isinstance(raw, dict) and "claimed" in raw and "data" not in raw:
            raise RunStarting("the search that claimed this name has not written its record yet (it is starting, "
                              "or it failed before it started): wait, or start it again", source=store.child(cls.FILE))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict):
            raise ConfigError("must be a JSON object", source=store.child(cls.FILE))
        problems = [f"{k}: missing" for k, f in fields.items() if k not in raw and
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        types = {"name": str, "space": str, "target": str, "space_config": dict, "data": str,
                 "data_fingerprint": str, "trials": int, "max_epochs": int, "seed": int, "resources": dict,
                 "storage": str}
        problems += [f"{k}: {raw[k]!r:.40} is not {t.__name__}" for k, t in types.items()
                     if k in raw and not isinstance(raw[k], t)]
        if not isinstance(raw.get("sites", []), list):
            problems.append("sites: not a list")
        if problems:
            raise ConfigError(problems, source=store.child(cls.FILE))
        record = cls(**{k: v for k, v in raw.items() if k in fields})
        record.site_records()  # checked here: a damaged entry is named now, not deep in promote
        return record

    def site_records(self) -> list:
        """The run's sites as :class:`raycxr.sites.Site` records."""
        from raycxr.sites import Site

        return [Site.from_dict(s, source=self.FILE) for s in self.sites]

    @property
    def select_metric(self) -> str:
        """The figure that picked each trial's best epoch and ranks the leaderboard."""
        return SELECTION_METRICS.get(self.objective, METRIC)


def tune_location(run: str | Path) -> tuple[RunStore, str]:
    """(where the run's files are, where its Tune experiment is): ``tune/`` beside run.json (also for
    a run folder copied or moved since it ran), else under the storage a run.json of raycxr 0.1
    recorded."""
    store = RunStore(run)
    if not store.exists("tune") and store.exists(RunRecord.FILE):
        try:
            storage = RunRecord.load(store).storage
        except RunStarting:
            storage = None
        if storage and storage != store.uri:
            return RunStore(storage), storage.rstrip("/") + "/tune"
    return store, store.child("tune")


def epochs_of(df):
    """A trial's results, one row per epoch: a trial resumed from a checkpoint reports that
    checkpoint's epoch again, and the later row (which names the checkpoint kept) wins."""
    if df is None or "epoch" not in df:
        return df
    return df.drop_duplicates("epoch", keep="last").sort_values("epoch")


@dataclass(frozen=True)
class RunHistory:
    """What a run's trials reported: the leaderboard and each trial's results, one row per epoch."""

    board: list[dict]
    frames: dict  # trial id -> pandas DataFrame


def _tune_trials(store: RunStore) -> list[dict]:
    """A run's Tune trials as plain data: ``trial_id``, ``status``, ``config`` and ``dir`` (the trial's
    folder under ``tune/``), from the newest ``tune/experiment_state-*.json`` read as plain JSON.

    Never through Ray Tune's own reader (``ExperimentAnalysis``), which unpickles objects the file
    holds: a run folder copied from a cluster or a bucket is data, and reading its leaderboard must
    not run code planted in it. Only a resumed search hands Ray the pickles (see signing.py).
    """
    states = [n for n in store.files("tune") if n.startswith("experiment_state-") and n.endswith(".json")]
    if not states:
        raise NoEligibleTrialError(f"{store.uri} holds no Ray Tune experiment state yet: is it a `raycxr search` "
                                   "run? (a search that has just started saves its first state within seconds)")
    source = store.child("tune", states[-1])
    try:
        doc = json.loads(store.read_text(f"tune/{states[-1]}"))
        trials = []
        for entry in doc["trial_data"]:
            state = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            trial_id = str(state["trial_id"])
            config = state.get("config")
            trials.append({"trial_id": trial_id, "status": str(state.get("status", "UNKNOWN")),
                           "config": config if isinstance(config, dict) else {},
                           "dir": Path(str(state.get("relative_logdir") or f"trial_{trial_id}")).name})
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ConfigError(f"not a Ray Tune experiment state raycxr can read ({type(exc).__name__}: {exc}): the file "
                          "is damaged; the trials' own folders still hold their results", source=source) from None
    return trials


def _trial_results(store: RunStore, folder: str):
    """One trial's reported results (its ``result.json``, one JSON object per line) as a DataFrame, one
    row per epoch (see :func:`epochs_of`); None before its first report. A damaged line is skipped."""
    import pandas as pd

    rel = f"tune/{folder}/result.json"
    if not store.exists(rel):
        return None
    rows = []
    for line in store.read_text(rel).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed driver
        if isinstance(row, dict):
            row.pop("config", None)
            rows.append(row)
    return epochs_of(pd.DataFrame(rows)) if rows else None


def run_history(run: str | Path) -> RunHistory:
    """The leaderboard and per-epoch results of a (running, stopped or finished) search, read once.

    ``run`` is the run's folder or URI. A trial's score is its best epoch's figure of the run's
    objective (validation AUC; site-val AUC for ``--objective site``; the worst source's validation
    AUC for ``worst-source``: :attr:`RunRecord.select_metric`); ``checkpoint`` is that epoch's
    checkpoint (the one Ray keeps), as a path or URI. Reads plain JSON only (:func:`_tune_trials`).
    """
    store, _ = tune_location(run)
    if not store.exists("tune"):
        raise NoEligibleTrialError(f"{store.uri} holds no Ray Tune experiment: is it a `raycxr search` run? (a "
                                   "search that has just started saves its first state within seconds)")
    try:
        select = RunRecord.load(RunStore(run)).select_metric
    except (ConfigError, OSError):  # a run of raycxr 0.1 or one still starting: validation AUC
        select = METRIC
    rows, frames = [], {}
    for trial in _tune_trials(store):
        tid = trial["trial_id"]
        df = frames[tid] = _trial_results(store, trial["dir"])
        row = {k: trial["config"].get(k) for k in LEADERBOARD_COLUMNS if k in trial["config"]}
        row.update(trial_id=tid, status="no result", epochs=0, tune_status=trial["status"])
        if df is not None and select in df and df[select].notna().any():
            # the last of equally good epochs: the one whose checkpoint Ray keeps on a tie
            best = df[df[select] == df[select].max()].iloc[-1]
            checkpoint = best.get("checkpoint_path")
            if not isinstance(checkpoint, str) and isinstance(best.get("checkpoint_dir_name"), str):
                checkpoint = store.child("tune", trial["dir"], best["checkpoint_dir_name"])
            kept = store.resolve(checkpoint) if isinstance(checkpoint, str) else None
            if isinstance(checkpoint, str) and kept is None:
                log.warning("trial %s: its results name a checkpoint outside the run (%r): refused (raycxr reads a "
                            "run's checkpoints only inside the run)", tid, checkpoint)
            row.update({METRIC: float(best[METRIC]), "best_epoch": int(best["epoch"]),
                        "epochs": int(df["epoch"].max()), "val_accuracy": float(best["val_accuracy"]),
                        "val_loss": float(best["val_loss"]), "status": "ok",
                        "latency_ms": float(best["latency_ms"]) if "latency_ms" in best else None,
                        "resumed_from_epoch": int(df["resumed_from_epoch"].max()) if "resumed_from_epoch" in df else 0,
                        "checkpoint": kept})
            if isinstance(checkpoint, str) and kept is None:
                row["status"] = "refused: checkpoint outside the run"
            row.update({k: (float(best[k]) if k != "worst_source" else str(best[k]))
                        for k in ("site_auc", "site_loss", "worst_source_auc", "worst_source", "train_images_per_s")
                        if k in best and best[k] == best[k]})
            if isinstance(best.get("precision"), str):  # what `precision: auto` resolved to on the trial's node
                layout = " + channels-last" if str(best.get("channels_last")) == "True" else ""
                row["trained_in"] = best["precision"] + layout
        if trial["status"] == "ERROR":
            row["status"] = "error" if row["status"] != "ok" else "ok (then failed)"
        rows.append(row)
    rows.sort(key=lambda r: (-(r.get(select) if r.get(select) is not None and not math.isnan(r[select]) else -1),
                             r["trial_id"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return RunHistory(board=rows, frames=frames)


def run_summary(run: str | Path) -> dict:
    """Where a search stands: trials done / running / errored / waiting, the best so far, the time
    elapsed since it started and what is left of its time budget, and the leaderboard it was
    computed from (``raycxr status``; empty before Tune has saved its first state)."""
    from datetime import datetime

    store = RunStore(run)
    record = RunRecord.load(store)
    board = leaderboard(run) if store.exists("tune") else []
    count = {k: sum(r["tune_status"] == k for r in board) for k in ("TERMINATED", "RUNNING", "ERROR")}
    ok = [r for r in board if r["status"].startswith("ok")]
    try:
        elapsed = time.time() - datetime.strptime(record.started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:  # an older run.json without the time
        elapsed = None
    done, running, errored = count["TERMINATED"], count["RUNNING"], count["ERROR"]
    if record.ended:  # Tune's state keeps the trials a stopped search left as RUNNING or PENDING
        running = 0
    return {"run": record.name, "trials": record.trials, "done": done, "running": running, "errored": errored,
            "waiting": max(0, record.trials - done - running - errored), "best": ok[0] if ok else None,
            "elapsed_s": elapsed, "budget_left_s": None if elapsed is None or not record.time_budget_min else
            max(0.0, record.time_budget_min * 60 - elapsed),
            "finished": bool(record.ended) or done + errored >= record.trials, "ended": record.ended,
            "leaderboard": board}


def format_summary(s: dict) -> str:
    """One line of :func:`run_summary`."""
    parts = [f"{s['run']}: {s['done']}/{s['trials']} trials done, {s['running']} running, {s['errored']} errored, "
             f"{s['waiting']} waiting"]
    b = s["best"]
    parts.append(f"best {METRIC} {b[METRIC]:.4f} (trial {b['trial_id']}, {b.get('model')} @ {b.get('image_size')} px, "
                 f"epoch {b['best_epoch']})" if b else f"no {METRIC} yet")
    if s.get("ended") and s["done"] + s["errored"] < s["trials"]:
        how = s["ended"].partition(": ")[2]
        parts.append(f"the search stopped ({how}, {s['ended'].partition(': ')[0]}): raycxr search --resume "
                     "continues it")
    elif s["elapsed_s"] is not None:
        parts.append(f"{s['elapsed_s'] / 60:.1f} min since it started" +
                     (f", {s['budget_left_s'] / 60:.1f} min of its time budget left"
                      if s["budget_left_s"] is not None else ""))
    return "; ".join(parts)


def leaderboard(run: str | Path) -> list[dict]:
    """One row per trial of a search, best validation AUC first (see :func:`run_history`)."""
    return run_history(run).board


def leaderboard_csv(rows: list[dict]) -> str:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return f.getvalue()


def format_leaderboard(rows: list[dict], *, top: int = 10) -> str:
    cols = ["rank", "trial_id", METRIC, "site_auc", "worst_source_auc", "best_epoch", "epochs", "model", "pretrained",
            "image_size", "augment", "lr", "batch_size", "latency_ms", "status"]
    # the site and worst-source columns only for searches that have them
    cols = [c for c in cols if c not in ("site_auc", "worst_source_auc") or any(r.get(c) is not None for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
        return "" if v is None else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows[:top]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)
