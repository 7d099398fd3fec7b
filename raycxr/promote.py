"""promote(): finalists by validation -> noise-aware choice (one model or an ensemble) -> holdout once -> exports + card.

Only this stage (and a later ``evaluate``) opens the holdout split. Which model is promoted
(:mod:`raycxr.select`), test-time augmentation, calibration, a stated prevalence and every
operating threshold are chosen on the validation split, before the holdout is read, and never
changed after. Every holdout read is logged in the run folder, and the model card says if it was
read before. ``evaluate_model`` scores a promoted model on another dataset and adds it to the
card's internal-vs-external comparison.
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
from tqdm.auto import tqdm

from raycxr.errors import ConfigError, DataError, NoEligibleTrialError
from raycxr.models import load_model
from raycxr.storage import RunStore, exists, local_copy

log = logging.getLogger(__name__)

EXPORT_TOLERANCE = 1e-4  # max |logit difference| allowed between eager, TorchScript and ONNX


@dataclass(frozen=True)
class PromoteConfig:
    run: str | Path                  # the run folder or its storage URI (s3://bucket/raycxr/NAME)
    out: Path
    data: Path | None = None         # the dataset, when not at the path the search recorded (same fingerprint)
    threshold_rule: str = "youden"   # youden | sensitivity | specificity | bayes (needs prevalence)
    target_sensitivity: float = 0.95
    target_specificity: float = 0.95
    prevalence: float | None = None  # the clinic's prevalence: probabilities and PPV/NPV corrected to it
    n_boot: int = 1000
    seed: int = 0
    force: bool = False  # overwrite an existing --out folder
    tta: str = "auto"    # test-time augmentation: auto (kept if it raises validation AUC), on, off
    select: str = "shift-auc"  # raycxr.select's rule, or val-auc (plain arg-max)
    finalists: int = 4
    ensemble: str = "auto"     # auto | on | off (raycxr.select)
    fastest_within: float | None = None  # promote the quickest trial within this validation AUC of the best


@dataclass(frozen=True)
class SplitArrays:
    """One split's rows where the target finding is known: pixels as stored, labels, patients, sources."""

    images: np.ndarray   # uint8 (N, 1, S, S)
    y: np.ndarray        # 0/1
    groups: np.ndarray   # patient hashes
    sources: np.ndarray


def split_arrays(data_dir: Path, split: str, target: str) -> SplitArrays:
    from raycxr.data import decode_images, read_split, target_labels

    table = read_split(data_dir, split, columns=["image", "height", "width", "labels", "source", "patient_hash"])
    labels = target_labels(table, target)
    table = table.filter(pa.array(labels >= 0))
    images = (decode_images(table.select(["image", "height", "width"]).to_pydict()) if table.num_rows
              else np.zeros((0, 1, 1, 1), np.uint8))
    return SplitArrays(images, labels[labels >= 0].astype(int),
                       table.column("patient_hash").to_numpy(zero_copy_only=False),
                       table.column("source").to_numpy(zero_copy_only=False))


def target_logits(model, spec: dict, images: np.ndarray) -> np.ndarray:
    """The target finding's raw logits for uint8 images, preprocessed as ``spec`` says."""
    from raycxr.models import predict_logits

    if not len(images):
        return np.zeros(0)
    z = predict_logits(model, images, image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])
    return z[:, spec["findings"].index(spec["target"])]


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


def _choose_tta(model, spec: dict, val: SplitArrays, vz: np.ndarray, *, mode: str) -> tuple:
    """(model, validation logits, what was decided) for test-time augmentation.

    ``auto`` keeps TTA only if it raises the validation AUC (a tie leaves it off: it costs 4x);
    ``on`` and ``off`` force it. Both AUCs are recorded either way, except with ``off``.
    """
    from sklearn.metrics import roc_auc_score

    from raycxr.transforms import TTA_VIEWS, TestTimeAugment

    if mode == "off":
        return model, vz, {"used": False, "mode": mode}
    wrapped = TestTimeAugment(model, image_size=spec["image_size"], mean=spec["mean"], std=spec["std"]).eval()
    wz = target_logits(wrapped, spec, val.images)
    both = len(np.unique(val.y)) == 2
    without, with_tta = (roc_auc_score(val.y, vz), roc_auc_score(val.y, wz)) if both else (float("nan"),) * 2
    used = mode == "on" or bool(with_tta > without)
    info = {"used": used, "mode": mode, "val_auc_without": float(without), "val_auc_with": float(with_tta),
            "views": [{"rotation_deg": r, "scale": sc} for r, sc in TTA_VIEWS]}
    return (wrapped, wz, info) if used else (model, vz, info)


def _holdout_reads(store: RunStore) -> list[dict]:
    if not store.exists("holdout_reads.jsonl"):
        return []
    return [json.loads(line) for line in store.read_text("holdout_reads.jsonl").splitlines() if line.strip()]


def _checkpoint(row: dict) -> Path:
    """A leaderboard row's checkpoint on this disk (fetched from the run's storage when remote)."""
    return local_copy(row["checkpoint"])


def _select(cfg: PromoteConfig, eligible: list[dict], val: SplitArrays) -> tuple[list[dict], dict]:
    """(the chosen leaderboard rows, the selection record for the card), on validation only."""
    from raycxr.select import SELECTION_RULES, choose, fastest_within, views_of

    if cfg.fastest_within is not None:
        i, why = fastest_within(eligible, cfg.fastest_within)
        return [eligible[i]], {"rule": "fastest-within", "kind": "single", "why": why, "finalists": []}
    if cfg.select not in SELECTION_RULES:
        raise ConfigError(f"unknown selection rule {cfg.select!r}; use one of {SELECTION_RULES}", source="--select")
    finalists = eligible[:max(1, cfg.finalists)]
    if cfg.select == "val-auc" or len(finalists) == 1:
        return finalists[:1], {"rule": cfg.select, "kind": "single", "finalists": [],
                               "why": "highest validation AUC" + (" (the only eligible trial)" if len(eligible) == 1
                                                                   else "")}
    views = views_of(val.images, seed=cfg.seed)
    logits = []
    for row in tqdm(finalists, desc="scoring finalists on validation views", unit="model", leave=False):
        meta = _trial_meta(row)
        model = load_model(_checkpoint(row), meta)
        logits.append([target_logits(model, meta, v) for v in views.values()])
    decision = choose(finalists, np.asarray(logits), val.y, val.groups, ensemble=cfg.ensemble,
                      n_boot=cfg.n_boot, seed=cfg.seed)
    return [finalists[i] for i in decision["members"]], decision


def _trial_meta(row: dict) -> dict:
    return json.loads((_checkpoint(row) / "trial.json").read_text())


def _build(chosen: list[dict], stored_size: int) -> tuple:
    """(model, spec, state dict to save) for one trial or an ensemble of several."""
    from raycxr.transforms import Ensemble

    metas = [_trial_meta(r) for r in chosen]
    models = [load_model(_checkpoint(r), m) for r, m in zip(chosen, metas)]
    if len(chosen) == 1:
        return models[0], metas[0], None
    keys = ("model", "image_size", "mean", "std", "drop_rate", "pretrained", "trial_id")
    spec = {**{k: metas[0][k] for k in ("findings", "target", "resize", "ingest_image_size")},
            "model": "ensemble", "image_size": stored_size, "mean": 0.0, "std": 1.0,
            "members": [{k: m.get(k) for k in keys} for m in metas]}
    model = Ensemble(models, image_sizes=[m["image_size"] for m in metas], means=[m["mean"] for m in metas],
                     stds=[m["std"] for m in metas]).eval()
    return model, spec, {k: v.contiguous() for k, v in model.state_dict().items()}


def promote(cfg: PromoteConfig) -> dict:
    """Promote the best trial (or ensemble) of ``cfg.run`` into ``cfg.out``; return the model card's data."""
    from raycxr.card import write_model_card
    from raycxr.data import read_manifest
    from raycxr.evaluate import (binary_metrics, calibrate_logits, fit_calibration, operating_points,
                                 predictive_values, prior_shift, report)
    from raycxr.report import write_report
    from raycxr.search import leaderboard
    from raycxr.transforms import to_model_input

    rule = cfg.threshold_rule
    if rule == "bayes" and cfg.prevalence is None:
        raise ConfigError("--threshold-rule bayes needs --prevalence P (the clinic's share of positives)",
                          source="--threshold-rule")
    if cfg.prevalence is not None and not 0 < cfg.prevalence < 1:
        raise ConfigError(f"--prevalence {cfg.prevalence} must be a share of positives in (0, 1), e.g. 0.3",
                          source="--prevalence")
    store = RunStore(cfg.run)
    store.require_run("--run")
    run = json.loads(store.read_text("run.json"))
    data_dir = Path(cfg.data or run["data"])
    if not (data_dir / "manifest.json").is_file():
        raise ConfigError(f"the search read its data from {data_dir}, which is not here: pass --data with this "
                          "machine's copy of that dataset (its fingerprint must match)", source="--data")
    manifest = read_manifest(data_dir)
    if manifest["fingerprint"] != run["data_fingerprint"]:
        raise DataError(f"{data_dir} is not the dataset the search used (fingerprint {manifest['fingerprint']} != "
                        f"{run['data_fingerprint']}): promote against the dataset the search used")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.force:
            raise ConfigError(f"{out} already exists: choose another --out or pass --force", source="--out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    board = leaderboard(store.uri)
    eligible = [r for r in board if r["status"].startswith("ok") and r.get("checkpoint") and exists(r["checkpoint"])]
    if not eligible:
        raise NoEligibleTrialError(f"no trial of {store.uri} has a validation AUC and a checkpoint in storage: "
                                   "run a search that finishes at least one epoch")
    target = run["target"]

    # 1. Which model, test-time augmentation, calibration (Platt scaling) and the operating points:
    # all chosen on validation only, before the holdout is read.
    val = split_arrays(data_dir, "val", target)
    chosen, selection = _select(cfg, eligible, val)
    core, spec, ensemble_state = _build(chosen, manifest["params"]["image_size"])
    vz = target_logits(core, spec, val.images)
    model, vz, tta = _choose_tta(core, spec, val, vz, mode=cfg.tta)
    calibration = fit_calibration(val.y, vz)
    if cfg.prevalence is not None:
        calibration = prior_shift(calibration, fitted_prevalence=float(val.y.mean()),
                                  target_prevalence=cfg.prevalence)
    vp = calibrate_logits(vz, calibration)
    points = operating_points(val.y, vp, val.groups, target_sensitivity=cfg.target_sensitivity,
                              target_specificity=cfg.target_specificity, bayes=cfg.prevalence is not None,
                              seed=cfg.seed)
    threshold = points[rule]["threshold"]
    stability = points[rule]["stability"] or {"how": points[rule]["how"], "unstable": False}
    if stability["unstable"]:
        log.warning("the validation threshold is unstable: %s", stability["how"])
    val_metrics = binary_metrics(val.y, vp, threshold=threshold)

    # 2. The holdout, once.
    previous_reads = _holdout_reads(store)
    hold = split_arrays(data_dir, "holdout", target)
    hp = calibrate_logits(target_logits(model, spec, hold.images), calibration)
    store.append_line("holdout_reads.jsonl", json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "trial_id": "+".join(r["trial_id"] for r in chosen),
        "out": str(out.resolve())}))
    holdout = report(hold.y, hp, groups=hold.groups, sources=hold.sources, threshold=threshold, n_boot=cfg.n_boot,
                     seed=cfg.seed)
    at_points = {}
    for name, pt in points.items():
        m, v = (binary_metrics(y, p, threshold=pt["threshold"]) for y, p in ((hold.y, hp), (val.y, vp)))
        at_points[name] = {"threshold": pt["threshold"], "target": pt["target"], "how": pt["how"],
                           **{k: m[k] for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")},
                           "val_sensitivity": v["sensitivity"], "val_specificity": v["specificity"]}
        if cfg.prevalence is not None:
            at_points[name]["ppv_at_prevalence"], at_points[name]["npv_at_prevalence"] = predictive_values(
                m["sensitivity"], m["specificity"], cfg.prevalence)

    # 3. Exports: safetensors is the source of truth; TorchScript and ONNX are checked against it.
    if ensemble_state is None:
        shutil.copyfile(_checkpoint(chosen[0]) / "model.safetensors", out / "model.safetensors")
    else:
        from safetensors.torch import save_file

        save_file(ensemble_state, str(out / "model.safetensors"))
    import torch

    sample = to_model_input(torch.from_numpy(val.images[:16].copy()), image_size=spec["image_size"],
                            mean=spec["mean"], std=spec["std"]).numpy()
    export_diffs = _export(model, spec, out, sample)

    architecture = spec["model"] if ensemble_state is None else "ensemble of " + " + ".join(
        f"{m['model']}@{m['image_size']}px" for m in spec["members"])
    config = {
        "architecture": architecture, "model": spec["model"], "members": spec.get("members", []),
        "image_size": spec["image_size"], "findings": spec["findings"], "target": target,
        "class_names": [f"not_{target}", target],
        "threshold": threshold, "threshold_rule": rule,
        "operating_points": {k: v["threshold"] for k, v in points.items()},
        "calibration": calibration, "tta": tta["used"],
        "selection": {k: selection[k] for k in ("rule", "kind", "why")},
        "preprocessing": {
            "decode": "greyscale, air dark (DICOM: modality LUT, VOI LUT, MONOCHROME1 inverted)",
            "resize": spec["resize"], "stored_size": spec["ingest_image_size"],
            "model_input": f"float32 (N,1,{spec['image_size']},{spec['image_size']}) = "
                           "(bilinear antialiased resize of pixels/255 - mean) / std",
            "mean": spec["mean"], "std": spec["std"]},
        "output": "one logit per finding (order: findings); P(target) = sigmoid(calibration.scale * "
                  "logit[target] + calibration.bias), compared with threshold",
        "files": {"weights": "model.safetensors", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"},
        "trial": spec, "drop_rate": spec.get("drop_rate", 0.0),
        "ingest_image_size": spec["ingest_image_size"], "mean": spec["mean"], "std": spec["std"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = {
        "run": run["name"], "trial": chosen[0], "members": chosen, "architecture": architecture,
        "selection": selection, "target": target, "threshold": threshold,
        "threshold_rule": rule, "threshold_stability": stability, "calibration": calibration,
        "operating_points": at_points, "prevalence": cfg.prevalence, "tta": tta,
        "validation": val_metrics, "holdout": holdout, "export_max_abs_diff": export_diffs,
        "holdout_previously_read": len(previous_reads), "data": {
            "dir": str(data_dir), "fingerprint": manifest["fingerprint"], "counts": manifest["counts"],
            "split_level": manifest["split_level"], "params": manifest["params"]},
        "search_space": run["space_config"], "versions": run["versions"], "leaderboard_top": board[:5],
        "pareto": [{k: r.get(k) for k in ("trial_id", "model", "image_size", "val_auc", "latency_ms")}
                   for r in eligible],
        "external": [],
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    write_model_card(card, out / "model_card.md")
    write_report(out, card=card, holdout_y=hold.y, holdout_p=hp, run=store.uri)
    return card


def evaluate_model(model_dir: str | Path, data_dir: str | Path, *, split: str = "holdout", n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Score a promoted model on any ingested dataset (external validation), with the model's own
    calibration and threshold; written to ``MODEL/evaluations/FINGERPRINT-SPLIT.json`` and, when the
    data is not the model's own, added to the model card's internal-vs-external comparison."""
    from raycxr.card import write_model_card
    from raycxr.data import SPLITS, read_manifest
    from raycxr.evaluate import calibrate_logits, report
    from raycxr.predict import load_promoted

    model, cfg = load_promoted(model_dir)
    manifest = read_manifest(data_dir)
    card_path = Path(model_dir) / "model_card.json"
    card = json.loads(card_path.read_text())
    own = manifest["fingerprint"] == card["data"]["fingerprint"]
    if own and split in ("holdout", "all"):
        log.warning("this is the model's own holdout, already read by promote; figures from repeated holdout reads "
                    "are optimistic. Use another dataset for external validation.")
    splits = list(SPLITS) if split == "all" else [split]
    parts = [split_arrays(Path(data_dir), s, cfg["target"]) for s in splits]
    y, g, src = (np.concatenate([getattr(part, f) for part in parts]) for f in ("y", "groups", "sources"))
    if len(y) == 0:
        raise DataError(f"{data_dir} ({split}) has no images with a known {cfg['target']} label to score")
    z = np.concatenate([target_logits(model, cfg, part.images) for part in parts])
    result = {"data": str(Path(data_dir).resolve()), "fingerprint": manifest["fingerprint"], "split": split,
              "target": cfg["target"], "threshold": cfg["threshold"], "calibration": cfg["calibration"],
              "sources": sorted(set(src)),
              "metrics": report(y, calibrate_logits(z, cfg["calibration"]), groups=g, sources=src,
                                threshold=cfg["threshold"], n_boot=n_boot, seed=seed)}
    out = Path(model_dir) / "evaluations" / f"{manifest['fingerprint']}-{split}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not own:  # the card compares internal with every external evaluation (one entry per dataset and split)
        pooled = result["metrics"]["pooled"]
        entry = {"data": result["data"], "fingerprint": result["fingerprint"], "split": split,
                 "sources": result["sources"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 **{k: pooled[k] for k in ("n", "positives", "auc", "accuracy", "sensitivity", "specificity")},
                 "ci95": {k: pooled["ci95"][k] for k in ("auc", "accuracy", "sensitivity", "specificity")}}
        card["external"] = [e for e in card.get("external", [])
                            if (e["fingerprint"], e["split"]) != (entry["fingerprint"], split)] + [entry]
        card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
        write_model_card(card, Path(model_dir) / "model_card.md")
    result["written_to"] = str(out)
    return result
