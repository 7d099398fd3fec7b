"""run_search(): Ray Tune (an Optuna searcher, optionally ASHA) over trials that train in Tune's own
reused trial processes (one worker) or as Ray Train TorchTrainers (several workers, DDP).

Layout of a run (``runs/NAME/`` by default, ``URI/NAME`` with ``--storage URI``; see storage.py)::

    run.json          the resolved search: space, data, resources, versions (repeatable)
    tune/             Ray Tune's experiment (state, per-trial results, TensorBoard events); a
                      one-worker trial's best and latest checkpoints (trial_ID/checkpoint_NNNNNN/)
    trials/TRIAL_ID/  a TorchTrainer trial's storage: its best and latest checkpoints (epoch_NNN/)
    leaderboard.csv   one row per trial, best validation AUC first
    optuna.db         the Optuna study (local runs; ``optuna-dashboard sqlite:///RUN/optuna.db``)

The holdout split is never opened here: only train and val reach the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.callback import Callback

from raycxr.config import HYPERPARAMETERS, SearchSpace, load_space
from raycxr.errors import ConfigError, NoEligibleTrialError
from raycxr.signing import RunSigner, SignRunCallback
from raycxr.storage import RunStore
from raycxr.train import METRIC, SELECTION_METRICS

log = logging.getLogger(__name__)

# The Tune function that drives one TorchTrainer needs almost no CPU; Ray refuses 0.
_TRIAL_DRIVER_CPU = 0.001
# Each Train worker asks for this much less than cpus_per_worker, so that the drivers of up to
# ten trials (Tune places them before their workers, often on one node) never leave a node a
# sliver short of a whole worker: N trials still fill N cores, and no trial waits on its own driver.
_WORKER_CPU_SLACK = 0.01
# Optuna samplers: TPE (the default), a Gaussian process, CMA-ES, random search (the baseline every
# other is compared against: scripts/bench/lcbench_searchers.py, BENCHMARKS.md), and a grid (every
# combination of a space's choices once, in a seeded order; a space of choices and fixed values only).
SEARCHERS = ("tpe", "gp", "cmaes", "random", "grid")
# Early stopping: none (every trial to max_epochs), ASHA (one bracket), or asynchronous HyperBand
# (ASHA over brackets whose grace periods grow by the reduction factor: more trials run long).
# The default is none with TPE: on the LCBench surrogate (5 tasks x 20 seeds, 2 and 8 workers,
# scripts/bench/lcbench_searchers.py) TPE alone had the best mean rank of every arm and reached
# random search's final median within a third of the budget on 4/5 and 5/5 tasks; TPE + ASHA did
# so on 3/5 and 0/5 (BENCHMARKS.md). Replayed on 64 real PneumoniaMNIST configurations' curves
# (scripts/bench/tabular_pneumoniamnist.py), TPE alone again had the best mean rank.
SCHEDULERS = {"asha": 1, "hyperband": 3, "none": 0}
# What the searcher, ASHA and Tune's "current best" see: each trial's running best validation AUC,
# which is exactly what the leaderboard and promote rank a trial by (its best epoch). A trial's last
# epoch is not: a trial that peaks and then overfits would be told worse than it is.
SEARCH_METRIC = "val_auc_best"
# What the searcher optimises: validation AUC alone; (multi-objective) AUC against the batch-1 CPU
# latency of the model's ONNX export, for clinics that run the model on a CPU box; the AUC on the
# deploying site's own films (site-val, --site: raycxr.sites); or the worst source's validation AUC
# of a pooled dataset (opt-in: DomainBed, Gulrajani & Lopez-Paz 2021, measured selection on a
# left-out domain worse on average than plain validation on the training domains).
OBJECTIVES = {"auc": ([SEARCH_METRIC], ["max"]), "auc-latency": ([SEARCH_METRIC, "latency_ms"], ["max", "min"]),
              "site": (["site_auc_best"], ["max"]), "worst-source": (["worst_source_auc_best"], ["max"])}
LEADERBOARD_COLUMNS = ["rank", "trial_id", METRIC, "best_epoch", "epochs", "val_accuracy", "val_loss", "site_auc",
                       "site_loss", "worst_source_auc", "worst_source", "latency_ms", "train_images_per_s",
                       "trained_in", *HYPERPARAMETERS, "status", "tune_status", "resumed_from_epoch", "checkpoint"]


def search_metric(objective: str) -> str:
    """What Tune, the searcher and ASHA see for a one-metric objective: the running best of the
    figure that selects (:data:`raycxr.train.SELECTION_METRICS`)."""
    return f"{SELECTION_METRICS[objective]}_best"


@dataclass(frozen=True)
class SearchConfig:
    data: Path
    space: str
    name: str | None = None
    runs_dir: Path = Path("runs")
    trials: int | None = None          # overrides the space's trial count
    max_epochs: int | None = None      # overrides the space's max_epochs
    address: str | None = None         # Ray cluster address; default $RAY_ADDRESS or a local Ray
    storage: str | None = None         # where runs go instead of runs_dir: a path or URI, e.g. s3://bucket/raycxr
    max_failures: int = 1              # retries of a trial whose worker dies
    time_budget_min: float | None = None
    target: str = "pneumonia"          # the finding whose validation AUC selects trials
    num_cpus: int | None = None        # local Ray only
    searcher: str = "tpe"              # Optuna sampler: one of SEARCHERS
    early_stopping: bool = True        # False: every trial runs to max_epochs (FIFO), whatever scheduler says
    scheduler: str = "none"            # "none" (the default: see SCHEDULERS), "asha", or "hyperband"
    objective: str = "auc"             # "auc", or "auc-latency": Pareto search of AUC against CPU latency
    weights_dir: Path | None = None    # overrides the space's weights_dir (offline pretrained weights)
    callbacks: tuple = ()              # extra Ray Tune callbacks (Python API; not recorded, not resumed)
    mlflow: str | None = None          # MLflow tracking URI: each trial logged as a run (raycxr.tracking)
    sites: tuple = ()                  # the deploying sites' ingested datasets: "PATH" or "NAME=PATH" (raycxr.sites)
    site_test_fraction: float = 0.5    # share of each site's patients kept for site-test (read once, by promote)
    site_seed: int = 0                 # seed of the site-val / site-test division
    verbosity: int = 1                 # 0: results only; 1: a line per trial start/end; 2: Tune's tables, Ray workers' output


@dataclass(frozen=True)
class SearchResult:
    """What ``raycxr.search(...)`` returns."""

    run: str            # the run's folder or URI: what promote, status and --resume take
    leaderboard: list   # one dict per trial, best validation AUC first (see run_history)


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


def init_ray(*, address: str | None, num_cpus: int | None = None, worker_logs: bool = False):
    """Join a cluster (``address`` or $RAY_ADDRESS) or start a local Ray; return its context.

    The local dashboard is always on (bound to 127.0.0.1): besides showing trials, it serves
    the state API that Ray Train's placement-group cleaner polls. Without it, the resources of a
    trial stopped early by ASHA are never released and the next trial waits forever.

    Every process of the search (Tune's trials, Ray Train's controller and its detached
    placement-group cleaner) is told which cluster is its own through the job's runtime
    environment (``RAY_API_SERVER_ADDRESS`` for a local Ray, ``RAY_ADDRESS`` for a joined one).
    Left to find it themselves, Ray's helpers scan the host for Ray processes and fail with
    "Found multiple active Ray instances" as soon as a second Ray runs on the machine; the
    finished trials' placement groups then leak and later trials wait for ever.

    ``worker_logs``: print what the Ray workers print (trial processes, Ray Data, Ray Train) on the
    driver's console (``-v``); off by default, as their errors reach the driver through Tune anyway.
    Applies when this call starts or joins Ray, not to a Ray already initialised in this process.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's per-epoch progress bars, printed by every trial's workers and dataset
    # coordinators, reach the driver's output as broken lines between Tune's status tables, which
    # already show the search's progress. RAY_DATA_DISABLE_PROGRESS_BARS=0 brings them back.
    if os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1") != "0":
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    # Fail rather than wait forever when workers cannot be placed (see docs/notes on Ray 2.60): soon
    # on this machine; on a joined cluster only after a cloud node has had time to boot for them.
    # Read by Ray Train's controller, so it travels in the job's environment (below), not only here.
    start_timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600" if address else "120")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = start_timeout
    # The trials' own processes iterate the datasets too: they get the same progress-bar setting.
    job_env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": start_timeout,
               "RAY_DATA_DISABLE_PROGRESS_BARS": os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]}
    # Save Tune's experiment state every 2 s (default: every 10 s or more), so a killed driver
    # loses at most that much bookkeeping; a finished trial restarted by --resume finds its last
    # checkpoint at the final epoch and trains nothing.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Keeping one checkpoint per trial makes Tune save its state after every trial checkpoint (so
    # that a resume never looks for a deleted one), and warn each time that it does: by design here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs: dict[str, Any] = {"log_to_driver": worker_logs, "logging_level": logging.WARNING}
    if address:
        ctx = _join(address, kwargs, job_env)
    else:
        # "local": a new Ray of our own, never a cluster that /tmp/ray/ray_current_cluster still
        # names after it crashed (ray.init would wait for that dead cluster forever). The dashboard
        # port is chosen here so that the job's processes can be told it before they start.
        # Only through the job's runtime environment, never this process's own: a subprocess the
        # driver starts later (another search, a test's cluster) must not inherit this cluster's address.
        port = _free_port()
        api = f"http://127.0.0.1:{port}"
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=port, runtime_env={"env_vars": {**job_env, "RAY_API_SERVER_ADDRESS": api}}, **kwargs)
    if address:
        _pin_data_singletons()
    if getattr(ctx, "dashboard_url", None):
        log.info("Ray dashboard: http://%s", ctx.dashboard_url)
    return ctx


def _pin_data_singletons() -> None:
    """Create Ray Data's two detached singleton actors (its stats actor and autoscaling
    coordinator) on this driver's node (the head, for a job) before any trial does.

    Ray Data pins each to the node of whichever process first asks for it; left to a trial's
    dataset coordinator on a worker, they keep that worker busy for ever, and the autoscaler never
    removes it (a GPU node billed after the search ends). Ray-internal calls: if they move, the
    search still runs, only the pinning is lost.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as exc:
        log.warning("could not place Ray Data's coordinators on this node (%s): an autoscaler may keep the worker "
                    "that holds them", exc)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _token_available() -> bool:
    """Whether this user has a Ray auth token where Ray looks for one ($RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser().is_file()


def _join(address: str, kwargs: dict, job_env: dict):
    """ray.init on an existing cluster, with token authentication the way Ray documents it.

    A head started with ``ray start --head`` where a token exists enforces token auth, but Ray's
    client sends the token only when ``RAY_AUTH_MODE=token`` is set: for a local cluster found
    automatically Ray turns that on when a token exists, for an explicit address it never does.
    raycxr does the same for an explicit address; ``RAY_AUTH_MODE=disabled`` opts out.
    """
    import ray

    from raycxr.errors import RaycxrError

    if os.environ.get("RAY_AUTH_MODE") is None and _token_available():
        # Ray reads RAY_AUTH_MODE into a config cached at import: setting the variable now is not
        # enough. Ray's own helper for a local cluster sets it and refreshes that config.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        log.info("sending this user's Ray auth token to %s (RAY_AUTH_MODE=token)", address)
    # A Ray Client address (ray://) is not what processes inside the cluster connect to; the
    # cluster's own nodes run only that cluster, so there is nothing to pin there.
    env = dict(job_env) if "://" in address or address == "auto" else {**job_env, "RAY_ADDRESS": address}
    try:
        return ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own AuthenticationError
        text = str(exc)
        if "auth" in text.lower() or "token" in text.lower() or os.environ.get("RAY_AUTH_MODE") == "token":
            hint = ("this client sent a Ray auth token (RAY_AUTH_MODE=token): if the head refused it, put the head's "
                    "token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on "
                    "the head prints it")
        else:
            hint = ("is the head running (`ray status` on it) and is its GCS port reachable from here? For a laptop, "
                    "submit the search with `ray job submit` through `ray dashboard cluster.yaml` instead")
        raise RaycxrError(f"could not join the Ray cluster at {address}: {text.splitlines()[0] if text else exc!r}; "
                          f"{hint}") from exc


def _tune_space(space: SearchSpace) -> dict:
    """The one place a validated space becomes Tune search objects."""
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "loguniform": lambda v: tune.loguniform(*v),
            "uniform": lambda v: tune.uniform(*v), "randint": lambda v: tune.randint(v[0], v[1] + 1),
            "value": lambda v: v[0]}
    return {k: make[p.kind](p.values) for k, p in space.params.items()}


def run_trial(config: dict, *, train_ds, val_ds, static: dict, site_ds: dict | None = None) -> None:
    """One Tune trial of several workers: a Ray Train TorchTrainer (DDP) whose reports reach Tune
    through a callback."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycxr.train import site_dataset_key, train_loop_per_worker

    trial_id = ray.tune.get_context().get_trial_id()
    resources = {"CPU": static["worker_cpu_request"]}
    if static["gpus_per_worker"]:
        resources["GPU"] = static["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**static["loop"], **config, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(num_workers=static["workers"], use_gpu=bool(static["gpus_per_worker"]),
                                               resources_per_worker=resources),
        datasets={"train": train_ds, "val": val_ds,
                  **{site_dataset_key(name): ds for name, ds in (site_ds or {}).items()}},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=static["trials_path"], callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=static["loop"]["select_metric"],
                checkpoint_score_order="max"),
            # A controller error is most often a worker group that cannot be placed: retry a
            # few times (autoscaling may add a node), then fail the trial instead of waiting forever.
            failure_config=ray.train.FailureConfig(max_failures=static["max_failures"], controller_failure_limit=2)),
    )
    trainer.fit()


def run_trial_in_process(config: dict, *, train_ds, val_ds, static: dict, site_ds: dict | None = None) -> None:
    """One Tune trial of one worker, trained in the Tune trial's own process (which Tune reuses
    for the next trial): no Ray Train controller, worker group, gloo or dataset split to start, so
    a trial's fixed cost is its model's construction (BENCHMARKS.md, trial overhead)."""
    import gc

    import ray.tune

    from raycxr.train import TrialConfig, TuneSession, run_loop

    # Ray Data logs a line each time an epoch starts iterating a dataset: noise in the search's output.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TrialConfig.from_tune({**static["loop"], **config, "trial_id": trial_id})
    try:
        run_loop(cfg, TuneSession(train_ds, val_ds, use_gpu=bool(static["gpus_per_worker"]), sites=site_ds))
    finally:  # finished, failed or stopped by ASHA: the next trial in this process starts with memory free
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def grid_of(space: SearchSpace) -> dict[str, list]:
    """The grid ``--searcher grid`` walks: each searched parameter's choices. A numeric
    distribution has no grid: ConfigError naming it and what to write instead."""
    ranged = sorted(k for k, p in space.params.items() if p.kind not in ("value", "choice"))
    if ranged:
        raise ConfigError([f"params.{k}: a grid needs a list of values, not a {space.params[k].kind} range "
                           f"(write e.g. {k}: [a, b, c])" for k in ranged],
                          source=f"search space {space.name} for --searcher grid")
    return {k: list(p.values) for k, p in space.params.items() if p.kind == "choice"}


def _sampler(name: str, *, seed: int, trials: int, grid: dict[str, list] | None = None):
    """The Optuna sampler named ``name``. The model-based ones start modelling after a quarter of
    the trials (3 to 10) instead of Optuna's fixed 10, which would leave a short search random.
    CMA-ES samples categorical parameters (model, augment, ...) independently at random, as Optuna's
    CmaEsSampler does; it models only the numeric ones. ``grid`` (for "grid": :func:`grid_of`)
    is walked in an order shuffled by ``seed``, each combination once."""
    import warnings

    import optuna

    if name == "grid":
        from raycxr.samplers import GridSampler

        return GridSampler(grid, seed=seed)

    startup = min(10, max(3, trials // 4))
    with warnings.catch_warnings():  # GP and CMA-ES are "experimental" in Optuna's wording
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def _study_search(**kwargs):
    """Ray's OptunaSearch, told what raycxr selects by (see :data:`SEARCH_METRIC`)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """Ray's OptunaSearch with two corrections, so that the study Optuna models (and that
        ``optuna-dashboard`` shows) holds the values the leaderboard ranks by:

        - intermediate values are reported per *epoch* (a resumed trial keeps its true step; the
          epoch a resumed trial reports again is not reported twice);
        - a trial that ends before ``max_epochs`` without an error (ASHA stopped it, or the time
          budget) is told *pruned*, with its intermediate values, not *complete* with an early
          epoch's value as if that were its final score (Ray's behaviour): a TPE model that mixed
          fidelities so would learn that short trials are the good ones, or the bad ones.
        Each Optuna trial carries its Tune trial id (user attribute ``tune_trial_id``).
        """

        FIGURES = ("val_auc", "val_loss", "site_auc", "site_loss", "worst_source_auc")

        def __init__(self, *, max_epochs: int, **kw):
            super().__init__(**kw)
            self._max_epochs = max_epochs
            self._reported: dict[str, set] = {}  # epochs told to Optuna, per trial

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if trial_id in self._ot_trials:
                self._ot_trials[trial_id].set_user_attr("tune_trial_id", trial_id)
            return config

        def on_trial_result(self, trial_id, result):
            if (isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials
                    or result.get("reported_again")):
                return
            value, epoch = result.get(self.metric), int(result.get("epoch") or 0)
            reported = self._reported.setdefault(trial_id, set())
            if value is not None and not math.isnan(value) and epoch not in reported:
                self._ot_trials[trial_id].report(float(value), epoch)
                reported.add(epoch)
            # the per-epoch figures beside the one optimised, as the study's user attributes
            # (optuna-dashboard shows them): {"1": 0.93, "2": 0.95, ...} per figure
            trial = self._ot_trials[trial_id]
            for name in self.FIGURES:
                v = result.get(name)
                if isinstance(v, (int, float)) and not math.isnan(v) and epoch:
                    trial.set_user_attr(name, {**trial.user_attrs.get(name, {}), str(epoch): float(v)})

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if result:  # Tune hands a trial's last result (ASHA's stop, the final epoch) to this alone
                self.on_trial_result(trial_id, result)
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [result.get(m) for m in metrics] if result else [None]
            done = bool(result) and int(result.get("epoch") or 0) >= self._max_epochs
            usable = not error and bool(result) and not any(v is None or math.isnan(v) for v in values)
            state, told = optuna.trial.TrialState.FAIL, None  # an error, or no usable score (one class in val)
            if usable and done:
                state, told = optuna.trial.TrialState.COMPLETE, values if len(values) > 1 else values[0]
            elif usable:
                state = optuna.trial.TrialState.PRUNED
            try:
                self._ot_study.tell(self._ot_trials[trial_id], told, state=state)
            except Exception as exc:  # Optuna refuses e.g. a pruned multi-objective trial's values
                log.warning("the Optuna study did not take trial %s: %s", trial_id, exc)
            self._completed_trials.add(trial_id)

    return StudySearch(**kwargs)


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

    def __init__(self, trials: int, *, metric: str = SEARCH_METRIC):
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


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _check_weights(space: SearchSpace) -> list[str]:
    """Problems with the space's pretrained weights that can be seen before any trial starts:
    a ``file:`` that is missing or not plain tensors (:func:`raycxr.models.safe_weights`), or
    ``imagenet`` with a ``weights_dir`` that lacks a model's file."""
    from raycxr.models import safe_weights

    pretrained = space.values_of("pretrained") if "pretrained" in space.params else []
    problems = [f"params.pretrained: {p}: no such file" for p in pretrained
                if p.startswith("file:") and not Path(p[5:]).expanduser().is_file()]
    for p in pretrained:  # read (never unpickled) now, not deep inside every trial
        if p.startswith("file:") and Path(p[5:]).expanduser().is_file():
            try:
                safe_weights(p[5:])
            except ConfigError as exc:
                problems += [f"params.pretrained: {q}" for q in exc.problems]
    if "imagenet" in pretrained and space.weights_dir:
        folder = Path(space.weights_dir).expanduser()
        problems += [f"weights_dir: {folder / (m + '.safetensors')} is missing (offline ImageNet weights for {m}; "
                     "scripts/convert_weights.py makes EfficientNet-Lite's)" for m in space.values_of("model")
                     if not (folder / f"{m}.safetensors").is_file()]
    return problems


def _cluster_capacity() -> dict:
    """What the cluster has, has free, and can grow to: {"total", "free", "ceiling", "node_cpus",
    "autoscaler"}.

    ``ceiling`` is the autoscaler's maximum (its node types times their max workers, Ray's own
    reading of the cluster config that Ray Data's autoscaler uses too), or None when unknown.
    Autoscaler v2 publishes that config; v1 (the cluster launcher's default in Ray 2.60) does
    not, and only its status says it runs: then ``autoscaler`` is True and ``ceiling`` None.
    ``node_cpus`` is the most CPUs any one node has or can have (as far as is known).
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    node_cpus = max([n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] or [0.0])
    ceiling = None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            ceiling = state.get_max_resources_from_cluster_config() or None
            node_cpus = max([node_cpus] + [g.resources.get("CPU", 0) for g in config.node_group_configs
                                           if g.max_count != 0])
    except Exception as exc:  # an older or stripped Ray without the autoscaler's config: plan from what is up
        log.info("no autoscaler config readable (%s); planning from the nodes up now", exc)
    autoscaler = ceiling is not None
    if not autoscaler:
        try:
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get

            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            # A head started without --autoscaling-config runs a read-only autoscaler that names
            # each node's type after the node ("node_<id>"); a launched cluster's types are its own.
            mapping = (json.loads(status).get("autoscaler_report") or {}).get("node_type_mapping") or {}
            autoscaler = any(kind != f"node_{node}" for node, kind in mapping.items())
        except Exception as exc:
            log.info("could not ask whether an autoscaler runs (%s)", exc)
    return {"total": dict(total), "free": dict(free), "ceiling": ceiling, "node_cpus": float(node_cpus),
            "autoscaler": autoscaler}


def plan_resources(space: SearchSpace, *, trials: int, capacity: dict) -> dict:
    """Per-trial resources and concurrency for ``capacity`` (see :func:`_cluster_capacity`), or a
    ConfigError saying why a trial can never fit.

    Concurrency is sized to what is free now, or, on an autoscaling cluster, to what it can grow
    to (pending trials are what make the autoscaler add nodes); when an autoscaler runs but does not
    say its maximum (v1), every trial is queued and the autoscaler adds what it may. A trial is
    refused only when it could never fit: more CPUs or GPUs than the cluster has or can ever have,
    or a worker larger than any node.
    """
    total, free, ceiling = capacity["total"], capacity["free"], capacity["ceiling"]
    gpw = space.gpus_per_worker
    per_trial_cpu = space.workers_per_trial * space.cpus_per_worker
    if capacity.get("autoscaler") and ceiling is None:
        # Nothing to refuse against: a trial that no node type can hold waits until Ray Train's
        # worker-group start timeout (10 minutes on a joined cluster) and then fails with the reason.
        log.warning("an autoscaler runs but does not publish its node types (autoscaler v1): queueing all %d "
                    "trials; it adds nodes up to its max_workers and the rest wait", trials)
        concurrent = trials
    else:
        def most(key):  # the most of a resource the cluster has or can have
            return max(total.get(key, 0.0), (ceiling or {}).get(key, 0.0))

        cpus, gpus = most("CPU"), most("GPU")
        if gpw and not gpus:
            log.warning("the space asks for %s GPU per worker but the cluster has none and cannot add any: "
                        "training on CPU", gpw)
            gpw = 0.0
        if per_trial_cpu > cpus:
            grow = f" and can grow to {ceiling.get('CPU', 0):g}" if ceiling else ""
            raise ConfigError(
                f"a trial needs {per_trial_cpu:g} CPUs (workers_per_trial {space.workers_per_trial} x "
                f"cpus_per_worker {space.cpus_per_worker:g}) but the Ray cluster has {total.get('CPU', 0):g}{grow}: "
                "lower resources in the space, or add nodes", source="resources")
        if space.cpus_per_worker > capacity["node_cpus"] > 0:
            raise ConfigError(f"a worker needs {space.cpus_per_worker:g} CPUs but no node has or can have more than "
                              f"{capacity['node_cpus']:g}: lower cpus_per_worker", source="resources")
        if gpw and space.workers_per_trial * gpw > gpus:
            raise ConfigError(f"a trial needs {space.workers_per_trial * gpw:g} GPUs but the cluster has {gpus:g}",
                              source="resources")
        # what this search may count on: all it can grow to when autoscaling, else what is free now
        # (another search on the same cluster holds the rest)
        room = ceiling if ceiling else free
        concurrent = int(room.get("CPU", 0.0) // per_trial_cpu)
        if gpw:
            concurrent = min(concurrent, int(room.get("GPU", 0.0) // (space.workers_per_trial * gpw)))
        if concurrent < 1:
            log.warning("the cluster has no room free for a trial now (%s CPUs free): trials will wait for it",
                        room.get("CPU", 0.0))
    return {"workers": space.workers_per_trial, "cpus_per_worker": space.cpus_per_worker,
            "in_process": space.workers_per_trial == 1 and space.trainer == "auto",
            "worker_cpu_request": space.cpus_per_worker - _WORKER_CPU_SLACK,
            "gpus_per_worker": gpw, "concurrent": max(1, min(concurrent, trials)),
            "cluster_cpus": total.get("CPU", 0.0), "cluster_gpus": total.get("GPU", 0.0),
            "free_cpus": free.get("CPU", 0.0), "autoscaler_max": ceiling,
            "autoscaler": bool(capacity.get("autoscaler"))}


def _plan_resources(space: SearchSpace, *, trials: int) -> dict:
    return plan_resources(space, trials=trials, capacity=_cluster_capacity())


def _run_dir(cfg: SearchConfig, space: SearchSpace) -> tuple[str, RunStore]:
    """(name, location) of a new run, under ``--storage`` or ``--runs-dir``, the name claimed by
    creating its run.json (O_EXCL on a filesystem: of two searches started together with one
    --name, exactly one gets it; see RunStore.claim for object stores)."""
    name = cfg.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = str(cfg.storage).rstrip("/") if cfg.storage else str(Path(cfg.runs_dir).resolve())
    store = RunStore(f"{parent}/{name}")
    taken = ConfigError(f"run {name!r} already exists in {parent}: choose another --name (or remove {store.uri})",
                        source="--name")
    if store.exists("tune") or not store.claim(
            "run.json", json.dumps({"name": name, "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"):
        raise taken
    return name, store


def _redacted(uri: str | None) -> str | None:
    """A tracking URI without any user:password@ (run.json is shared with the run)."""
    if not uri:
        return None
    from raycxr.tracking import redact

    return redact(uri)


def _scheduler(name: str, *, space: SearchSpace, max_epochs: int, own_metric: bool, metric: str = SEARCH_METRIC):
    """The Tune scheduler ``name`` stands for (see :data:`SCHEDULERS`).

    ASHA's clock is the epoch each trial reports, not Tune's iteration count: a trial resumed from
    a checkpoint after a failure keeps its true position on the rungs. It stops on the running best
    validation AUC; it is told so itself only when Tune's metric is unset (multi-objective), since
    Tune refuses a metric given to both.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not SCHEDULERS[name]:
        return FIFOScheduler()
    own = {"metric": metric, "mode": "max"} if own_metric else {}
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=min(space.grace_period, max_epochs),
                         reduction_factor=space.reduction_factor, brackets=SCHEDULERS[name], **own)


STUDY_FILE = "optuna.db"


def _study_storage(store: RunStore, name: str) -> dict:
    """The Optuna study's storage: SQLite in the run folder for a local run (``optuna-dashboard
    sqlite:///RUN/optuna.db`` shows it; ``optuna.load_study`` reads it), Optuna's memory for a run
    on object storage (SQLite needs a file system every resume can reach)."""
    if store.local is None:
        return {}
    import optuna

    url = f"sqlite:///{store.local / STUDY_FILE}"
    return {"storage": optuna.storages.RDBStorage(url), "study_name": name}


def run_search(cfg: SearchConfig) -> list[dict]:
    """Run a search and return its leaderboard (best validation AUC first)."""
    return _search(cfg).leaderboard


def _search(cfg: SearchConfig) -> SearchResult:
    """Run a search: where its run is and its leaderboard."""
    from ray import tune

    from raycxr.data import read_manifest
    from raycxr.models import min_image_size

    if cfg.searcher not in SEARCHERS:
        raise ConfigError(f"unknown searcher {cfg.searcher!r}; choose one of {list(SEARCHERS)}", source="searcher")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {cfg.scheduler!r}; choose one of {list(SCHEDULERS)}", source="scheduler")
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {cfg.objective!r}; choose one of {list(OBJECTIVES)}", source="objective")
    space = load_space(cfg.space)
    if cfg.weights_dir is not None:  # recorded in the space's own data, so --resume finds it again
        folder = str(Path(cfg.weights_dir).expanduser().resolve())
        space = dataclasses.replace(space, weights_dir=folder, raw={**space.raw, "weights_dir": folder})
    manifest = read_manifest(cfg.data)
    trials = cfg.trials or space.trials
    grid = None
    if cfg.searcher == "grid":
        grid = grid_of(space)
        size = math.prod(len(v) for v in grid.values())
        if trials > size or not cfg.trials:
            trials = size  # each combination once; --trials N (fewer) runs the first N of the shuffled grid
    max_epochs = cfg.max_epochs or space.max_epochs
    ingest_size = manifest["params"]["image_size"]
    sizes = space.values_of("image_size") if "image_size" in space.params else [ingest_size]
    problems = [f"params.image_size: {s} px is larger than the ingested {ingest_size} px; re-ingest with "
                f"--image-size {s} or lower it" for s in sizes if s > ingest_size]
    for m in space.values_of("model"):
        problems += [f"params.image_size: {m} needs at least {min_image_size(m)} px, got {s}"
                     for s in sizes if s < min_image_size(m)]
    problems += _check_weights(space)
    if problems:
        raise ConfigError(problems, source=f"search space {space.name} for this dataset")
    sites = _plan_sites(cfg, manifest)

    name, store = _run_dir(cfg, space)
    try:
        init_ray(address=cfg.address, num_cpus=cfg.num_cpus, worker_logs=cfg.verbosity >= 2)
        plan = _plan_resources(space, trials=trials)
        if plan["gpus_per_worker"] < space.gpus_per_worker:
            log.warning("No GPU in the Ray cluster: the space asks for %g GPU per worker, training on CPU instead.",
                        space.gpus_per_worker)
        tracking = []  # checked before the run is recorded: a bad --mlflow gives its name back
        if cfg.mlflow:
            from raycxr.tracking import search_callbacks

            tracking = search_callbacks(cfg.mlflow, run_name=name)
        record = RunRecord(
            name=name, space=space.name, target=cfg.target, space_config=space.raw, data=str(Path(cfg.data).resolve()),
            data_fingerprint=manifest["fingerprint"], trials=trials, max_epochs=max_epochs, seed=space.seed,
            resources=plan, storage=store.uri, max_failures=cfg.max_failures, searcher=cfg.searcher,
            early_stopping=cfg.early_stopping and cfg.scheduler != "none", scheduler=cfg.scheduler,
            objective=cfg.objective, versions=_versions(), mlflow=_redacted(cfg.mlflow),
            time_budget_min=cfg.time_budget_min, sites=[site.to_dict() for site in sites],
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        trainable = _trainable(record, space, plan, manifest, storage=store.uri)
    except BaseException:  # nothing ran: give the name back, so a corrected command can use it
        store.delete("run.json")
        raise
    record.save(store)

    gpu = f" + {plan['gpus_per_worker']:g} GPU" if plan["gpus_per_worker"] else ""
    log.info(f"Search {name}: {trials} trials x up to {max_epochs} epochs, {plan['concurrent']} at a time "
             f"({plan['workers']} worker(s) x {plan['cpus_per_worker']:g} CPU{gpu} each)")
    log.info(f"Run: {store.uri} (raycxr status / promote --run / search --resume take this)")
    log.info(f"TensorBoard: tensorboard --logdir {store.child('tune')}")
    for site in sites:
        v, t = site.counts["site-val"], site.counts["site-test"]
        log.info(f"Site {site.name}: site-val {v['images']} films ({v['positives']} positive) scored every epoch; "
                 f"site-test {t['images']} films ({t['positives']} positive) kept for promote")

    if cfg.verbosity < 2:  # Optuna logs "A new study created ..." and each trial at INFO
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = None  # a space with every value fixed has nothing to search: plain repeated trials
    metrics, modes = OBJECTIVES[cfg.objective]
    if any(p.kind != "value" for p in space.params.values()):
        sampler = _sampler(cfg.searcher, seed=space.seed, trials=trials, grid=grid)
        # Several objectives: Optuna's TPE models the Pareto front (MOTPE). Tune's own metric stays
        # unset then, or Tune would overwrite the searcher's list with a single metric.
        searcher = _study_search(metric=metrics if len(metrics) > 1 else metrics[0],
                                 mode=modes if len(modes) > 1 else "max", sampler=sampler, max_epochs=max_epochs,
                                 **_study_storage(store, name))
    tune_metric = (metrics[0], "max") if len(metrics) == 1 else (None, None)
    scheduler = _scheduler(cfg.scheduler if cfg.early_stopping else "none", space=space, max_epochs=max_epochs,
                           own_metric=tune_metric[0] is None, metric=search_metric(cfg.objective))
    tuner = tune.Tuner(
        trainable, param_space=_tune_space(space),
        tune_config=tune.TuneConfig(
            metric=tune_metric[0], mode=tune_metric[1], search_alg=searcher, scheduler=scheduler, num_samples=trials,
            max_concurrent_trials=plan["concurrent"], trial_dirname_creator=_trial_dirname,
            reuse_actors=in_process(plan),
            time_budget_s=cfg.time_budget_min * 60 if cfg.time_budget_min else None),
        # Tune retries a trial whose driver died (a lost node); the retried trial's TorchTrainer
        # finds its own checkpoints in storage and resumes from the latest one.
        # An in-process trial's checkpoints are Tune's (tune/trial_ID/checkpoint_NNNNNN): the best
        # epoch's and the latest (to resume from) are kept, as Ray Train does for a DDP trial.
        # Tune's own tables (a box per trial start and end: hundreds of lines) only with -v; by
        # default one line per trial start and end (ProgressLines)
        run_config=tune.RunConfig(name="tune", storage_path=store.uri, verbose=1 if cfg.verbosity >= 2 else 0,
                                  callbacks=[KeepTrialHistory(), SignRunCallback(), *tracking,
                                             *([ProgressLines(trials, metric=search_metric(cfg.objective))]
                                               if cfg.verbosity == 1 else []), *cfg.callbacks],
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=1, checkpoint_score_attribute=record.select_metric,
                                      checkpoint_score_order="max")),
    )
    RunSigner(store).sign_in_store("tuner.pkl")
    board = _fit(tuner, store, name, time_budget_s=cfg.time_budget_min * 60 if cfg.time_budget_min else None,
                 tune_output=cfg.verbosity >= 2)
    return SearchResult(run=store.uri, leaderboard=board)


def resume_search(run: str | Path, *, address: str | None = None, num_cpus: int | None = None,
                  trust_run: bool = False, verbosity: int = 1) -> list[dict]:
    """Continue a stopped or killed search: finished trials are kept, unfinished and errored
    ones restart from their last checkpoint, and the Optuna searcher keeps its history.

    Ray restores a search by unpickling its state: the run must carry this user's signature
    (signing.py) unless ``trust_run``."""
    from ray import tune

    from raycxr.config import parse_space
    from raycxr.data import read_manifest
    from raycxr.signing import verify

    store = RunStore(run)
    store.require_run("--resume")
    record = RunRecord.load(store)
    where, tune_path = tune_location(store.uri)  # where the run is now: it may have been moved
    if trust_run:
        log.warning("--trust-run: resuming %s without checking its signature", where.uri)
    else:
        verify(where)
    manifest = read_manifest(record.data)
    if manifest["fingerprint"] != record.data_fingerprint:
        raise ConfigError(f"{record.data} changed since the search started (fingerprint {manifest['fingerprint']}"
                          f" != {record.data_fingerprint}): a resumed search must see the same data",
                          source="--resume")
    space = parse_space(record.space_config, name=record.space)
    init_ray(address=address, num_cpus=num_cpus, worker_logs=verbosity >= 2)
    # the trial shape the run started with: a resumed trial must find its checkpoints where it left them
    plan = {**_plan_resources(space, trials=record.trials), "in_process": in_process(record.resources)}
    if not tune.Tuner.can_restore(tune_path):
        raise ConfigError(f"nothing to resume at {tune_path}: the search stopped before Tune saved its state; "
                          "start it again", source="--resume")
    log.info(f"Resuming search {record.name} from {tune_path}")
    tuner = tune.Tuner.restore(tune_path, trainable=_trainable(record, space, plan, manifest, storage=where.uri),
                               resume_unfinished=True, resume_errored=True)
    RunSigner(where).sign_in_store("tuner.pkl")  # restoring rewrote it
    return _fit(tuner, store, record.name, time_budget_s=None, tune_output=verbosity >= 2)


def _trainable(record: RunRecord, space: SearchSpace, plan: dict, manifest: dict, *, storage: str):
    """The Tune trainable of a search: ``run_trial`` with the shared datasets and settings.

    Built the same way for a new search and a resumed one (Tuner.restore needs the same trainable).
    """
    from ray import tune

    from raycxr.data import label_matrix, open_split, read_split
    from raycxr.labels import FINDINGS

    from raycxr.sites import site_dataset

    data = record.data
    labels = label_matrix(read_split(data, "train", columns=["labels"]).column("labels"))
    _check_target(Path(data), record.target, labels)
    sources = _val_sources(data)
    # Read once into the object store, shared by every trial: epochs and trials re-read nothing.
    train_ds = open_split(data, "train").materialize()
    val_ds = open_split(data, "val", extra_columns=["source"] if len(sources) >= 2 else []).materialize()
    site_ds = {site.name: site_dataset(site, "site-val", record.target).materialize()
               for site in record.site_records()}
    ingest_size = manifest["params"]["image_size"]
    static = {
        "workers": plan["workers"], "worker_cpu_request": plan["worker_cpu_request"],
        "gpus_per_worker": plan["gpus_per_worker"], "max_failures": record.max_failures,
        "trials_path": storage.rstrip("/") + "/trials",
        "loop": {"max_epochs": record.max_epochs, "seed": space.seed, "train_rows": int(len(labels)),
                 "findings": list(FINDINGS), "target": record.target, "pos_weight": _pos_weight(labels),
                 "ingest_image_size": ingest_size, "resize": manifest["params"]["resize"],
                 "cpus_per_worker": plan["cpus_per_worker"], "select_metric": record.select_metric,
                 "sites": list(site_ds), "sources": sources if len(sources) >= 2 else [],
                 "weights_dir": str(Path(space.weights_dir).expanduser().resolve()) if space.weights_dir else None,
                 "image_size": ingest_size},
    }
    if in_process(plan):
        resources = {"cpu": plan["cpus_per_worker"], "gpu": plan["gpus_per_worker"]}
        fn = run_trial_in_process
    else:
        resources, fn = {"cpu": _TRIAL_DRIVER_CPU}, run_trial
    return tune.with_resources(tune.with_parameters(fn, train_ds=train_ds, val_ds=val_ds, static=static,
                                                    site_ds=site_ds), resources)


def _val_sources(data: str | Path) -> list[str]:
    """The sources of a dataset's validation split, sorted."""
    from raycxr.data import read_manifest

    return sorted(read_manifest(data)["counts"]["val"]["by_source"])


def _plan_sites(cfg: SearchConfig, manifest: dict) -> list:
    """Each ``--site`` divided into site-val and site-test (raycxr.sites), and the objective's needs
    checked: ``site`` needs a site, ``worst-source`` two or more sources in validation."""
    from raycxr.sites import parse_site, plan_site

    named = [parse_site(str(s)) if not isinstance(s, tuple) else (s[0], Path(s[1])) for s in cfg.sites]
    names = [n for n, _ in named]
    if len(set(names)) < len(names):
        raise ConfigError(f"two sites share a name ({', '.join(names)}): name them, e.g. --site a=PATH --site b=PATH",
                          source="--site")
    if cfg.objective == "site" and not named:
        raise ConfigError("--objective site needs the deploying site's films: --site PATH (an ingested dataset)",
                          source="--objective")
    if cfg.objective == "worst-source":
        sources = _val_sources(cfg.data)
        if len(sources) < 2:
            raise ConfigError(f"--objective worst-source needs a pooled dataset with two or more sources in its "
                              f"validation split; {cfg.data} has {', '.join(sources) or 'none'}", source="--objective")
    return [plan_site(name, path, target=cfg.target, test_fraction=cfg.site_test_fraction, seed=cfg.site_seed,
                      search_data=cfg.data) for name, path in named]


def in_process(plan: dict) -> bool:
    """Whether a search's trials train in Tune's own (reused) trial processes: one-worker trials,
    unless the space says ``resources.trainer: ray-train``. Several workers (DDP) need Ray Train's
    TorchTrainer. A run started before in-process trials existed (no ``in_process`` in its recorded
    plan) used TorchTrainer for every trial."""
    return bool(plan.get("in_process"))


def _fit(tuner, store: RunStore, name: str, *, time_budget_s: float | None, tune_output: bool = True) -> list[dict]:
    """Run the tuner; return the leaderboard. A search stopped by its time budget returns what it
    has; one stopped by Ctrl-C (which Tune catches, saving its state) raises KeyboardInterrupt
    after writing the leaderboard, so the command exits 130 as an interrupted program does."""
    _mark_ended(store, "")  # running (again, for a resumed search)
    ended: dict = {}  # _fit_board sets "how" when the time budget stopped the search
    try:
        board = _fit_board(tuner, store, name, time_budget_s=time_budget_s, tune_output=tune_output, ended=ended)
        ended.setdefault("how", "finished")
        return board
    except KeyboardInterrupt:
        ended["how"] = "interrupted"
        raise
    finally:
        _mark_ended(store, f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {ended.get('how', 'failed')}")


def _mark_ended(store: RunStore, ended: str) -> None:
    """Record in run.json when and how the search stopped ("" while it runs)."""
    try:
        record = RunRecord.load(store)
        if record.ended != ended:
            dataclasses.replace(record, ended=ended).save(store)
    except (ConfigError, OSError) as exc:  # never hide why the search stopped behind this
        log.warning("could not record in run.json that the search %s: %s", ended or "runs", exc)


def _fit_board(tuner, store: RunStore, name: str, *, time_budget_s: float | None, tune_output: bool,
               ended: dict) -> list[dict]:
    """:func:`_fit` but for run.json's ``ended``; sets ``ended["how"]`` when the time budget stopped the search."""
    hint = f"resume it with: raycxr search --resume {store.uri}"
    t0 = time.monotonic()
    # Ray's new console output prints its "Configuration for experiment" box and result paths
    # even at verbose=0; its older reporter prints nothing then (the env var is read by fit()).
    quiet = {} if tune_output else {"RAY_AIR_NEW_OUTPUT": "0"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        log.warning(f"Search {name} interrupted; finished trials are kept in {store.uri}. To continue, {hint}")
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    for err in results.errors:
        log.warning("a trial failed: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
    board = leaderboard(store.uri)
    store.write_text("leaderboard.csv", leaderboard_csv(board))
    unfinished = any(r["tune_status"] in ("PENDING", "RUNNING", "PAUSED") for r in board)
    budget_spent = time_budget_s is not None and time.monotonic() - t0 >= time_budget_s
    if unfinished and not budget_spent:  # Ctrl+C (or SIGUSR1)
        log.warning(f"Search {name} interrupted; its state is saved and finished trials are kept. To continue, {hint}")
        raise KeyboardInterrupt
    if budget_spent:
        ended["how"] = "time budget"
    if not any(row["status"] == "ok" for row in board):
        if budget_spent:  # Tune marks the trials it stopped at the budget TERMINATED, reported or not
            raise NoEligibleTrialError(f"the time budget ({time_budget_s / 60:g} min) of {name} ended before any "
                                       f"trial reported {METRIC}: give it more minutes, or {hint}")
        raise NoEligibleTrialError(f"no trial of {name} reported {METRIC}: see the errors above and "
                                   f"the trial logs in {store.child('tune')}")
    if budget_spent and unfinished:
        log.warning(f"Search {name} used its time budget before every trial finished; {hint}")
    return board  # --time-budget: not a failure, whatever it has so far


def _pos_weight(labels) -> list[float]:
    """negatives / positives per finding over known train labels (1.0 where a class is missing)."""
    pos, neg = (labels == 1).sum(axis=0), (labels == 0).sum(axis=0)
    return [float(n / p) if p and n else 1.0 for p, n in zip(pos, neg)]


def _check_target(data: Path, target: str, train_labels) -> None:
    from raycxr.data import label_matrix, read_split
    from raycxr.labels import FINDINGS, index

    if target not in FINDINGS:
        raise ConfigError(f"unknown finding {target!r}; use one of: {', '.join(FINDINGS)}", source="--target")
    t = index(target)
    val = label_matrix(read_split(data, "val", columns=["labels"]).column("labels"))[:, t]
    for split, col in (("train", train_labels[:, t]), ("val", val)):
        if not ((col == 1).any() and (col == 0).any()):
            raise ConfigError(f"the {split} split has no known positive and negative {target} labels "
                              f"(positives {(col == 1).sum()}, negatives {(col == 0).sum()}): ingest a source "
                              f"that labels {target}, or choose another --target", source="--target")


def _versions() -> dict:
    import ray
    import timm
    import torch

    import raycxr

    return {"raycxr": raycxr.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "timm": timm.__version__}


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


def api(data: str | Path, space: str | Path, **options) -> SearchResult:
    """``raycxr.search(data, space, **options)``: :func:`run_search` with keyword options (the
    fields of :class:`SearchConfig`, e.g. ``runs_dir="runs"``, ``trials=8``, ``verbosity=0``),
    returning where the run is with its leaderboard (:class:`SearchResult`)."""
    return _search(SearchConfig(data=Path(data), space=str(space), **options))


from raycxr import callable_stage  # noqa: E402  (after api, which it calls)

callable_stage(__name__)
