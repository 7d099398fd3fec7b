"""evaluate_model(): the ``raycxr evaluate`` command, a promoted model scored on any ingested dataset.

External validation: the model's own calibration and threshold (fixed on its internal validation)
applied to another dataset's split, with the same metrics and patient bootstrap as promote
(:mod:`raycxr.metrics`), scored by the same function (:func:`raycxr.predict.logits`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from raycxr.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def evaluate_model(model_dir: str | Path, data_dir: str | Path, *, split: str = "holdout", n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Score a promoted model on any ingested dataset (external validation), with the model's own
    calibration and threshold; written to ``MODEL/evaluations/FINGERPRINT-SPLIT.json`` and, when the
    data is not the model's own, added to the model card's internal-vs-external comparison."""
    from raycxr.card import write_model_card
    from raycxr.data import SPLITS, read_manifest, split_arrays
    from raycxr.metrics import calibrate_logits, report
    from raycxr.predict import load_promoted, target_logits, write_predictions
    from raycxr.report import refresh_report

    if split not in (*SPLITS, "all"):
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join((*SPLITS, 'all'))}", source="--split")
    model, promoted = load_promoted(model_dir)
    spec = promoted.spec
    manifest = read_manifest(data_dir)
    card_path = Path(model_dir) / "model_card.json"
    card = None  # a folder without its card is still scored; only the card's comparison is skipped
    if card_path.exists():
        try:
            card = json.loads(card_path.read_text())
            fingerprint = card["data"]["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read {card_path} ({type(exc).__name__}): the external evaluation is added "
                              "to the model card; promote the run again", source=str(model_dir)) from None
    own = card is not None and manifest["fingerprint"] == fingerprint
    if own and split in ("holdout", "all"):
        log.warning("this is the model's own holdout, already read by promote; figures from repeated holdout reads "
                    "are optimistic. Use another dataset for external validation.")
    splits = list(SPLITS) if split == "all" else [split]
    parts = [split_arrays(Path(data_dir), s, spec.target) for s in splits]
    y, g, src = (np.concatenate([getattr(part, f) for part in parts]) for f in ("y", "groups", "sources"))
    if len(y) == 0:
        raise DataError(f"{data_dir} ({split}) has no images with a known {spec.target} label to score")
    z = np.concatenate([target_logits(model, spec, part.images, progress=f"scoring {name}")
                        for name, part in zip(splits, parts)])
    probabilities = calibrate_logits(z, promoted.calibration)
    result = {"data": str(Path(data_dir).resolve()), "fingerprint": manifest["fingerprint"], "split": split,
              "target": spec.target, "threshold": promoted.threshold, "calibration": promoted.calibration,
              "sources": sorted(set(src)),
              "metrics": report(y, probabilities, groups=g, sources=src,
                                threshold=promoted.threshold, n_boot=n_boot, seed=seed)}
    out = Path(model_dir) / "evaluations" / f"{manifest['fingerprint']}-{split}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    result["predictions"] = str(write_predictions(out.with_name(out.stem + "-predictions.csv"), sources=src, groups=g,
                                                  y=y, probabilities=probabilities))
    if card is not None and not own:  # the card compares internal with every external evaluation (one entry per dataset and split)
        pooled = result["metrics"]["pooled"]
        entry = {"data": result["data"], "fingerprint": result["fingerprint"], "split": split,
                 "sources": result["sources"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 **{k: pooled[k] for k in ("n", "positives", "auc", "accuracy", "sensitivity", "specificity")},
                 "ci95": {k: pooled["ci95"][k] for k in ("auc", "accuracy", "sensitivity", "specificity")}}
        card["external"] = [e for e in card.get("external", [])
                            if (e["fingerprint"], e["split"]) != (entry["fingerprint"], split)] + [entry]
        card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
        write_model_card(card, Path(model_dir) / "model_card.md")
        refresh_report(Path(model_dir), card)
    result["written_to"] = str(out)
    return result
