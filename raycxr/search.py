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

from raycxr import samplers
from raycxr.callbacks import KeepTrialHistory, ProgressLines
from raycxr.cluster import cluster_capacity, init_ray, plan_resources
from raycxr.config import SearchSpace, load_space
from raycxr.data import Manifest
from raycxr.errors import ConfigError, NoEligibleTrialError
from raycxr.runs import RunRecord, leaderboard, leaderboard_csv, tune_location
from raycxr.signing import STUDY_FILE, RunSigner, SignRunCallback
from raycxr.storage import RunStore, write_atomic
from raycxr.train import METRIC, SELECTION_METRICS
from raycxr.trainables import DATA_PATHS, in_process, trainable, val_sources

log = logging.getLogger(__name__)

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
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"unknown searcher {self.searcher!r}; choose one of {list(SEARCHERS)}", source="searcher")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {self.scheduler!r}; choose one of {list(SCHEDULERS)}",
                              source="scheduler")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {list(OBJECTIVES)}",
                              source="objective")
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


@dataclass(frozen=True)
class _Planned:
    """A new search checked against its data, before Ray starts: the space, the dataset's manifest,
    the number of trials and epochs, the grid (``--searcher grid``) and the sites."""

    space: SearchSpace
    manifest: Manifest
    trials: int
    max_epochs: int
    grid: dict | None
    sites: list


def _plan(cfg: SearchConfig) -> _Planned:
    """The space (with ``--weights-dir``), trials and epochs, checked against the dataset: every
    problem found at once, before anything runs."""
    from raycxr.data import read_manifest
    from raycxr.models import min_image_size

    space = load_space(cfg.space)
    if cfg.weights_dir is not None:  # recorded in the space's own data, so --resume finds it again
        folder = str(Path(cfg.weights_dir).expanduser().resolve())
        space = dataclasses.replace(space, weights_dir=folder, raw={**space.raw, "weights_dir": folder})
    manifest = read_manifest(cfg.data)
    trials = cfg.trials or space.trials
    grid = None
    if cfg.searcher == "grid":
        grid = samplers.grid_of(space)
        size = math.prod(len(v) for v in grid.values())
        if trials > size or not cfg.trials:
            trials = size  # each combination once; --trials N (fewer) runs the first N of the shuffled grid
    ingest_size = manifest.image_size
    sizes = space.values_of("image_size") if "image_size" in space.params else [ingest_size]
    problems = [f"params.image_size: {s} px is larger than the ingested {ingest_size} px; re-ingest with "
                f"--image-size {s} or lower it" for s in sizes if s > ingest_size]
    for m in space.values_of("model"):
        problems += [f"params.image_size: {m} needs at least {min_image_size(m)} px, got {s}"
                     for s in sizes if s < min_image_size(m)]
    problems += _check_weights(space)
    if problems:
        raise ConfigError(problems, source=f"search space {space.name} for this dataset")
    return _Planned(space=space, manifest=manifest, trials=trials, max_epochs=cfg.max_epochs or space.max_epochs,
                    grid=grid, sites=_plan_sites(cfg, manifest))


def _search(cfg: SearchConfig) -> SearchResult:
    """Run a search: where its run is and its leaderboard."""
    pl = _plan(cfg)
    name, store, claim = _run_dir(cfg, pl.space)
    try:
        init_ray(address=cfg.address, num_cpus=cfg.num_cpus, worker_logs=cfg.verbosity >= 2)
        plan = plan_resources(pl.space, trials=pl.trials, capacity=cluster_capacity())
        if plan["gpus_per_worker"] < pl.space.gpus_per_worker:
            log.warning("No GPU in the Ray cluster: the space asks for %g GPU per worker, training on CPU instead.",
                        pl.space.gpus_per_worker)
        tracking = []  # checked before the run is recorded: a bad --mlflow gives its name back
        if cfg.mlflow:
            from raycxr.tracking import search_callbacks

            tracking = search_callbacks(cfg.mlflow, run_name=name)
        record = _record(cfg, pl, name=name, plan=plan, storage=store.uri)
        fn = trainable(record, pl.space, plan, pl.manifest, storage=store.uri)
    except BaseException:  # nothing ran: give the name back (if still ours), so a corrected command can use it
        store.release("run.json", claim)
        raise
    record.save(store)
    RunSigner(store).sign_in_store(RunRecord.FILE)
    _log_start(record, pl, plan, store)
    tuner = _tuner(cfg, pl, fn, plan=plan, record=record, store=store, callbacks=tracking)
    RunSigner(store).sign_in_store("tune/tuner.pkl")
    with store.lease(f"raycxr search {name}"):  # a --resume of this run meanwhile is refused
        board = _fit(tuner, store, name, time_budget_s=cfg.time_budget_min * 60 if cfg.time_budget_min else None,
                     tune_output=cfg.verbosity >= 2)
    return SearchResult(run=store.uri, leaderboard=board)


def _record(cfg: SearchConfig, pl: _Planned, *, name: str, plan: dict, storage: str) -> RunRecord:
    """The run's run.json: everything a ``--resume`` needs to rebuild the same search."""
    from raycxr.data import location

    return RunRecord(
        name=name, space=pl.space.name, target=cfg.target, space_config=pl.space.raw, data=location(cfg.data),
        data_fingerprint=pl.manifest.fingerprint, trials=pl.trials, max_epochs=pl.max_epochs, seed=pl.space.seed,
        resources=plan, storage=storage, max_failures=cfg.max_failures, searcher=cfg.searcher,
        early_stopping=cfg.early_stopping and cfg.scheduler != "none", scheduler=cfg.scheduler,
        objective=cfg.objective, versions=_versions(), mlflow=_redacted(cfg.mlflow),
        time_budget_min=cfg.time_budget_min, sites=[site.to_dict() for site in pl.sites],
        data_path=cfg.data_path, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _log_start(record: RunRecord, pl: _Planned, plan: dict, store: RunStore) -> None:
    gpu = f" + {plan['gpus_per_worker']:g} GPU" if plan["gpus_per_worker"] else ""
    log.info(f"Search {record.name}: {pl.trials} trials x up to {pl.max_epochs} epochs, {plan['concurrent']} at a "
             f"time ({plan['workers']} worker(s) x {plan['cpus_per_worker']:g} CPU{gpu} each)")
    log.info(f"Run: {store.uri} (raycxr status / promote --run / search --resume take this)")
    log.info(f"TensorBoard: tensorboard --logdir {store.child('tune')}")
    for site in pl.sites:
        v, t = site.counts["site-val"], site.counts["site-test"]
        log.info(f"Site {site.name}: site-val {v['images']} films ({v['positives']} positive) scored every epoch; "
                 f"site-test {t['images']} films ({t['positives']} positive) kept for promote")


def _tuner(cfg: SearchConfig, pl: _Planned, fn, *, plan: dict, record: RunRecord, store: RunStore, callbacks: list):
    """The Tune Tuner of a new search: the Optuna searcher (:class:`raycxr.samplers.StudySearch`),
    the scheduler, the callbacks and checkpointing."""
    from ray import tune

    if cfg.verbosity < 2:  # Optuna logs "A new study created ..." and each trial at INFO
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = None  # a space with every value fixed has nothing to search: plain repeated trials
    metrics, modes = OBJECTIVES[cfg.objective]
    if any(p.kind != "value" for p in pl.space.params.values()):
        sampler = samplers.sampler(cfg.searcher, seed=pl.space.seed, trials=pl.trials, grid=pl.grid)
        # Several objectives: Optuna's TPE models the Pareto front (MOTPE). Tune's own metric stays
        # unset then, or Tune would overwrite the searcher's list with a single metric.
        searcher = samplers.StudySearch(metric=metrics if len(metrics) > 1 else metrics[0],
                                        mode=modes if len(modes) > 1 else "max", sampler=sampler,
                                        max_epochs=pl.max_epochs, **_study_storage(store, record.name))
    tune_metric = (metrics[0], "max") if len(metrics) == 1 else (None, None)
    scheduler = _scheduler(cfg.scheduler if cfg.early_stopping else "none", space=pl.space, max_epochs=pl.max_epochs,
                           own_metric=tune_metric[0] is None, metric=search_metric(cfg.objective))
    progress = [ProgressLines(pl.trials, metric=search_metric(cfg.objective))] if cfg.verbosity == 1 else []
    return tune.Tuner(
        fn, param_space=_tune_space(pl.space),
        tune_config=tune.TuneConfig(
            metric=tune_metric[0], mode=tune_metric[1], search_alg=searcher, scheduler=scheduler,
            num_samples=pl.trials, max_concurrent_trials=plan["concurrent"], trial_dirname_creator=_trial_dirname,
            reuse_actors=in_process(plan),
            time_budget_s=cfg.time_budget_min * 60 if cfg.time_budget_min else None),
        # Tune retries a trial whose driver died (a lost node); the retried trial's TorchTrainer
        # finds its own checkpoints in storage and resumes from the latest one.
        # An in-process trial's checkpoints are Tune's (tune/trial_ID/checkpoint_NNNNNN): the best
        # epoch's and the latest (to resume from) are kept, as Ray Train does for a DDP trial.
        # Tune's own tables (a box per trial start and end: hundreds of lines) only with -v; by
        # default one line per trial start and end (ProgressLines)
        run_config=tune.RunConfig(name="tune", storage_path=store.uri, verbose=1 if cfg.verbosity >= 2 else 0,
                                  callbacks=[KeepTrialHistory(), SignRunCallback(), *callbacks, *progress,
                                             *cfg.callbacks],
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=1, checkpoint_score_attribute=record.select_metric,
                                      checkpoint_score_order="max")),
    )


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
    if manifest.fingerprint != record.data_fingerprint:
        raise ConfigError(f"{record.data} changed since the search started (fingerprint {manifest.fingerprint}"
                          f" != {record.data_fingerprint}): a resumed search must see the same data",
                          source="--resume")
    space = parse_space(record.space_config, name=record.space)
    init_ray(address=address, num_cpus=num_cpus, worker_logs=verbosity >= 2)
    # the trial shape the run started with: a resumed trial must find its checkpoints where it left them
    plan = {**plan_resources(space, trials=record.trials, capacity=cluster_capacity()), "in_process": in_process(record.resources)}
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
    tuner = tune.Tuner.restore(restore_from, trainable=trainable(record, space, plan, manifest, storage=where.uri),
                               resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    RunSigner(where).sign_in_store("tune/tuner.pkl")  # restoring rewrote it
    return _fit(tuner, store, record.name, time_budget_s=None, tune_output=verbosity >= 2)


def _plan_sites(cfg: SearchConfig, manifest: Manifest) -> list:
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
        sources = val_sources(cfg.data)
        if len(sources) < 2:
            raise ConfigError(f"--objective worst-source needs a pooled dataset with two or more sources in its "
                              f"validation split; {cfg.data} has {', '.join(sources) or 'none'}", source="--objective")
    return [plan_site(name, path, target=cfg.target, test_fraction=cfg.site_test_fraction, seed=cfg.site_seed,
                      search_data=cfg.data) for name, path in named]


def _fit(tuner, store: RunStore, name: str, *, time_budget_s: float | None, tune_output: bool = True) -> list[dict]:
    """Run the tuner; return the leaderboard. A search stopped by its time budget returns what it
    has; one stopped by Ctrl-C (which Tune catches, saving its state) raises KeyboardInterrupt
    after writing the leaderboard, so the command exits 130 as an interrupted program does. run.json
    records when and how it ended (finished, time budget, interrupted, failed)."""
    _mark_ended(store, "")  # running (again, for a resumed search)
    how = "failed"
    try:
        board, budget_spent = _fit_board(tuner, store, name, time_budget_s=time_budget_s, tune_output=tune_output)
        if budget_spent:  # a time-budget stop, whether or not a trial reported
            how = "time budget"
        _check_board(board, store, name, budget_spent=budget_spent, time_budget_s=time_budget_s)
        if not budget_spent:
            how = "finished"
        return board
    except KeyboardInterrupt:
        how = "interrupted"
        raise
    finally:
        _mark_ended(store, f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {how}")


def _mark_ended(store: RunStore, ended: str) -> None:
    """Record in run.json when and how the search stopped ("" while it runs)."""
    try:
        record = RunRecord.load(store)
        if record.ended != ended:
            dataclasses.replace(record, ended=ended).save(store)
            RunSigner(store).sign_in_store(RunRecord.FILE)
    except (ConfigError, OSError) as exc:  # never hide why the search stopped behind this
        log.warning("could not record in run.json that the search %s: %s", ended or "runs", exc)


def _fit_board(tuner, store: RunStore, name: str, *, time_budget_s: float | None,
               tune_output: bool) -> tuple[list[dict], bool]:
    """Run the tuner and write the leaderboard: (the board, whether the time budget stopped the
    search). Raises KeyboardInterrupt when the search was interrupted (Ctrl+C, or SIGUSR1)."""
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
    if budget_spent and unfinished:
        log.warning(f"Search {name} used its time budget before every trial finished; {hint}")
    return board, budget_spent


def _check_board(board: list[dict], store: RunStore, name: str, *, budget_spent: bool,
                 time_budget_s: float | None) -> None:
    """NoEligibleTrialError, saying why, when no trial reported a validation figure. A search the time
    budget stopped is not a failure otherwise, whatever it has so far."""
    if any(row["status"] == "ok" for row in board):
        return
    hint = f"resume it with: raycxr search --resume {store.uri}"
    if budget_spent:  # Tune marks the trials it stopped at the budget TERMINATED, reported or not
        raise NoEligibleTrialError(f"the time budget ({time_budget_s / 60:g} min) of {name} ended before any "
                                   f"trial reported {METRIC}: give it more minutes, or {hint}")
    raise NoEligibleTrialError(f"no trial of {name} reported {METRIC}: see the errors above and "
                               f"the trial logs in {store.child('tune')}")


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
