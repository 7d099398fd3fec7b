"""Benchmark (GPU): training images/s of a real raycxr trial against timm's model-only throughput.

Same card, model, image size, batch size, optimiser (AdamW), bf16 autocast and channels_last, in
one run:
  model only  the timm model (as raycxr builds it: 1 channel, one logit per finding) training on
              one synthetic batch that already sits on the GPU: the most the card can do.
  raycxr      one real `raycxr search` trial: N real chest X-rays (the bundled sample, each copy
              cropped and brightened a little so that ingest keeps them apart) ingested to uint8
              shards -> Ray Data -> `iter_torch_batches` (pinned, moved to the GPU in Ray's
              prefetch thread) -> batched augmentation on the GPU -> the same training step. Its
              own `train_images_per_s` (epoch loop wall time, waiting for data included), epochs 2+.

Usage: python scripts/bench/gpu_throughput.py [MODEL] [SIZE] [BATCH] [IMAGES] [EPOCHS]
(default resnet50 224 128 16000 3). Writes gpu_throughput.json to $OUT when that is set.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAYCXR_SALT", "bench")

args = sys.argv[1:] + [None] * 5
MODEL = args[0] or "resnet50"
SIZE, BATCH, IMAGES, EPOCHS = (int(a) if a else d for a, d in zip(args[1:5], (224, 128, 16000, 3)))


def model_only(steps: int = 60, warmup: int = 15) -> float:
    import torch

    from raycxr.labels import FINDINGS
    from raycxr.models import create_model
    from raycxr.train import masked_bce

    dev = torch.device("cuda")
    model = create_model(MODEL, num_classes=len(FINDINGS)).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH, len(FINDINGS)), device=dev).float()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
        loss = masked_bce(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps * BATCH / (time.perf_counter() - t)
    del model, opt
    torch.cuda.empty_cache()
    return rate


def _make_images(root: Path, indices: range) -> None:
    import numpy as np
    from PIL import Image, ImageEnhance

    sources = sorted((ROOT / "sample" / "kermany-mini").rglob("*.jpeg"))
    for i in indices:
        rng = np.random.default_rng(i)
        src = sources[i % len(sources)]
        with Image.open(src) as im:
            im = im.convert("L")
            w, h = im.size
            dx, dy = (int(v) for v in rng.integers(0, max(2, min(w, h) // 20), 2))
            im = im.crop((dx, dy, w - dx, h - dy)).resize((SIZE, SIZE))
            im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.9, 1.1)))
        name = f"person{i}_bacteria_{i}.jpeg" if src.parent.name == "PNEUMONIA" else f"IM-{i:05d}-0001.jpeg"
        im.save(root / src.parent.name / name, quality=92)


def make_images(root: Path) -> None:
    """IMAGES distinct JPEGs in Kermany's layout from the bundled sample's real X-rays."""
    from concurrent.futures import ProcessPoolExecutor

    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
    jobs = os.cpu_count() or 2
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_make_images, [root] * jobs, [range(k, IMAGES, jobs) for k in range(jobs)]))


def raycxr_trial(work: Path) -> list[dict]:
    from raycxr.ingest import IngestConfig, ingest
    from raycxr.search import SearchConfig, run_search

    make_images(work / "jpegs")
    ingest(IngestConfig(sources={"kermany": work / "jpegs"}, out=work / "data", image_size=SIZE,
                        near_duplicate_bits=-1))
    space = work / "space.yaml"
    cpus = max(1, (os.cpu_count() or 2) // 2)
    space.write_text(f"trials: 1\nmax_epochs: {EPOCHS}\nscheduler: {{grace_period: {EPOCHS}}}\n"
                     f"resources: {{workers_per_trial: 1, cpus_per_worker: {cpus}, gpus_per_worker: 1}}\n"
                     f"params: {{model: {MODEL}, image_size: {SIZE}, lr: 0.001, batch_size: {BATCH}, "
                     "augment: light, optimizer: adamw}\n")
    run_search(SearchConfig(data=work / "data", space=str(space), name="throughput", runs_dir=work / "runs"))
    result = next((work / "runs" / "throughput" / "tune").glob("trial_*/result.json"))
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU: this benchmark compares against the card's model-only throughput")
    card = torch.cuda.get_device_name(0)
    ceiling = model_only()
    rows = raycxr_trial(Path(tempfile.mkdtemp(prefix="raycxr-gpu-throughput-")))
    rates = [r["train_images_per_s"] for r in rows]
    steady = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
    summary = {"card": card, "model": MODEL, "image_size": SIZE, "batch": BATCH, "images": IMAGES,
               "model_only_images_per_s": ceiling, "raycxr_images_per_s_per_epoch": rates,
               "ratio_epochs_2plus": steady / ceiling, "precision": rows[-1].get("precision"),
               "channels_last": rows[-1].get("channels_last"), "torch": torch.__version__}
    print(json.dumps(summary, indent=2))
    print(f"{card}: {MODEL} {SIZE} px, batch {BATCH}: model only {ceiling:.0f} images/s; raycxr trial "
          f"{', '.join(f'{r:.0f}' for r in rates)} images/s per epoch; epochs 2+: {steady / ceiling:.0%} of model-only")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_throughput.json").write_text(json.dumps(summary, indent=2))
