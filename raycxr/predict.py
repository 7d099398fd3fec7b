"""predict(): classify DICOM / PNG / JPEG files with a promoted model.

Loads ``config.json`` and ``model.safetensors`` (never a pickle) and reads each file with
the same functions ingest used (:func:`raycxr.imaging.load_for_model`), then the same model
input transform as training (:func:`raycxr.transforms.to_model_input`), the model's
calibration and its validation-chosen threshold. A file that cannot be read gets an error row;
every other file is still predicted. Warnings flag inputs unlike the training data (a lateral
view, another body part, a small image). ``saliency_dir`` writes a Grad-CAM overlay per image
(captum's LayerGradCam on the last convolution).
"""

from __future__ import annotations

import hashlib

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycxr.errors import ConfigError, DecodeError

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}


@dataclass
class Prediction:
    file: str
    probability: float | None
    label: str | None
    error: str = ""
    warning: str = ""
    saliency: str = ""


def _warnings(path: Path, cfg: dict) -> str:
    """Why this input may not be like the training data ('' if nothing)."""
    out = []
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return ""
    if head[128:132] == b"DICM" or path.suffix.lower() in {".dcm", ".dicom"}:
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return ""
        from raycxr.sources import normalise_view

        if normalise_view(ds.get("ViewPosition")) == "LATERAL":
            out.append("lateral view: the model was trained on frontal films")
        part = str(ds.get("BodyPartExamined", "") or "").upper()
        if part and part not in {"CHEST", "THORAX", "LUNG"}:
            out.append(f"body part {part}, not chest")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                cols, rows = im.size
        except Exception:
            return ""
    if rows and cols and min(rows, cols) < cfg["preprocessing"]["stored_size"]:
        out.append(f"small image ({cols}x{rows} px) upsampled to {cfg['preprocessing']['stored_size']} px")
    return "; ".join(out)


def _last_conv(model):
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1]


def _write_saliency(model, x, target: int, images: np.ndarray, names: list[str], out_dir: Path) -> list[str]:
    """Grad-CAM heat maps (captum) over the input images, as PNG overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    from captum.attr import LayerGradCam

    from raycxr.transforms import TestTimeAugment

    if isinstance(model, TestTimeAugment):  # Grad-CAM of the network itself, not of the averaged views
        model = model.model
    cam = LayerGradCam(model, _last_conv(model)).attribute(x, target=target, relu_attributions=True)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False).detach().numpy()[:, 0]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, heat, name in zip(images, cam, names):
        heat = heat / heat.max() if heat.max() > 0 else heat
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.imshow(img, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35)
        ax.set_axis_off()
        # Named by a hash of the input's full path, never its name: file names can carry patient IDs
        # (NIH's, MIMIC's, a clinic's), and two inputs with one name in two folders must not collide.
        # The output's saliency column maps each input to its overlay.
        path = out_dir / f"{hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:16]}_saliency.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))
    return paths


def _expand(paths: list[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def load_promoted(model_dir: str | Path):
    """(model, config) of a promoted model folder."""
    from raycxr.models import load_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} holds no config.json: pass a folder written by `raycxr promote`",
                          source="--model")
    config = json.loads((model_dir / "config.json").read_text())
    return load_model(model_dir, config), config


def predict(model_dir: str | Path, paths: list[str | Path], *, batch_size: int = 32,
            saliency_dir: str | Path | None = None) -> list[Prediction]:
    import torch

    from raycxr.evaluate import calibrate_logits
    from raycxr.imaging import load_for_model
    from raycxr.models import predict_logits
    from raycxr.transforms import to_model_input

    model, cfg = load_promoted(model_dir)
    size, policy = cfg["preprocessing"]["stored_size"], cfg["preprocessing"]["resize"]
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        if not pending:
            return
        images = np.stack([a for _, a in pending])
        target = cfg["findings"].index(cfg["target"])
        z = predict_logits(model, images, image_size=cfg["image_size"], mean=cfg["mean"], std=cfg["std"])
        probs = calibrate_logits(z[:, target], cfg["calibration"])
        for (i, _), prob in zip(pending, probs):
            results[i].probability = float(prob)
            results[i].label = cfg["class_names"][int(prob >= cfg["threshold"])]
        if saliency_dir is not None:
            x = to_model_input(torch.from_numpy(images[:, None]), image_size=cfg["image_size"], mean=cfg["mean"],
                               std=cfg["std"])
            maps = _write_saliency(model, x, target, images, [results[i].file for i, _ in pending], Path(saliency_dir))
            for (i, _), path in zip(pending, maps):
                results[i].saliency = path
        pending.clear()

    for f in _expand(paths):
        results.append(Prediction(file=str(f), probability=None, label=None))
        try:
            pending.append((len(results) - 1, load_for_model(f, size, policy=policy)))
            results[-1].warning = _warnings(f, cfg)
        except DecodeError as exc:
            results[-1].error = str(exc)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
