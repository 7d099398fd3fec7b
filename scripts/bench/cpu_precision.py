"""Benchmark: CPU training throughput in fp32, fp32 + channels_last, bf16 autocast and bf16 +
channels_last, per architecture of the CPU search spaces at their image sizes, on 1 and 2 threads.

One training step = raycxr's network (timm, 1-channel input, one logit), forward, masked BCE,
backward, AdamW step, on a batch of 32 random inputs (the step's cost does not depend on the
pixels). Each (model, size, threads, mode) times ``--steps`` steps after ``--warmup`` steps, in
this one process, one after the other; images/s per core = images / time / threads. The column
``auto`` is what ``precision: auto`` picks on this machine (raycxr.precision.resolve) and its
ratio over plain fp32, measured in the same run.

Run alone on the machine (no Ray, search or test run beside it).

Usage: .venv/bin/python scripts/bench/cpu_precision.py [--spaces cpu_pretrained cpu_robust cpu]
       [--extra densenet121@128 resnet50@128] [--threads 1 2] [--steps 5] [--warmup 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from raycxr.config import load_space
from raycxr.models import create_model
from raycxr.precision import Precision, cpu_flags, resolve
from raycxr.train import masked_bce

MODES = {"fp32": Precision(None, False), "fp32+cl": Precision(None, True),
         "bf16": Precision(torch.bfloat16, False), "bf16+cl": Precision(torch.bfloat16, True)}


def _shapes(spaces: list[str], extra: list[str]) -> list[tuple[str, int]]:
    out = []
    for name in spaces:
        space = load_space(name)
        sizes = space.values_of("image_size") if "image_size" in space.params else [224]
        out += [(m, int(s)) for m in space.values_of("model") for s in sizes]
    out += [(e.split("@")[0], int(e.split("@")[1])) for e in extra]
    return list(dict.fromkeys(out))


def images_per_s(model_name: str, size: int, mode: Precision, *, threads: int, steps: int, warmup: int,
                 batch: int = 32) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1).train()
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size)
    if mode.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1) > 0.5).float()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=mode.dtype or torch.bfloat16, enabled=mode.dtype is not None):
            out = model(x)
        loss = masked_bce(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spaces", nargs="*", default=["cpu_pretrained", "cpu_robust", "cpu"])
    ap.add_argument("--extra", nargs="*", default=["densenet121@128", "resnet50@128"])
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_interop_threads(1)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "avx512_vnni")
             if f" {f} " in lscpu + " "]
    print(f"# {platform.node()} | {model_name} | lscpu flags: {' '.join(flags)} | torch sees {cpu_flags()} | "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = []
    print("| model @ px | threads | fp32 | fp32 + cl | bf16 | bf16 + cl | auto picks | auto / fp32 | best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, size in _shapes(args.spaces, args.extra):
        auto = resolve("auto", device=torch.device("cpu"), model=create_model(name, num_classes=1))
        auto_mode = {(p.dtype, p.channels_last): k for k, p in MODES.items()}[(auto.dtype, auto.channels_last)]
        for threads in args.threads:
            per_core = {k: images_per_s(name, size, m, threads=threads, steps=args.steps, warmup=args.warmup) / threads
                        for k, m in MODES.items()}
            best = max(per_core, key=per_core.get)
            rows.append({"model": name, "image_size": size, "threads": threads, "images_per_s_per_core": per_core,
                         "auto": auto_mode})
            print(f"| {name} @ {size} | {threads} | " + " | ".join(f"{per_core[k]:.1f}" for k in MODES) +
                  f" | {auto_mode} | {per_core[auto_mode] / per_core['fp32']:.2f}x | {best} "
                  f"({per_core[best] / per_core['fp32']:.2f}x) |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"flags": flags, "cpu": model_name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
