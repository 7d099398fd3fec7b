"""promote(): the best trial by validation AUC -> holdout evaluated once -> exports + model card.

Only this stage (and a later ``evaluate``) opens the holdout split. The operating threshold is
chosen on the validation split, before the holdout is read, and never changed after.
Every holdout read is logged in the run folder, and the model card says if it was read before.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from raycxr.errors import ConfigError, DataError, NoEligibleTrialError

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-4  # max |logit difference| allowed between eager, TorchScript and ONNX


@dataclass(frozen=True)
class PromoteConfig:
    run: Path
    out: Path
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.95
    n_boot: int = 1000
    seed: int = 0
    force: bool = False  # overwrite an existing --out folder
    tta: str = "auto"    # test-time augmentation: auto (kept if it raises validation AUC), on, off


def predict_split(model, meta: dict, data_dir: Path, split: str, *, batch_size: int = 128) -> tuple:
    """(probabilities, labels, patient hashes, sources) of the target finding, for every row of
    one split where the target is known."""
    import torch

    from raycxr.data import decode_images, read_split, target_labels
    from raycxr.transforms import to_model_input

    t = meta["findings"].index(meta["target"])
    table = read_split(data_dir, split, columns=["image", "height", "width", "labels", "source", "patient_hash"])
    labels = target_labels(table, meta["target"])
    table = table.filter(pa.array(labels >= 0))
    probs = []
    with torch.no_grad():
        for batch in table.to_batches(max_chunksize=batch_size):
            cols = batch.to_pydict()
            x = to_model_input(torch.from_numpy(decode_images(cols).copy()), image_size=meta["image_size"],
                               mean=meta["mean"], std=meta["std"])
            probs.append(torch.sigmoid(model(x)[:, t]).numpy())
    return (np.concatenate(probs) if probs else np.zeros(0), labels[labels >= 0].astype(int),
            table.column("patient_hash").to_numpy(zero_copy_only=False),
            table.column("source").to_numpy(zero_copy_only=False))


def _export(model, meta: dict, out: Path, sample: "np.ndarray") -> dict:
    """Write TorchScript and ONNX next to the safetensors weights; check both match eager."""
    import contextlib
    import io
    import warnings

    import onnxruntime as ort
    import torch

    x = torch.from_numpy(sample)
    # TorchScript is deprecated in torch 2.14 but still what many serving stacks load; keep it
    # until they move, and say nothing about it on every promote.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        eager = model(x).numpy()
        torch.jit.trace(model, x[:2]).save(str(out / "model.torchscript.pt"))
        ts_out = torch.jit.load(str(out / "model.torchscript.pt"))(x).numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(model, (x[:2],), str(out / "model.onnx"), dynamo=True, input_names=["image"],
                          output_names=["logit"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                          external_data=False)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: sample})[0]
    diffs = {"torchscript": float(np.abs(ts_out - eager).max()), "onnx": float(np.abs(onnx_out - eager).max())}
    for name, d in diffs.items():
        if d > EXPORT_TOLERANCE:
            raise RuntimeError(f"{name} export differs from the eager model by {d:.2e} (> {EXPORT_TOLERANCE}); "
                               "the export is not trustworthy: report this with the model name")
    return diffs


def _model_inputs(data_dir: Path, split: str, meta: dict, *, n: int) -> np.ndarray:
    """The first ``n`` real images of a split, preprocessed as the model expects."""
    import torch

    from raycxr.data import decode_images, read_split
    from raycxr.transforms import to_model_input

    rows = read_split(data_dir, split, columns=["image", "height", "width"]).slice(0, n).to_pydict()
    x = torch.from_numpy(decode_images(rows).copy())
    return to_model_input(x, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"]).numpy()


def _choose_tta(model, meta: dict, data_dir: Path, vy: np.ndarray, vp: np.ndarray, *, mode: str) -> tuple:
    """(model, validation probabilities, what was decided) for test-time augmentation.

    ``auto`` keeps TTA only if it raises the validation AUC (a tie leaves it off: it costs 4x);
    ``on`` and ``off`` force it. Both AUCs are recorded either way, except with ``off``.
    """
    from sklearn.metrics import roc_auc_score

    from raycxr.transforms import TTA_VIEWS, TestTimeAugment

    if mode == "off":
        return model, vp, {"used": False, "mode": mode}
    wrapped = TestTimeAugment(model, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"]).eval()
    wp = predict_split(wrapped, meta, data_dir, "val")[0]
    both = len(np.unique(vy)) == 2
    without, with_tta = (roc_auc_score(vy, vp), roc_auc_score(vy, wp)) if both else (float("nan"),) * 2
    used = mode == "on" or bool(with_tta > without)
    info = {"used": used, "mode": mode, "val_auc_without": float(without), "val_auc_with": float(with_tta),
            "views": [{"rotation_deg": r, "scale": sc} for r, sc in TTA_VIEWS]}
    return (wrapped, wp, info) if used else (model, vp, info)


def _holdout_reads(run_dir: Path) -> list[dict]:
    path = run_dir / "holdout_reads.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def promote(cfg: PromoteConfig) -> dict:
    """Promote the best trial of ``cfg.run`` into ``cfg.out``; return the model card's data."""
    from raycxr.data import read_manifest
    from raycxr.card import write_model_card
    from raycxr.evaluate import apply_calibration, binary_metrics, choose_operating_threshold, fit_calibration, report
    from raycxr.models import load_model
    from raycxr.report import write_report
    from raycxr.search import leaderboard

    run_dir = Path(cfg.run)
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} is not a raycxr run folder (no run.json): pass --run runs/NAME", source="--run")
    run = json.loads((run_dir / "run.json").read_text())
    data_dir = Path(run["data"])
    manifest = read_manifest(data_dir)
    if manifest["fingerprint"] != run["data_fingerprint"]:
        raise DataError(f"{data_dir} changed since the search ran (fingerprint {manifest['fingerprint']} != "
                        f"{run['data_fingerprint']}): promote against the dataset the search used")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise ConfigError(f"{out} already exists: choose another --out or pass --force", source="--out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    board = leaderboard(run_dir)
    eligible = [r for r in board if r["status"].startswith("ok") and r.get("checkpoint")
                and Path(r["checkpoint"]).is_dir()]
    if not eligible:
        raise NoEligibleTrialError(f"no trial of {run_dir} has a validation AUC and a checkpoint on disk: "
                                   "run a search that finishes at least one epoch")
    best = eligible[0]
    ckpt = Path(best["checkpoint"])
    meta = json.loads((ckpt / "trial.json").read_text())
    model = load_model(ckpt, meta)

    # 1. Test-time augmentation, calibration (Platt scaling) and the threshold: chosen on
    # validation only, before the holdout.
    vp, vy, vg, vs = predict_split(model, meta, data_dir, "val")
    model, vp, tta = _choose_tta(model, meta, data_dir, vy, vp, mode=cfg.tta)
    calibration = fit_calibration(vy, vp)
    vp = apply_calibration(vp, calibration)
    threshold, stability = choose_operating_threshold(vy, vp, vg, rule=cfg.threshold_rule,
                                                      target=cfg.target_sensitivity, seed=cfg.seed)
    if stability["unstable"]:
        print(f"Warning: the validation threshold is unstable: {stability['how']}.")
    val_metrics = binary_metrics(vy, vp, threshold=threshold)

    # 2. The holdout, once.
    previous_reads = _holdout_reads(run_dir)
    hp, hy, hg, hs = predict_split(model, meta, data_dir, "holdout")
    hp = apply_calibration(hp, calibration)
    with open(run_dir / "holdout_reads.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trial_id": best["trial_id"],
                            "out": str(out.resolve())}) + "\n")
    holdout = report(hy, hp, groups=hg, sources=hs, threshold=threshold, n_boot=cfg.n_boot, seed=cfg.seed)

    # 3. Exports: safetensors is the source of truth; TorchScript and ONNX are checked against it.
    shutil.copyfile(ckpt / "model.safetensors", out / "model.safetensors")
    export_diffs = _export(model, meta, out, _model_inputs(data_dir, "val", meta, n=16))

    config = {
        "architecture": meta["model"], "image_size": meta["image_size"],
        "findings": meta["findings"], "target": meta["target"],
        "class_names": [f"not_{meta['target']}", meta["target"]],
        "threshold": threshold, "threshold_rule": cfg.threshold_rule, "calibration": calibration,
        "tta": tta["used"],
        "preprocessing": {
            "decode": "greyscale, air dark (DICOM: modality LUT, VOI LUT, MONOCHROME1 inverted)",
            "resize": meta["resize"], "stored_size": meta["ingest_image_size"],
            "model_input": f"float32 (N,1,{meta['image_size']},{meta['image_size']}) = "
                           "(bilinear antialiased resize of pixels/255 - mean) / std",
            "mean": meta["mean"], "std": meta["std"]},
        "output": "one logit per finding (order: findings); P(target) = sigmoid(calibration.scale * "
                  "logit[target] + calibration.bias), compared with threshold",
        "files": {"weights": "model.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"},
        "trial": meta, "drop_rate": meta.get("drop_rate", 0.0), "model": meta["model"],
        "ingest_image_size": meta["ingest_image_size"], "mean": meta["mean"], "std": meta["std"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = {
        "run": run["name"], "trial": best, "target": meta["target"], "threshold": threshold,
        "threshold_rule": cfg.threshold_rule, "threshold_stability": stability, "calibration": calibration,
        "tta": tta,
        "validation": val_metrics, "holdout": holdout, "export_max_abs_diff": export_diffs,
        "holdout_previously_read": len(previous_reads), "data": {
            "dir": str(data_dir), "fingerprint": manifest["fingerprint"], "counts": manifest["counts"],
            "split_level": manifest["split_level"], "params": manifest["params"]},
        "search_space": run["space_config"], "versions": run["versions"], "leaderboard_top": board[:5],
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    write_model_card(card, out / "model_card.md")
    write_report(out, card=card, holdout_y=hy, holdout_p=hp, run_dir=run_dir)
    return card


def evaluate_model(model_dir: str | Path, data_dir: str | Path, *, split: str = "holdout", n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Score a promoted model on any ingested dataset (external validation), with the model's own
    calibration and threshold; written to ``MODEL/evaluations/FINGERPRINT-SPLIT.json``."""
    from raycxr.data import SPLITS, read_manifest
    from raycxr.evaluate import apply_calibration, report
    from raycxr.predict import load_promoted

    model, cfg = load_promoted(model_dir)
    manifest = read_manifest(data_dir)
    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    if manifest["fingerprint"] == card["data"]["fingerprint"] and split in ("holdout", "all"):
        print("Warning: this is the model's own holdout, already read by promote; figures from repeated holdout "
              "reads are optimistic. Use another dataset for external validation.")
    splits = list(SPLITS) if split == "all" else [split]
    parts = [predict_split(model, {**cfg["trial"], **cfg}, Path(data_dir), s) for s in splits]
    p, y, g, src = (np.concatenate([part[i] for part in parts]) for i in range(4))
    if len(y) == 0:
        raise DataError(f"{data_dir} ({split}) has no images with a known {cfg['target']} label to score")
    result = {"data": str(Path(data_dir).resolve()), "fingerprint": manifest["fingerprint"], "split": split,
              "target": cfg["target"], "threshold": cfg["threshold"], "calibration": cfg["calibration"],
              "metrics": report(y, apply_calibration(p, cfg["calibration"]), groups=g, sources=src,
                                threshold=cfg["threshold"], n_boot=n_boot, seed=seed)}
    out = Path(model_dir) / "evaluations" / f"{manifest['fingerprint']}-{split}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["written_to"] = str(out)
    return result
