"""One trial's training loop, the same for both ways a trial runs.

:func:`run_loop` builds a :class:`TrialConfig`'s trial (:func:`build_trial`: seeds, model, precision,
optimiser, schedule, EMA), resumes it from a checkpoint if there is one, then per epoch runs
:func:`train_one_epoch` and :func:`validate` (rank 0) and reports, as timm's ``train.py`` splits it.
Where batches come from and where reports go is a session's business:

- :class:`TuneSession`: a one-worker trial trains in the Tune trial's own process (reused for
  trial after trial), iterating the whole materialised train and val datasets, reporting with
  ``ray.tune.report`` and resuming from ``ray.tune.get_checkpoint()``;
- :class:`TrainSession`: each worker of a multi-worker (DDP) Ray Train ``TorchTrainer`` reads its
  shard of the train split (``get_dataset_shard``) and reports with ``ray.train.report``
  (:func:`train_loop_per_worker`).

Batches arrive as uint8 and are augmented on the device; a pooled train split's batches are first
resampled by source (:class:`SourceBalancer`: ``source_balance``). A checkpoint holds
``model.safetensors`` (the evaluated weights: the EMA average when ``ema_decay`` is set; loadable
without pickle), ``trial.json`` (what is needed to rebuild the model) and ``train_state.pt``
(optimiser, schedule and, with EMA, the raw weights: to resume a trial).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycxr.config import HYPERPARAMETERS, SOURCE_BALANCES
from raycxr.errors import ConfigError
from raycxr.models import SCHEMA_VERSION, ModelSpec

log = logging.getLogger(__name__)

METRIC = "val_auc"
# What picks a trial's best epoch (its kept checkpoint) and ranks trials, per search objective:
# internal validation AUC; the site's own films' AUC (site-val, raycxr.sites); or the worst
# per-source validation AUC of a pooled dataset. The searcher sees the running best of it
# (NAME_best), which is what the leaderboard ranks by.
SELECTION_METRICS = {"auc": METRIC, "auc-latency": METRIC, "site": "site_auc", "worst-source": "worst_source_auc"}
# One batch prepared ahead. With two, Ray Data formats batches in a pool of threads and its seeded
# local shuffle no longer gives the same order twice, so the same search gave other figures each
# time (tests/test_search_warm.py). The data path still delivers far more batches per second
# than a CPU trains on (BENCHMARKS.md, training data path).
_PREFETCH_BATCHES = 1


def _collate_fn(sources: tuple = ()):
    """A Ray Data collate function: raw bytes -> {"image": uint8 (N,1,H,W), "labels": float (N,K), -1 unknown},
    and, for a batch with a ``source`` column, "source": each row's index into ``sources`` (int64)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    codes = {s: i for i, s in enumerate(sources)}

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            import torch

            from raycxr.data import decode_images, label_matrix

            out = {"image": torch.from_numpy(decode_images(batch).copy()),
                   "labels": torch.from_numpy(label_matrix(batch["labels"]).astype(np.float32))}
            if "source" in batch:
                out["source"] = torch.tensor([codes.get(str(s), -1) for s in batch["source"]], dtype=torch.int64)
            return out

    return _Collate()


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS at once.

    A batch, its augmentation and the activations are CPU tensors of a few MB, which glibc
    otherwise maps and unmaps on every step, so every step page-faults them in again: on the
    2-core machine that more than doubled the augmentation's time per batch and made the data
    path's speed swing from run to run (scripts/bench/data_loader.py, BENCHMARKS.md). Each
    training worker calls this once. glibc (Linux) only; elsewhere it does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: blocks under 32 MB (glibc's maximum) come from the heap
    mallopt(-1, 2**30)       # M_TRIM_THRESHOLD: keep up to 1 GB of freed heap for reuse


def _lr_lambda(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 1% of the peak, as a multiplier of the peak lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))


def masked_bce(logits, targets, *, pos_weight=None, smoothing: float = 0.0):
    """Mean BCE over the known entries of (N, K) targets (-1 = unknown, masked out)."""
    import torch.nn.functional as F

    known = targets >= 0
    y = targets.clamp(min=0)
    if smoothing:
        y = y * (1 - smoothing) + 0.5 * smoothing
    loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def _worker_nodes(world: int) -> str:
    """The Ray node ids this epoch's workers ran on, rank order, comma-separated: so a trial that moved
    (a lost node, a retry) or a DDP trial spread over nodes shows it in its results."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return node
    import torch.distributed as dist

    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return ",".join(nodes)


# --- Typed hand-offs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialConfig:
    """One trial's settings: a field per searchable hyperparameter (``config.PARAMS``: a test keeps the
    two equal) plus the static ones every trial of a search shares. The training loop reads nothing else."""

    # static settings the search fills in
    seed: int
    findings: tuple
    target: str
    max_epochs: int
    train_rows: int
    ingest_image_size: int
    resize: str
    pos_weight: tuple
    # the searchable hyperparameters (config.PARAMS; None where a space leaves one at its default)
    model: str | None = None
    lr: float | None = None
    image_size: int | None = None
    augment: str | None = None
    equalize: str | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    imbalance: str | None = None
    label_smoothing: float | None = None
    warmup_epochs: float | None = None
    drop_rate: float | None = None
    ema_decay: float | None = None
    mixup: float | None = None
    pretrained: str | None = None
    precision: str | None = None
    source_balance: str | None = None
    # static, with defaults
    cpus_per_worker: float = 1.0
    weights_dir: str | None = None
    trial_id: str = ""
    select_metric: str = METRIC      # what picks the best epoch (SELECTION_METRICS)
    sites: tuple = ()                # the site-val datasets' names
    sources: tuple = ()              # the validation split's sources, when two or more (per-source figures)
    train_sources: tuple = ()        # the train split's sources (sorted), when two or more ...
    train_source_counts: tuple = ()  # ... and rows of each: what source_balance weighs (source_weights)

    @classmethod
    def from_tune(cls, config: dict) -> TrialConfig:
        """Build from Tune's config (the space's sampled values plus the search's static settings)."""
        from raycxr.config import PARAMS

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ConfigError(f"unknown trial setting(s) {unknown}", source="trial config")
        values = {k: config[k] for k in names if k in config}
        for k, (_, _, default) in PARAMS.items():  # absent from older runs' trials: the documented default
            if values.get(k) is None and isinstance(default, (int, float, str)):
                values[k] = default
        for k in ("findings", "pos_weight", "sites", "sources", "train_sources", "train_source_counts"):
            if k in values:
                values[k] = tuple(values[k])
        return cls(**values)

    def hyperparameters(self) -> dict:
        from raycxr.config import PARAMS

        return {k: getattr(self, k) for k in PARAMS}


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint's ``trial.json``: the network (:class:`ModelSpec`), the trial's hyperparameters
    and seed. Written by the training loop, read by promote; nothing else reads the file."""

    spec: ModelSpec
    hyperparameters: dict
    seed: int = 0

    FILE = "trial.json"

    def save(self, directory: Path) -> None:
        doc = {"schema_version": SCHEMA_VERSION, "spec": self.spec.to_dict(),
               "hyperparameters": self.hyperparameters, "seed": self.seed}
        (Path(directory) / self.FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "CheckpointRecord":
        from raycxr.models import read_json_spec

        path = Path(directory) / cls.FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path} ({type(exc).__name__}): is {directory} a raycxr checkpoint?",
                              source=str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError("must be a JSON object", source=str(path))
        if "schema_version" not in raw:  # raycxr <= 0.1 wrote the trial's config flat
            spec = {"architecture": raw.get("model"), "stored_size": raw.get("ingest_image_size"),
                    **{k: raw.get(k) for k in ("findings", "target", "image_size", "resize", "mean", "std",
                                               "drop_rate", "pretrained", "trial_id") if raw.get(k) is not None}}
            raw = {"spec": spec, "hyperparameters": {k: v for k, v in raw.items() if k in HYPERPARAMETERS},
                   "seed": raw.get("seed", 0)}
        elif raw["schema_version"] != SCHEMA_VERSION:
            raise ConfigError(f"schema_version {raw['schema_version']!r}: written by another raycxr version "
                              f"(this one reads {SCHEMA_VERSION})", source=str(path))
        return cls(spec=read_json_spec(raw.get("spec"), source=str(path)),
                   hyperparameters=dict(raw.get("hyperparameters") or {}), seed=int(raw.get("seed") or 0))


def save_checkpoint(directory: Path, *, model, record: CheckpointRecord, train_state: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    record.save(directory)
    if train_state is not None:
        torch.save(train_state, directory / "train_state.pt")


# --- The loop -----------------------------------------------------------------------------------

@dataclass
class _Trial:
    """What one worker builds for a trial: the model, its optimisation and where it runs."""

    cfg: Any
    spec: ModelSpec
    model: Any              # as trained (DDP-wrapped when several workers)
    bare: Any               # the raw module
    evaluated: Any          # what validation and checkpoints use: the EMA average, else ``bare``
    ema: Any
    opt: Any
    sched: Any
    scaler: Any
    amp_dtype: Any
    precision: Any          # raycxr.precision.Precision: autocast dtype and layout
    device: Any
    pos_weight: Any
    rank: int
    world: int
    gen: Any
    rng: Any


def build_trial(cfg, *, rank: int, world: int, device, prepare=lambda m: m) -> _Trial:
    """Seeds, model, precision, optimiser, schedule and EMA of one trial on one worker.

    ``prepare`` wraps the model for distributed training (``ray.train.torch.prepare_model``).
    """
    import torch

    from raycxr.models import create_model, input_stats
    from raycxr.precision import resolve as resolve_precision
    from raycxr.precision import set_cpu_threads

    seed = cfg.seed * 1000 + rank
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)  # mixup's Beta draws
    set_cpu_threads(cfg.cpus_per_worker)
    model = create_model(cfg.model, pretrained=cfg.pretrained or "none", weights_dir=cfg.weights_dir,
                         drop_rate=cfg.drop_rate, num_classes=len(cfg.findings))
    mean, std = input_stats(model)
    spec = ModelSpec(architecture=cfg.model, findings=tuple(cfg.findings), target=cfg.target,
                     image_size=cfg.image_size, stored_size=cfg.ingest_image_size, resize=cfg.resize, mean=mean,
                     std=std, drop_rate=cfg.drop_rate, pretrained=cfg.pretrained or "none", trial_id=cfg.trial_id,
                     equalize=cfg.equalize or "none")
    # autocast dtype and memory layout for this device and network (raycxr.precision): bf16 on GPUs
    # and on CPUs with AMX/AVX512-BF16 under `auto`, fp16 with a gradient scaler on older GPUs
    precision = resolve_precision(cfg.precision or "auto", device=device, model=model)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = prepare(model.to(device))
    bare = model.module if hasattr(model, "module") else model
    amp_dtype = precision.dtype
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(cfg.train_rows / world / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.max_epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, warmup=warmup, total=total_steps))
    pos_weight = None
    if cfg.imbalance == "pos_weight":
        # Per finding, BCE pos_weight = negatives / positives among the train split's known labels.
        pos_weight = torch.tensor(cfg.pos_weight, dtype=torch.float32, device=device)
    # Weight EMA: validation, checkpoints and promote use the averaged weights; the decay warms up
    # (timm's ModelEmaV3), so short CPU trials average over their later steps rather than the init.
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(bare, decay=cfg.ema_decay, use_warmup=True)
    return _Trial(cfg=cfg, spec=spec, model=model, bare=bare, evaluated=ema.module if ema is not None else bare,
                  ema=ema, opt=opt, sched=sched, scaler=scaler, amp_dtype=amp_dtype, precision=precision, device=device,
                  pos_weight=pos_weight, rank=rank, world=world, gen=gen, rng=rng)


# --- Source balance -----------------------------------------------------------------------------
# A pooled train split can hold one source 70 times the size of another (issue 36: Kermany's 5,856
# films beside Montgomery's 138; NIH's 112,120). `source_balance` evens their shares of each epoch
# by resampling every batch as it streams past: a row of weight w is trained floor(w) times and once
# more with probability frac(w), so a rare source's rows repeat and a large one's are thinned. Not a
# global weighted sampler (torch's WeightedRandomSampler): that needs random access to the whole
# split, and a streamed split (read block by block from storage by each worker; streaming_split
# under DDP) is held whole by no process. A row's draw needs only its own source, so each batch on
# each worker is resampled alone and the epoch keeps each source's share in expectation.


def source_weights(counts, how: str) -> np.ndarray:
    """Each source's weight: how many times, in expectation, an epoch trains one of its rows, chosen
    so that the epoch keeps about N = sum(counts) rows. ``none``: 1; ``equal``: each of the S sources
    gives N/S rows, w_s = N / (S n_s); ``sqrt``: shares proportional to sqrt(n_s),
    w_s = N sqrt(n_s) / (sum_t sqrt(n_t) n_s)."""
    if how not in SOURCE_BALANCES:
        raise ValueError(f"unknown source_balance {how!r}; use one of {', '.join(SOURCE_BALANCES)}")
    n = np.asarray(counts, dtype=np.float64)
    if how == "none":
        return np.ones(len(n))
    share = np.where(n > 0, np.sqrt(n) if how == "sqrt" else 1.0, 0.0)
    return np.divide(n.sum() * share / max(share.sum(), 1e-300), n, out=np.zeros(len(n)), where=n > 0)


def balance_batch(batch: dict, weights: np.ndarray, rng: np.random.Generator, *, keep_one: bool = False) -> dict | None:
    """``batch`` (tensors, with ``source`` codes indexing ``weights``) with each row repeated floor(w)
    times and once more with probability frac(w), w its source's weight (1 for a code outside
    ``weights``). None when every row was thinned away, unless ``keep_one``: then one row, drawn at
    random, stays."""
    import torch

    # The batch's sizes depend on the draws, so the codes come to the host (a sync on a GPU).
    codes = batch["source"].cpu().numpy()
    known = (codes >= 0) & (codes < len(weights))
    w = np.where(known, weights[np.where(known, codes, 0)], 1.0) if len(weights) else np.ones(len(codes))
    repeats = np.floor(w).astype(np.int64) + (rng.random(len(w)) < w - np.floor(w))
    if not repeats.any():
        if not keep_one or not len(repeats):
            return None
        repeats[rng.integers(len(repeats))] = 1
    index = torch.from_numpy(np.repeat(np.arange(len(repeats)), repeats)).to(batch["source"].device)
    return {k: v[index] for k, v in batch.items()}


class SourceBalancer:
    """One epoch's source balance on one worker: wraps its batch iterator, resampling each batch
    (:func:`balance_batch`, weights from ``cfg.source_balance`` over ``cfg.train_sources``), and counts
    the rows trained per source. The draws come from a generator seeded by (trial seed, epoch, rank),
    so an epoch, resumed or repeated, trains the same rows.

    A batch thinned to nothing is skipped on one worker. Under DDP it keeps one row instead: every
    rank must take the same number of steps, or the gradient all-reduce waits forever.
    """

    def __init__(self, cfg, *, epoch: int, rank: int, world: int, device):
        import torch

        self.sources, self.world = tuple(cfg.train_sources), world
        self.weights = source_weights(cfg.train_source_counts, cfg.source_balance or "none")
        self.rng = np.random.default_rng([cfg.seed, epoch, rank])
        self.codes = torch.arange(len(self.sources), device=device)
        # rows trained per source, summed on the device: no host sync per batch (torch.bincount
        # would sync for its output size)
        self.rows = torch.zeros(len(self.sources), dtype=torch.int64, device=device)

    def __call__(self, batches):
        resample = bool((self.weights != 1).any())
        for batch in batches:
            if resample and (batch := balance_batch(batch, self.weights, self.rng, keep_one=self.world > 1)) is None:
                continue
            self.rows += (batch["source"][:, None] == self.codes).sum(0)
            yield batch

    def metrics(self) -> dict:
        """``source_weight/NAME`` and ``train_rows/NAME`` (over every worker of the trial). Every rank
        calls it (an all-reduce under DDP)."""
        rows = self.rows.clone()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(rows)
        out = {f"source_weight/{s}": float(w) for s, w in zip(self.sources, self.weights)}
        out.update({f"train_rows/{s}": int(n) for s, n in zip(self.sources, rows.tolist())})
        return out


def train_one_epoch(t: _Trial, batches) -> dict:
    """One pass over ``batches`` of ``{"image": uint8 (N,1,H,W), "labels": (N,K)}``: augment on the
    device, forward, masked BCE, backward, step, schedule, EMA. Returns the epoch's training figures."""
    import torch

    from raycxr.transforms import mixup, train_input

    cfg, device = t.cfg, t.device
    cuda = device.type == "cuda"
    t.model.train()
    t0, seen, compute_s, first_s = time.perf_counter(), 0, 0.0, None
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    for batch in batches:
        c0 = time.perf_counter()
        if first_s is None:
            first_s = c0 - t0
        x = train_input(batch["image"].to(device, non_blocking=True), image_size=cfg.image_size, mean=t.spec.mean,
                        std=t.spec.std, strength=cfg.augment, equalize=t.spec.equalize, generator=t.gen)
        if t.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["labels"].to(device, non_blocking=True)
        if cfg.mixup:
            x, y = mixup(x, y, lam=float(t.rng.beta(cfg.mixup, cfg.mixup)), generator=t.gen)
        with torch.autocast(device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
            out = t.model(x)
        loss = masked_bce(out.float(), y, pos_weight=t.pos_weight, smoothing=cfg.label_smoothing)
        t.opt.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
        t.sched.step()
        if t.ema is not None:
            t.ema.update(t.bare, step=t.sched.last_epoch)
        compute_s += time.perf_counter() - c0
        seen += len(y)
        loss_sum += loss.detach() * len(y)
    if cuda:
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    return {"train_loss": loss_sum.item() / max(1, seen), "lr": t.sched.get_last_lr()[0],
            "train_images_per_s": seen * t.world / max(train_s, 1e-9), "train_time_s": train_s,
            "train_compute_s": compute_s, "train_first_batch_s": train_s if first_s is None else first_s}


def _scores(t: _Trial, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(target logits, 0/1 labels, source codes or None) of the evaluated weights over ``batches``,
    rows with a known target label only. Scores through :func:`raycxr.predict.target_logits` (the
    path promote, evaluate and predict use)."""
    from raycxr.predict import target_logits

    z, labels, codes = [], [], []
    for batch in batches:
        z.append(target_logits(t.evaluated, t.spec, batch["image"], device=t.device))
        labels.append(batch["labels"][:, t.spec.target_index].cpu().numpy())
        if "source" in batch:
            codes.append(batch["source"].cpu().numpy())
    z, labels = (np.concatenate(z), np.concatenate(labels)) if z else (np.zeros(0), np.zeros(0))
    known = labels >= 0
    return z[known], labels[known].astype(int), np.concatenate(codes)[known] if codes else None


def _figures(z: np.ndarray, y: np.ndarray) -> dict:
    """AUC (on the logits: a sigmoid does not change a ranking), log-loss and accuracy at 0.5 of the
    uncalibrated sigmoid; NaN where a figure is undefined (one class, no rows)."""
    from scipy.special import expit
    from sklearn.metrics import log_loss, roc_auc_score

    probs = expit(z)
    return {"auc": float(roc_auc_score(y, z)) if len(np.unique(y)) == 2 else float("nan"),
            "loss": float(log_loss(y, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])) if len(z) else float("nan"),
            "accuracy": float(np.mean((probs >= 0.5) == y)) if len(z) else float("nan"), "n": int(len(y))}


def validate(t: _Trial, batches) -> dict:
    """Validation figures of the evaluated weights on the target finding, where it is known.

    With two or more sources in validation (``cfg.sources``), also each source's AUC
    (``source_auc/NAME``) and the worst of them (``worst_source_auc``, ``worst_source``): how the
    model ranks films of its weakest source, the figure ``--objective worst-source`` selects by.
    """
    z, y, codes = _scores(t, batches)
    f = _figures(z, y)
    out = {"val_auc": f["auc"], "val_loss": f["loss"], "val_accuracy": f["accuracy"], "val_images": f["n"]}
    if codes is not None and len(t.cfg.sources) >= 2:
        per = {src: _figures(z[codes == i], y[codes == i])["auc"] for i, src in enumerate(t.cfg.sources)}
        out.update({f"source_auc/{src}": v for src, v in per.items()})
        scored = {src: v for src, v in per.items() if not math.isnan(v)}  # a one-class source has no AUC
        worst = min(scored, key=scored.get) if scored else ""
        out.update(worst_source_auc=scored.get(worst, float("nan")), worst_source=worst)
    return out


def validate_sites(t: _Trial, sites: dict) -> dict:
    """Each site's site-val figures (``site_auc/NAME``, ``site_loss/NAME``: the model's own
    sigmoid, uncalibrated) and their mean over sites (``site_auc``, ``site_loss``).
    ``sites``: name -> batches."""
    per = {name: _figures(*_scores(t, batches)[:2]) for name, batches in sites.items()}
    out = {}
    for name, f in per.items():
        out[f"site_auc/{name}"], out[f"site_loss/{name}"] = f["auc"], f["loss"]
    out["site_auc"] = float(np.mean([f["auc"] for f in per.values()]))
    out["site_loss"] = float(np.mean([f["loss"] for f in per.values()]))
    return out


def surviving_checkpoint(ckpt):
    """The checkpoint to resume from: ``ckpt`` (the one Ray hands a restored trial), or, when Ray has
    deleted it since, the newest complete checkpoint the same trial folder still holds; None when
    none survives (the trial starts again from its first epoch, with a warning).

    Ray keeps a trial's best checkpoint and its latest, and deletes the previous latest as soon as a
    newer one is registered; the search's saved state names the latest at its last save (every few
    seconds). A driver killed between the two resumes the trial from a checkpoint that is gone.
    """
    if ckpt is None:
        return None
    import pyarrow.fs as pafs

    fs = ckpt.filesystem

    def train_state(path: str):
        """The checkpoint's train_state.pt entry when the checkpoint is complete, else None."""
        weights, state = fs.get_file_info([f"{path}/model.safetensors", f"{path}/train_state.pt"])
        return state if weights.type == state.type == pafs.FileType.File else None

    if train_state(ckpt.path) is not None:
        return ckpt
    trial_dir = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    kept = [(state.mtime_ns or 0, d.path) for d in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
            if d.type == pafs.FileType.Directory and (state := train_state(d.path)) is not None]
    if not kept:
        log.warning("the checkpoint to resume from (%s) is gone and the trial folder holds no other: the trial "
                    "starts again from its first epoch", ckpt.path)
        return None
    _, newest = max(kept)
    log.warning("the checkpoint to resume from (%s) was deleted by Ray after the search last saved its state: "
                "resuming from %s, the newest checkpoint the trial kept", ckpt.path, newest)
    return type(ckpt)(path=newest, filesystem=fs)


def _resume(t: _Trial, ckpt) -> tuple[int, float, float, dict | None]:
    """(first epoch to run, best validation AUC so far, best selection score so far, the checkpoint's
    metrics) from a checkpoint."""
    import torch
    from safetensors.torch import load_file

    with ckpt.as_directory() as d:
        t.evaluated.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
        state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=True)
    if t.ema is not None:  # the checkpoint's safetensors hold the average; the raw weights are here
        t.bare.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    best = state.get("best_score", state.get("best_val_auc", float("nan")))  # raycxr <= 0.3: val AUC only
    return (int(state["epoch"]) + 1, float(state.get("best_val_auc", float("nan"))), float(best),
            state.get("metrics"))


class TrainSession:
    """How the loop meets Ray when it runs on a Ray Train worker (a multi-worker, DDP trial):
    the worker's shard of the train split, its rank and device, ``ray.train.report``."""

    report_again = True  # Ray Train keeps checkpoints Tune may not have heard of (see run_loop)

    def __init__(self, *, sites: tuple = ()):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.prepare = ray.train.torch.prepare_model
        self.train, self.val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
        # each site's site-val films, whole on every worker (validation runs on rank 0): site_dataset_key
        self.sites = {name: ray.train.get_dataset_shard(site_dataset_key(name)) for name in sites}

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, *, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


class TuneSession:
    """How the loop meets Ray when it runs in the Tune trial's own process (a one-worker trial):
    the whole materialised train and val datasets, ``ray.tune.report`` and ``ray.tune.get_checkpoint``.
    No Ray Train controller, worker group or dataset coordinator: the process Tune keeps for
    trial after trial (``reuse_actors``) trains each of them."""

    report_again = False  # Tune restores a trial from a checkpoint it registered itself
    rank, world = 0, 1

    def __init__(self, train_ds, val_ds, *, use_gpu: bool, sites: dict | None = None):
        import torch

        self.train, self.val = train_ds, val_ds
        self.sites = dict(sites or {})  # site name -> its site-val dataset
        # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU (whole or a fraction): it is cuda:0 here.
        self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.prepare = lambda m: m

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, *, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)  # Tune names its folders checkpoint_NNNNNN


# Batch-1 ONNX latency per (architecture, input size) measured in this process: it depends on
# neither the weights nor the hyperparameters, so a warm trial process measures each shape once.
_LATENCIES: dict[tuple[str, int], float] = {}


def _latency_ms(model, architecture: str, image_size: int) -> float:
    from raycxr.models import onnx_cpu_latency_ms

    key = (architecture, image_size)
    if key not in _LATENCIES:
        try:
            _LATENCIES[key] = onnx_cpu_latency_ms(model, image_size)
        except Exception as exc:  # a missing latency must not cost the trial its training
            log.warning("could not measure the ONNX latency of %s: %s", architecture, exc)
            return float("nan")
    return _LATENCIES[key]


def site_dataset_key(name: str) -> str:
    """The name a site's site-val dataset goes by among a TorchTrainer's datasets."""
    return f"site:{name}"


def _running_max(best: float, value: float) -> float:
    """The running best of a figure; a NaN (undefined that epoch) neither starts nor ends it."""
    return value if not math.isnan(value) and not best >= value else best


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One trial on one Ray Train worker (a multi-worker trial): :func:`run_loop` over Ray Train."""
    cfg = TrialConfig.from_tune(config)
    run_loop(cfg, TrainSession(sites=cfg.sites))


def run_loop(cfg, session) -> None:
    """One trial on one worker: build, resume, then per epoch train, validate (rank 0), report.

    ``session`` is a :class:`TrainSession` or a :class:`TuneSession`: the only difference between a
    DDP trial and one trained in Tune's own process is where batches come from and where reports go.
    """

    keep_freed_memory()
    t = build_trial(cfg, rank=session.rank, world=session.world, device=session.device, prepare=session.prepare)
    start_epoch, best_val_auc, best_score = 0, float("nan"), float("nan")
    if (ckpt := surviving_checkpoint(session.checkpoint())) is not None:
        start_epoch, best_val_auc, best_score, metrics = _resume(t, ckpt)
        log.info("resumed from checkpoint at epoch %d", start_epoch)
        # Report the checkpoint's epoch again: when the driver died, the epochs reported since its
        # last save never reached Tune, and this checkpoint (the one Ray Train kept) would then be
        # one Tune never heard of. The leaderboard keeps the last row of each epoch.
        if metrics and session.report_again:
            again = {**metrics, "resumed_from_epoch": start_epoch, "reported_again": True}
            if t.rank == 0:
                again["checkpoint_path"] = ckpt.path
            session.report(again)

    record = CheckpointRecord(spec=t.spec, hyperparameters=cfg.hyperparameters(), seed=cfg.seed)
    collate, val_collate = _collate_fn(), _collate_fn(cfg.sources)
    # a pooled train split's batches carry source codes: source_balance resamples by them
    train_collate = _collate_fn(cfg.train_sources)
    pooled = len(cfg.train_sources) >= 2
    cuda = t.device.type == "cuda"
    latency_ms = None  # of the model's ONNX export on this machine's CPU, measured once after the first epoch
    for epoch in range(start_epoch, cfg.max_epochs):
        # Ray moves each collated batch to the training device in its prefetch thread (pinned
        # host memory first on a GPU), so the loop finds it there.
        batches = session.train.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=train_collate, local_shuffle_buffer_size=max(4 * cfg.batch_size, 256),
            local_shuffle_seed=cfg.seed * 1000 + epoch, prefetch_batches=_PREFETCH_BATCHES, drop_last=False,
            pin_memory=cuda, device=t.device)
        balancer = SourceBalancer(cfg, epoch=epoch, rank=t.rank, world=t.world, device=t.device) if pooled else None
        metrics = train_one_epoch(t, balancer(batches) if balancer else batches)
        if balancer:
            metrics.update(balancer.metrics())
        metrics.update({"epoch": epoch + 1, "resumed_from_epoch": start_epoch, "world_size": t.world,
                        "device": t.device.type, "nodes": _worker_nodes(t.world),
                        "precision": t.precision.name, "channels_last": t.precision.channels_last})
        if t.rank != 0:
            session.report(metrics)
            continue
        v0 = time.perf_counter()
        metrics.update(validate(t, session.val.iter_torch_batches(batch_size=256, collate_fn=val_collate,
                                                                   device=t.device)))
        if session.sites:
            metrics.update(validate_sites(t, {name: ds.iter_torch_batches(batch_size=256, collate_fn=collate,
                                                                          device=t.device)
                                              for name, ds in session.sites.items()}))
        metrics["val_time_s"] = time.perf_counter() - v0
        best_val_auc = _running_max(best_val_auc, metrics["val_auc"])
        best_score = _running_max(best_score, metrics.get(cfg.select_metric, float("nan")))
        if latency_ms is None:
            latency_ms = _latency_ms(t.evaluated, cfg.model, cfg.image_size)
        metrics.update({"val_auc_best": best_val_auc, f"{cfg.select_metric}_best": best_score,
                        "latency_ms": latency_ms})
        with tempfile.TemporaryDirectory() as tmp:
            c0 = time.perf_counter()
            train_state = {"optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(), "epoch": epoch,
                           "best_val_auc": best_val_auc, "best_score": best_score, "metrics": metrics}
            if t.ema is not None:
                train_state["model"] = {k: v.detach().cpu() for k, v in t.bare.state_dict().items()}
            save_checkpoint(Path(tmp), model=t.evaluated, record=record, train_state=train_state)
            metrics["checkpoint_write_s"] = time.perf_counter() - c0
            session.report(metrics, checkpoint_dir=tmp, name=f"epoch_{epoch + 1:03d}")
