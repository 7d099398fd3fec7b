"""GPU check (no Ray): the training loop's pieces and the one scoring path on CUDA.

What issue 13 split out of the Ray Train loop -- ``TrialConfig``, ``build_trial``,
``train_one_epoch``, ``validate`` -- run here on the GPU exactly as a Ray Train worker calls them
(bf16 autocast, channels_last, EMA), fed real films from the bundled sample, and then:
  - validation on the GPU against validation of the same weights on the CPU (AUC and logits);
  - a promoted-model folder written and read back through ``PromotedModel``, scored by
    ``raycxr.predict.logits`` on the GPU and the CPU;
  - images/s of ``train_one_epoch`` on the GPU for a larger model, against the same model's
    bare training step on one batch already on the card (what the loop adds on top of the model).
Prints one JSON object and writes it to $OUT/gpu_loop_check.json when OUT is set.

Usage: python scripts/bench/gpu_loop_check.py
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def films(size: int, copies: int = 1):
    """Bundled sample films at ``size`` px: uint8 (N,1,S,S) and (N,K) labels (-1 unknown)."""
    from raycxr.labels import FINDINGS

    images, labels = [], []
    for label, folder in ((0, "NORMAL"), (1, "PNEUMONIA")):
        for f in sorted((ROOT / "sample" / "kermany-mini" / folder).iterdir()):
            arr = np.asarray(Image.open(f).convert("L").resize((size, size)))
            for _ in range(copies):
                images.append(arr[None])
                row = np.full(len(FINDINGS), -1, np.float32)
                row[FINDINGS.index("pneumonia")], row[FINDINGS.index("no_finding")] = label, 1 - label
                labels.append(row)
    order = np.random.default_rng(0).permutation(len(images))
    return np.stack(images)[order], np.stack(labels)[order]


def batches(images, labels, bs, device):
    return [{"image": torch.from_numpy(images[i:i + bs].copy()).to(device),
             "labels": torch.from_numpy(labels[i:i + bs]).to(device)} for i in range(0, len(images), bs)]


def tune_config(**kw):
    from raycxr.config import PARAMS
    from raycxr.labels import FINDINGS

    cfg = {k: d for k, (_, _, d) in PARAMS.items() if isinstance(d, (int, float, str))}
    cfg.update(seed=0, findings=list(FINDINGS), target="pneumonia", max_epochs=4, train_rows=200,
               ingest_image_size=kw.get("image_size", 64), resize="pad", pos_weight=[1.0] * len(FINDINGS),
               cpus_per_worker=8, weights_dir=None, trial_id="gpu")
    cfg.update(kw)
    return cfg


def main():
    from raycxr.models import PromotedModel
    from raycxr.predict import logits
    from raycxr.train import TrialConfig, build_trial, train_one_epoch, validate

    assert torch.cuda.is_available(), "no CUDA device"
    cuda = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    images, labels = films(64)
    n_val = 60
    cfg = TrialConfig.from_tune(tune_config(model="resnet10t", lr=2e-3, image_size=64, batch_size=32,
                                            ema_decay=0.99, augment="light", max_epochs=4))
    t = build_trial(cfg, rank=0, world=1, device=cuda)
    out["precision"] = str(t.amp_dtype)
    out["channels_last"] = any(p.dim() == 4 and p.shape[-1] > 1 and not p.is_contiguous() and
                               p.is_contiguous(memory_format=torch.channels_last) for p in t.model.parameters())
    train = batches(images[n_val:], labels[n_val:], 32, cuda)
    out["train_loss"] = [round(train_one_epoch(t, train)["train_loss"], 4) for _ in range(4)]
    gpu_val = validate(t, batches(images[:n_val], labels[:n_val], 25, cuda))
    z_gpu = logits(t.evaluated, t.spec, images[:n_val], device=cuda)
    cpu_model = t.evaluated.float().cpu()
    t.evaluated, t.device = cpu_model, torch.device("cpu")
    cpu_val = validate(t, batches(images[:n_val], labels[:n_val], 25, "cpu"))
    z_cpu = logits(cpu_model, t.spec, images[:n_val])
    out["val_auc_gpu"], out["val_auc_cpu"] = gpu_val["val_auc"], cpu_val["val_auc"]
    out["val_logit_max_abs_diff_gpu_cpu"] = float(np.abs(z_gpu - z_cpu).max())
    out["val_logit_range"] = [float(z_cpu.min()), float(z_cpu.max())]

    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in cpu_model.state_dict().items()}, f"{d}/model.safetensors")
        PromotedModel(spec=t.spec, threshold=0.5, threshold_rule="youden",
                      calibration={"method": "platt", "scale": 1.3, "bias": -0.2},
                      class_names=("not_pneumonia", "pneumonia"), tta=True).save(d)
        promoted = PromotedModel.load(d)
        net = promoted.load_network(d)
        zc = logits(net, promoted.spec, images[:n_val])
        zg = logits(net.to(cuda), promoted.spec, images[:n_val], device=cuda)
        out["promoted_tta_logit_max_abs_diff_gpu_cpu"] = float(np.abs(zc - zg).max())

    # Loop throughput against the bare step, for a larger model on the card.
    big = TrialConfig.from_tune(tune_config(model="resnet50", lr=1e-3, image_size=224, batch_size=128,
                                            augment="light", max_epochs=3))
    t = build_trial(big, rank=0, world=1, device=cuda)
    imgs, labs = films(224, copies=12)  # 300 films x 12 = 3,600 images
    data = batches(imgs, labs, 128, cuda)
    train_one_epoch(t, data)  # warm-up: cuDNN autotuning, allocator
    loop = train_one_epoch(t, data)
    x, y = data[0]["image"], data[0]["labels"]
    from raycxr.train import masked_bce
    from raycxr.transforms import to_model_input

    xin = to_model_input(x, image_size=224, mean=t.spec.mean, std=t.spec.std).contiguous(
        memory_format=torch.channels_last)
    steps = 20
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = t.model(xin)
        loss = masked_bce(o.float(), y)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.opt.step()
    torch.cuda.synchronize()
    bare = steps * len(x) / (time.perf_counter() - t0)
    out["resnet50_224_loop_images_per_s"] = round(loop["train_images_per_s"], 1)
    out["resnet50_224_bare_step_images_per_s"] = round(bare, 1)
    out["loop_over_bare"] = round(loop["train_images_per_s"] / bare, 3)
    text = json.dumps(out, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_loop_check.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
