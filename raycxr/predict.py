"""predict(): classify DICOM / PNG / JPEG files with a promoted model.

Loads ``config.json`` and ``model.safetensors`` (never a pickle) and reads each file with
the same functions ingest used (:func:`raycxr.imaging.load_for_model`), then the same model
input transform as training (:func:`raycxr.transforms.to_model_input`). A file that cannot be
read gets an error row; every other file is still predicted.
"""

from __future__ import annotations

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


def predict(model_dir: str | Path, paths: list[str | Path], *, batch_size: int = 32) -> list[Prediction]:
    import torch

    from raycxr.imaging import load_for_model
    from raycxr.transforms import to_model_input

    model, cfg = load_promoted(model_dir)
    size, policy = cfg["preprocessing"]["stored_size"], cfg["preprocessing"]["resize"]
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        if not pending:
            return
        x = torch.from_numpy(np.stack([a for _, a in pending])[:, None])
        with torch.no_grad():
            logits = model(to_model_input(x, image_size=cfg["image_size"], mean=cfg["mean"], std=cfg["std"]))
            probs = torch.sigmoid(logits[:, cfg["findings"].index(cfg["target"])]).numpy()
        for (i, _), prob in zip(pending, probs):
            results[i].probability = float(prob)
            results[i].label = cfg["class_names"][int(prob >= cfg["threshold"])]
        pending.clear()

    for f in _expand(paths):
        results.append(Prediction(file=str(f), probability=None, label=None))
        try:
            pending.append((len(results) - 1, load_for_model(f, size, policy=policy)))
        except DecodeError as exc:
            results[-1].error = str(exc)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results
