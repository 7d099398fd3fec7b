"""run_search(): Ray Tune (an Optuna searcher, optionally ASHA) over trials that train in Tune's own
reused trial processes (one worker) or as Ray Train TorchTrainers (several workers, DDP).

Layout of a run (``runs/NAME/`` by default, ``URI/NAME`` with ``--storage URI``; see storage.py)::

    run.json          the resolved search: space, data, resources, versions (repeatable)
    tune/             Ray Tune's experiment (state, per-trial results, TensorBoard events); a
                      one-worker trial's best and latest checkpoints (trial_ID/checkpoint_NNNNNN/)
    signature.json    HMACs of what Ray will unpickle on --resume (signing.py)
    tune-state.json   the newest signed save of Tune's state (and of optuna.db), what --resume restores
    trials/TRIAL_ID/  a TorchTrainer trial's storage: its best and latest checkpoints (epoch_NNN/)
    leaderboard.csv   one row per trial, best validation AUC first
    optuna.db         the Optuna study (local runs; ``optuna-dashboard sqlite:///RUN/optuna.db``)

The holdout split is never opened here: only train and val reach the trials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune.callback import Callback

from raycxr.cluster import _plan_resources, init_ray
from raycxr.config import SearchSpace, load_space
from raycxr.errors import ConfigError, NoEligibleTrialError
from raycxr.runs import RunRecord, leaderboard, leaderboard_csv, tune_location
from raycxr.signing import STUDY_FILE, RunSigner, SignRunCallback
from raycxr.storage import RunStore, write_atomic
from raycxr.train import METRIC, SELECTION_METRICS

log = logging.getLogger(__name__)

# The Tune function that drives one TorchTrainer needs almost no CPU; Ray refuses 0.
_TRIAL_DRIVER_CPU = 0.001
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
# How trials read the train split: "materialize" reads it once into the object store, shared by
# every trial and epoch (fastest when it fits); "stream" reads shards in Ray Data tasks each epoch
# where the trial runs (raycxr.data.StreamedSplit), so neither the driver nor the object store holds
# the split; "auto" materialises a split that takes up to MATERIALIZE_SHARE of the object store.
DATA_PATHS = ("auto", "materialize", "stream")
MATERIALIZE_SHARE = 0.5


def data_path_for(choice: str, split_bytes: int, object_store_bytes: float) -> tuple[str, str]:
    """("materialize" or "stream", why) for a train split of ``split_bytes`` (its Parquet shards:
    pixels are stored raw, so about its size in memory) and the cluster's object store."""
    share = split_bytes / object_store_bytes if object_store_bytes else float("inf")
    size = f"train split {split_bytes / 2**30:.2f} GiB, {share:.0%} of the object store ({object_store_bytes / 2**30:.1f} GiB)"
    if choice != "auto":
        return choice, f"--data-path {choice} ({size})"
    if share <= MATERIALIZE_SHARE:
        return "materialize", f"{size}: read once into the object store (--data-path stream reads it each epoch)"
    return "stream", (f"{size}, over {MATERIALIZE_SHARE:.0%}: streamed from storage each epoch "
                      "(--data-path materialize to read it once)")


def search_metric(objective: str) -> str:
    """What Tune, the searcher and ASHA see for a one-metric objective: the running best of the
    figure that selects (:data:`raycxr.train.SELECTION_METRICS`)."""
    return f"{SELECTION_METRICS[objective]}_best"


@dataclass(frozen=True)
class SearchConfig:
    data: str | Path                   # a dataset folder, or a URI every node reaches (s3://...)
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
    data_path: str = "auto"            # one of DATA_PATHS: how trials read the train split (see data_path_for)

    def __post_init__(self):
        if self.data_path not in DATA_PATHS:
            raise ConfigError(f"data path {self.data_path!r}: choose one of {', '.join(DATA_PATHS)}",
                              source="--data-path")


@dataclass(frozen=True)
class SearchResult:
    """What ``raycxr.search(...)`` returns."""

    run: str            # the run's folder or URI: what promote, status and --resume take
    leaderboard: list   # one dict per trial, best validation AUC first (see run_history)


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

    from raycxr.data import StreamedSplit
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
        datasets={"train": train_ds.dataset(static["loop"]["seed"]) if isinstance(train_ds, StreamedSplit) else train_ds,
                  "val": val_ds,
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

        def _finished_in_study(self, trial_id) -> bool:
            """Whether the study already holds the trial as finished: a driver killed after Optuna
            wrote a trial's end but before Tune saved this searcher leaves a resumed searcher that
            still thinks it runs (the study's copy is the later one; telling it again would fail)."""
            trial = self._ot_trials[trial_id]
            if trial.storage.get_trial(trial._trial_id).state.is_finished():
                self._completed_trials.add(trial_id)
                return True
            return False

        def on_trial_result(self, trial_id, result):
            if (isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials
                    or result.get("reported_again") or self._finished_in_study(trial_id)):
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
            if trial_id in self._completed_trials or trial_id not in self._ot_trials or self._finished_in_study(trial_id):
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


def _run_dir(cfg: SearchConfig, space: SearchSpace) -> tuple[str, RunStore, str]:
    """(name, location) of a new run, under ``--storage`` or ``--runs-dir``, the name claimed by
    creating its run.json (O_EXCL on a filesystem: of two searches started together with one
    --name, exactly one gets it; see RunStore.claim for object stores)."""
    name = cfg.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = str(cfg.storage).rstrip("/") if cfg.storage else str(Path(cfg.runs_dir).resolve())
    store = RunStore(f"{parent}/{name}")
    taken = ConfigError(f"run {name!r} already exists in {parent}: choose another --name (or remove {store.uri})",
                        source="--name")
    claim = json.dumps({"name": name, "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "by": f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"}) + "\n"
    if store.exists("tune") or not store.claim("run.json", claim):
        raise taken
    return name, store, claim


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

    from raycxr.data import location, read_manifest
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

    name, store, claim = _run_dir(cfg, space)
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
            name=name, space=space.name, target=cfg.target, space_config=space.raw, data=location(cfg.data),
            data_fingerprint=manifest["fingerprint"], trials=trials, max_epochs=max_epochs, seed=space.seed,
            resources=plan, storage=store.uri, max_failures=cfg.max_failures, searcher=cfg.searcher,
            early_stopping=cfg.early_stopping and cfg.scheduler != "none", scheduler=cfg.scheduler,
            objective=cfg.objective, versions=_versions(), mlflow=_redacted(cfg.mlflow),
            time_budget_min=cfg.time_budget_min, sites=[site.to_dict() for site in sites],
            data_path=cfg.data_path, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        trainable = _trainable(record, space, plan, manifest, storage=store.uri)
    except BaseException:  # nothing ran: give the name back (if still ours), so a corrected command can use it
        store.release("run.json", claim)
        raise
    record.save(store)
    RunSigner(store).sign_in_store(RunRecord.FILE)

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
    RunSigner(store).sign_in_store("tune/tuner.pkl")
    with store.lease(f"raycxr search {name}"):  # a --resume of this run meanwhile is refused
        board = _fit(tuner, store, name, time_budget_s=cfg.time_budget_min * 60 if cfg.time_budget_min else None,
                     tune_output=cfg.verbosity >= 2)
    return SearchResult(run=store.uri, leaderboard=board)


def resume_search(run: str | Path, *, address: str | None = None, num_cpus: int | None = None,
                  trust_run: bool = False, verbosity: int = 1) -> list[dict]:
    """Continue a stopped or killed search: finished trials are kept, unfinished and errored
    ones restart from their last checkpoint, and the Optuna searcher keeps its history.

    Ray restores a search by unpickling its state: the run must carry this user's signature
    (signing.py) unless ``trust_run``. Holds the run's lease (RunStore.lease) while it works."""
    store = RunStore(run)
    store.require_run("--resume")
    record = RunRecord.load(store)
    with store.lease(f"raycxr search --resume {record.name}"):  # one driver per run: a second is refused
        return _resume(store, record, address=address, num_cpus=num_cpus, trust_run=trust_run, verbosity=verbosity)


def _resume(store: RunStore, record: RunRecord, *, address: str | None, num_cpus: int | None, trust_run: bool,
            verbosity: int) -> list[dict]:
    """:func:`resume_search`'s work, under the run's lease."""
    from ray import tune

    from raycxr.config import parse_space
    from raycxr.data import read_manifest
    from raycxr.signing import verified_filesystem, verify

    where, tune_path = tune_location(store.uri)  # where the run is now: it may have been moved
    if trust_run:
        log.warning("--trust-run: resuming %s without checking its signature", where.uri)
    else:
        checked = verify(where)
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
    # Ray reads the state through a filesystem that serves the bytes verify() checked (signing.py):
    # what it unpickles is what was verified, whatever is written to the run meanwhile
    restore_from, fs = tune_path, None
    if not trust_run:
        study = checked.pop(STUDY_FILE, None)
        if study is not None and where.local is not None:  # the study as it was at the save Ray restores
            for leftover in ("-journal", "-wal", "-shm"):  # SQLite would replay a killed driver's onto it
                (where.local / f"{STUDY_FILE}{leftover}").unlink(missing_ok=True)
            write_atomic(where.local / STUDY_FILE, study)
        fs = verified_filesystem(where, checked)
        restore_from = f"{where.root.rstrip('/')}/tune"
    tuner = tune.Tuner.restore(restore_from, trainable=_trainable(record, space, plan, manifest, storage=where.uri),
                               resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    RunSigner(where).sign_in_store("tune/tuner.pkl")  # restoring rewrote it
    return _fit(tuner, store, record.name, time_budget_s=None, tune_output=verbosity >= 2)


def _trainable(record: RunRecord, space: SearchSpace, plan: dict, manifest: dict, *, storage: str):
    """The Tune trainable of a search: ``run_trial`` with the shared datasets and settings.

    Built the same way for a new search and a resumed one (Tuner.restore needs the same trainable).
    """
    from ray import tune

    import ray

    from raycxr.data import STREAM_CPU_RESERVE, StreamedSplit, label_matrix, open_split, read_split
    from raycxr.labels import FINDINGS

    from raycxr.sites import site_dataset

    data = record.data
    labels = label_matrix(read_split(data, "train", columns=["labels"]).column("labels"))
    _check_target(data, record.target, labels)
    sources = _val_sources(data)
    # rows per source of a pooled train split (source_balance weighs them; batches carry the source)
    train_counts = dict(sorted(manifest["counts"]["train"]["by_source"].items()))
    train_counts = train_counts if len(train_counts) >= 2 else {}
    train_columns = ["source"] if train_counts else []
    streamed = StreamedSplit.open(data, "train", extra_columns=train_columns)
    path, why = data_path_for(record.data_path, streamed.nbytes(), ray.cluster_resources().get("object_store_memory", 0))
    log.info(f"Data: {why}")
    # Materialised: read once into the object store (from a folder or a URI), shared by every trial:
    # epochs and trials re-read nothing. Streamed: each trial's epochs read the shards themselves.
    train_ds = streamed if path == "stream" else open_split(data, "train", extra_columns=train_columns).materialize()
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
                 "train_sources": list(train_counts), "train_source_counts": list(train_counts.values()),
                 "weights_dir": str(Path(space.weights_dir).expanduser().resolve()) if space.weights_dir else None,
                 "image_size": ingest_size},
    }
    if path == "stream":  # the shard-reading tasks need a sliver of CPU that trials never hold
        static["worker_cpu_request"] = _less(plan["worker_cpu_request"], STREAM_CPU_RESERVE)
    if in_process(plan):
        cpu = plan["cpus_per_worker"] if path == "materialize" else _less(plan["cpus_per_worker"], STREAM_CPU_RESERVE)
        resources = {"cpu": cpu, "gpu": plan["gpus_per_worker"]}
        fn = run_trial_in_process
    else:
        resources, fn = {"cpu": _TRIAL_DRIVER_CPU}, run_trial
    return tune.with_resources(tune.with_parameters(fn, train_ds=train_ds, val_ds=val_ds, static=static,
                                                    site_ds=site_ds), resources)


def _less(cpus: float, reserve: float) -> float:
    """``cpus`` less ``reserve``, but never below half of ``cpus``."""
    return max(cpus - reserve, cpus / 2)


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
            RunSigner(store).sign_in_store(RunRecord.FILE)
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


def _check_target(data: str | Path, target: str, train_labels) -> None:
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


def api(data: str | Path, space: str | Path, **options) -> SearchResult:
    """``raycxr.search(data, space, **options)``: :func:`run_search` with keyword options (the
    fields of :class:`SearchConfig`, e.g. ``runs_dir="runs"``, ``trials=8``, ``verbosity=0``),
    returning where the run is with its leaderboard (:class:`SearchResult`)."""
    return _search(SearchConfig(data=data, space=str(space), **options))


from raycxr import callable_stage  # noqa: E402  (after api, which it calls)

callable_stage(__name__)
