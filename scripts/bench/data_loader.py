"""Benchmark: batches per second delivered to a training loop that does no compute.

Baseline: torchvision ImageFolder + DataLoader decoding the same JPEGs every epoch (greyscale,
resize, per-sample random affine + brightness/contrast, normalise), 2 loader processes.
raycxr: the shards ingest wrote (pre-resized uint8 pixels), read through Ray Data
(materialised, ``iter_torch_batches`` with the training collate function and prefetching), then
raycxr's batched augmentation (the same kinds and strengths) on the training device.
Same images, same output size and batch size, same cores, one run; the loop only touches each
batch. Epoch 1 of raycxr includes putting the shards in the object store.

Usage: .venv/bin/python scripts/bench/data_loader.py [JPEG_ROOT] [SIZE] [EPOCHS]
(default ../shared/data/kermany224, 128 px, 3 epochs)
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAYCXR_SALT", "bench")

src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared/data/kermany224"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 128
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
BATCH = 32


def baseline() -> list[float]:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Grayscale(), transforms.Resize((size, size)),
        transforms.RandomAffine(degrees=7, translate=(0.04, 0.04), scale=(0.95, 1.05)),
        transforms.ColorJitter(brightness=0.1, contrast=0.1), transforms.ToTensor(),
        transforms.Normalize([0.5], [0.25])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(src / "train"), transform=tf), batch_size=BATCH,
                                         shuffle=True, num_workers=2, persistent_workers=True)
    rates = []
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        for x, _y in loader:
            n += 1
        rates.append(n / (time.perf_counter() - t))
    return rates


def raycxr_path() -> list[float]:
    import ray
    import torch

    from raycxr.data import open_split
    from raycxr.ingest import IngestConfig, ingest
    from raycxr.train import _collate_fn, keep_freed_memory
    from raycxr.transforms import train_input

    work = Path(tempfile.mkdtemp(prefix="raycxr-loader-"))
    ingest(IngestConfig(sources={"kermany": src}, out=work / "data", image_size=size, val_fraction=0.01,
                        holdout_fraction=0.01, near_duplicate_bits=-1))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    keep_freed_memory()  # what every training worker does first; this process plays the worker here
    gen = torch.Generator().manual_seed(0)
    collate = _collate_fn()
    rates = []
    ds = None
    for _ in range(epochs):
        t, n = time.perf_counter(), 0
        if ds is None:
            ds = open_split(work / "data", "train").materialize()
        for batch in ds.iter_torch_batches(batch_size=BATCH, collate_fn=collate, local_shuffle_buffer_size=256,
                                           prefetch_batches=2):
            train_input(batch["image"], image_size=size, mean=0.5, std=0.25, strength="light", generator=gen)
            n += 1
        rates.append(n / (time.perf_counter() - t))
    ray.shutdown()
    return rates


if __name__ == "__main__":
    torch_threads = os.cpu_count()
    b = baseline()
    r = raycxr_path()
    print(f"{src} -> {size} px, batch {BATCH}, {epochs} epochs, {os.cpu_count()} cores")
    print("ImageFolder + DataLoader (2 workers), batches/s per epoch:", ", ".join(f"{v:.1f}" for v in b))
    print("raycxr shards + Ray Data + batched augmentation, batches/s: ", ", ".join(f"{v:.1f}" for v in r))
    print(f"ratio, epochs 2+ (steady state): {sum(r[1:]) / sum(b[1:]):.2f}x; epoch 1: {r[0] / b[0]:.2f}x")
