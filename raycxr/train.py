"""train_loop_per_worker(): one trial's training, run by every Ray Train worker; make_trainer().

The loop reads its shard of the train split through Ray Data (``get_dataset_shard`` ->
``iter_torch_batches``), gets uint8 batches, augments them on the device, and after each epoch
rank 0 scores the whole validation split and reports metrics with a checkpoint. A checkpoint
holds ``model.safetensors`` (the evaluated weights: the EMA average when ``ema_decay`` is set;
loadable without pickle), ``trial.json`` (what is needed to rebuild the model) and
``train_state.pt`` (optimiser, schedule and, with EMA, the raw weights: to resume a trial).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRIC = "val_auc"
_PREFETCH_BATCHES = 2


def _collate_fn():
    """A Ray Data collate function: raw bytes -> {"image": uint8 (N,1,H,W), "labels": float (N,K), -1 unknown}."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            import torch

            from raycxr.data import decode_images, label_matrix

            return {"image": torch.from_numpy(decode_images(batch).copy()),
                    "labels": torch.from_numpy(label_matrix(batch["labels"]).astype(np.float32))}

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


def evaluate_batches(model, batches, *, image_size: int, mean: float, std: float, device) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) probabilities and (N, K) labels (-1 unknown) for batches of ``{"image", "labels"}``."""
    import torch

    from raycxr.transforms import to_model_input

    probs, labels = [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            x = to_model_input(batch["image"].to(device), image_size=image_size, mean=mean, std=std)
            probs.append(torch.sigmoid(model(x).float()).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    return np.concatenate(probs), np.concatenate(labels)


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


def save_checkpoint(directory: Path, *, model, trial: dict, train_state: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "trial.json").write_text(json.dumps(trial, indent=2, sort_keys=True))
    if train_state is not None:
        torch.save(train_state, directory / "train_state.pt")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from sklearn.metrics import log_loss, roc_auc_score

    from raycxr.config import HYPERPARAMETERS
    from raycxr.models import create_model, input_stats, onnx_cpu_latency_ms
    from raycxr.transforms import mixup, train_input

    keep_freed_memory()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"] * 1000 + rank)
    gen = torch.Generator().manual_seed(config["seed"] * 1000 + rank)
    rng = np.random.default_rng(config["seed"] * 1000 + rank)  # mixup's Beta draws
    threads = max(1, int(config.get("cpus_per_worker", 1)))
    torch.set_num_threads(threads)

    findings = config["findings"]
    target = findings.index(config["target"])
    model = create_model(config["model"], pretrained=config.get("pretrained", "none"),
                         weights_dir=config.get("weights_dir"), drop_rate=config["drop_rate"],
                         num_classes=len(findings))
    mean, std = input_stats(model)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if cuda:  # convolutions run faster on NHWC tensors with cuDNN
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    # Mixed precision on GPU: bf16 where the card has it (no loss scaling needed), else fp16 with a
    # gradient scaler. CPU trains in fp32.
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if config["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True,
                              weight_decay=config["weight_decay"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    bs = config["batch_size"]
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / world / bs))
    total_steps = steps_per_epoch * config["max_epochs"]
    warmup = int(config["warmup_epochs"] * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, warmup=warmup, total=total_steps))
    pos_weight = None
    if config["imbalance"] == "pos_weight":
        # Per finding, BCE pos_weight = negatives / positives among the train split's known labels.
        pos_weight = torch.tensor(config["pos_weight"], dtype=torch.float32, device=device)

    # Weight EMA: validation, checkpoints and promote use the averaged weights; the decay warms up
    # (timm's ModelEmaV3), so short CPU trials average over their later steps rather than the init.
    ema_decay, alpha = config.get("ema_decay", 0.0), config.get("mixup", 0.0)  # absent from older runs' configs
    ema = None
    if ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(bare, decay=ema_decay, use_warmup=True)
    evaluated = ema.module if ema is not None else bare

    start_epoch, best_val_auc = 0, float("nan")
    if (ckpt := ray.train.get_checkpoint()) is not None:
        from safetensors.torch import load_file

        with ckpt.as_directory() as d:
            evaluated.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
            state = torch.load(Path(d) / "train_state.pt", map_location="cpu", weights_only=True)
        if ema is not None:  # the checkpoint's safetensors hold the average; the raw weights are here
            bare.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        best_val_auc = float(state.get("best_val_auc", float("nan")))
        log.info("resumed from checkpoint at epoch %d", start_epoch)
        # Report the checkpoint's epoch again: when the driver died, the epochs reported since its
        # last save never reached Tune, and this checkpoint (the one Ray Train kept) would then be
        # one Tune never heard of. The leaderboard keeps the last row of each epoch.
        if state.get("metrics"):
            again = {**state["metrics"], "resumed_from_epoch": start_epoch, "reported_again": True}
            if rank == 0:
                again["checkpoint_path"] = ckpt.path
            ray.train.report(again)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    size = config["image_size"]
    trial_meta = {k: config.get(k) for k in (*HYPERPARAMETERS, "seed", "findings", "target")}
    trial_meta.update(mean=mean, std=std, ingest_image_size=config["ingest_image_size"],
                      resize=config["resize"], trial_id=config.get("trial_id", ""))

    collate = _collate_fn()
    latency_ms = None  # of the model's ONNX export on this machine's CPU, measured once after the first epoch
    for epoch in range(start_epoch, config["max_epochs"]):
        model.train()
        t0, seen, compute_s = time.perf_counter(), 0, 0.0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        # Ray moves each collated batch to the training device in its prefetch thread (pinned
        # host memory first on a GPU), so the loop below finds it there.
        for batch in train_shard.iter_torch_batches(
                batch_size=bs, collate_fn=collate, local_shuffle_buffer_size=max(4 * bs, 256),
                local_shuffle_seed=config["seed"] * 1000 + epoch, prefetch_batches=_PREFETCH_BATCHES,
                drop_last=False, pin_memory=cuda):
            c0 = time.perf_counter()
            x = train_input(batch["image"].to(device, non_blocking=True), image_size=size, mean=mean, std=std,
                            strength=config["augment"], generator=gen)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["labels"].to(device, non_blocking=True)
            if alpha:
                x, y = mixup(x, y, lam=float(rng.beta(alpha, alpha)), generator=gen)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
            loss = masked_bce(logits.float(), y, pos_weight=pos_weight, smoothing=config["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(bare, step=sched.last_epoch)
            compute_s += time.perf_counter() - c0
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        if cuda:
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0

        metrics = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, seen), "resumed_from_epoch": start_epoch,
                   "world_size": world, "device": device.type, "nodes": _worker_nodes(world),
                   "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32"),
                   "channels_last": cuda,
                   "lr": sched.get_last_lr()[0], "train_images_per_s": seen * world / max(train_s, 1e-9),
                   "train_time_s": train_s, "train_compute_s": compute_s}
        if rank == 0:
            probs, labels = evaluate_batches(
                evaluated, val_shard.iter_torch_batches(batch_size=256, collate_fn=collate),
                image_size=size, mean=mean, std=std, device=device)
            known = labels[:, target] >= 0  # validation scores the target finding where it is known
            probs, labels = probs[known, target], labels[known, target]
            both = len(np.unique(labels)) == 2
            val_auc = float(roc_auc_score(labels, probs)) if both else float("nan")
            if not math.isnan(val_auc) and not best_val_auc >= val_auc:  # running max; NaN neither starts nor ends it
                best_val_auc = val_auc
            if latency_ms is None:
                try:
                    latency_ms = onnx_cpu_latency_ms(evaluated, size)
                except Exception as exc:  # a missing latency must not cost the trial its training
                    log.warning("could not measure the ONNX latency of %s: %s", config["model"], exc)
                    latency_ms = float("nan")
            metrics.update(
                val_auc=val_auc, val_auc_best=best_val_auc, latency_ms=latency_ms,
                val_loss=float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
                val_accuracy=float(np.mean((probs >= 0.5) == labels)),
                val_images=int(len(labels)))
            with tempfile.TemporaryDirectory() as tmp:
                train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                               "best_val_auc": best_val_auc, "metrics": metrics}
                if ema is not None:
                    train_state["model"] = {k: v.detach().cpu() for k, v in bare.state_dict().items()}
                save_checkpoint(Path(tmp), model=evaluated, trial=trial_meta, train_state=train_state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:03d}")
        else:
            ray.train.report(metrics)
