"""The search's Tune trainables: one trial in Tune's own reused process (:func:`run_trial_in_process`,
one worker) or as a Ray Train TorchTrainer (:func:`run_trial`, DDP), and :func:`trainable`, which
binds either to the shared datasets and settings, choosing how trials read the train split
(:func:`data_path_for`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from raycxr.config import SearchSpace
from raycxr.errors import ConfigError
from raycxr.runs import RunRecord

if TYPE_CHECKING:
    from raycxr.data import Manifest

log = logging.getLogger("raycxr.search")  # the search's own lines, under the search's name

# The Tune function that drives one TorchTrainer needs almost no CPU; Ray refuses 0.
_TRIAL_DRIVER_CPU = 0.001

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


def in_process(plan: dict) -> bool:
    """Whether a search's trials train in Tune's own (reused) trial processes: one-worker trials,
    unless the space says ``resources.trainer: ray-train``. Several workers (DDP) need Ray Train's
    TorchTrainer. A run started before in-process trials existed (no ``in_process`` in its recorded
    plan) used TorchTrainer for every trial."""
    return bool(plan.get("in_process"))


def trainable(record: RunRecord, space: SearchSpace, plan: dict, manifest: Manifest, *, storage: str):
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
    sources = val_sources(data)
    # rows per source of a pooled train split (source_balance weighs them; batches carry the source)
    train_counts = dict(sorted(manifest.counts["train"]["by_source"].items()))
    train_counts = train_counts if len(train_counts) >= 2 else {}
    train_columns = ["source"] if train_counts else []
    streamed = StreamedSplit.open(data, "train", extra_columns=train_columns)
    path, why = data_path_for(record.data_path, streamed.nbytes(), ray.cluster_resources().get("object_store_memory", 0))
    log.info(f"Data: {why}")
    # Materialised: read once into the object store (from a folder or a URI), shared by every trial:
    # epochs and trials re-read nothing. Streamed: each trial's epochs read the shards themselves.
    train_ds = streamed if path == "stream" else open_split(data, "train", extra_columns=train_columns).materialize()
    val_columns = ["source"] if len(sources) >= 2 else []
    # validation is read once into the object store; streamed, by Ray tasks (the driver never holds the
    # pixels: at 200k films validation alone is 1.5 GB), materialised, by the driver as the train split is
    val_ds = (StreamedSplit.open(data, "val", extra_columns=val_columns).dataset() if path == "stream"
              else open_split(data, "val", extra_columns=val_columns)).materialize()
    site_ds = {site.name: site_dataset(site, "site-val", record.target).materialize()
               for site in record.site_records()}
    ingest_size = manifest.image_size
    static = {
        "workers": plan["workers"], "worker_cpu_request": plan["worker_cpu_request"],
        "gpus_per_worker": plan["gpus_per_worker"], "max_failures": record.max_failures,
        "trials_path": storage.rstrip("/") + "/trials",
        "loop": {"max_epochs": record.max_epochs, "seed": space.seed, "train_rows": int(len(labels)),
                 "findings": list(FINDINGS), "target": record.target, "pos_weight": _pos_weight(labels),
                 "ingest_image_size": ingest_size, "resize": manifest.params["resize"],
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


def val_sources(data: str | Path) -> list[str]:
    """The sources of a dataset's validation split, sorted."""
    from raycxr.data import read_manifest

    return sorted(read_manifest(data).counts["val"]["by_source"])


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
