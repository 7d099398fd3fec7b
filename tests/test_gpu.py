"""GPU checks, skipped (not faked) on machines without CUDA, CI's included.

A real search on the local GPU: trials that share it (0.5 GPU each), train in bf16 autocast with
channels_last, and leave no GPU memory behind once ASHA has stopped them or they finished.
Run them on a GPU machine with ``scripts/test tests/test_gpu.py``.
"""

import csv
import json
import os
import time

import pytest
import torch

from raycxr.cli import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _nvml(query):
    """``query(handle of GPU 0)`` through NVML: reads the card without a CUDA context in this process,
    so the test's own process never shows up as holding GPU memory."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return query(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()


def _gpu_memory_used_mb() -> tuple[float, list[int]]:
    """(memory used on GPU 0 in MB, pids of other processes holding some)."""
    import pynvml

    return _nvml(lambda h: (pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                            [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid != os.getpid()]))


def test_fractional_gpu_trials_train_bf16_channels_last_and_free_the_gpu(ray_local, tmp_path, sample_dir):
    import ray

    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray did not detect the GPU"
    before_mb, _ = _gpu_memory_used_mb()
    data, runs = tmp_path / "data", tmp_path / "runs"
    assert main(["ingest", "--source", f"kermany={sample_dir}", "--out", str(data), "--image-size", "64"]) == 0
    space = tmp_path / "gpu.yaml"
    # 6 trials, two at a time on one GPU; ASHA (grace 1, factor 2) stops the weaker ones early.
    space.write_text("""
trials: 6
max_epochs: 4
seed: 0
resources: {workers_per_trial: 1, cpus_per_worker: 0.9, gpus_per_worker: 0.5}
scheduler: {grace_period: 1, reduction_factor: 2}
params:
  model: [test_resnet, resnet10t]
  image_size: 64
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  batch_size: 32
""")
    assert main(["search", "--data", str(data), "--space", str(space), "--name", "gpu", "--runs-dir", str(runs),
                 "--scheduler", "asha"]) == 0

    board = list(csv.DictReader(open(runs / "gpu" / "leaderboard.csv")))
    assert len(board) == 6 and all(r["status"].startswith("ok") for r in board)
    reports = {f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
               for f in (runs / "gpu" / "tune").glob("trial_*/result.json")}
    assert len(reports) == 6
    import pynvml

    bf16 = _nvml(pynvml.nvmlDeviceGetCudaComputeCapability) >= (8, 0)  # Ampere and later
    for rows in reports.values():
        for r in rows:
            assert r["device"] == "cuda" and r["channels_last"] is True
            assert r["precision"] == ("bf16" if bf16 else "fp16")
    assert any(len(rows) < 4 for rows in reports.values()), "ASHA stopped no trial: nothing checks stopped trials"

    # Two trials shared the GPU: some pair of trials ran at the same time.
    spans = [(rows[-1]["timestamp"] - rows[-1]["time_total_s"], rows[-1]["timestamp"]) for rows in reports.values()]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for (b0, b1) in spans[i + 1:])

    # Stopped and finished trials leave nothing on the GPU (their worker processes are gone).
    deadline = time.time() + 30
    while True:
        used_mb, pids = _gpu_memory_used_mb()
        if (not pids and used_mb <= before_mb + 64) or time.time() > deadline:
            break
        time.sleep(1)
    assert not pids, f"processes still hold GPU memory after the search: {pids}"
    assert used_mb <= before_mb + 64, f"GPU memory used went from {before_mb:.0f} MB to {used_mb:.0f} MB"
