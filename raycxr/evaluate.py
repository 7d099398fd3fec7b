"""evaluate_model(): the ``raycxr evaluate`` command, a promoted model scored on any ingested dataset.

External validation: the model's own calibration and threshold (fixed on its internal validation)
applied to another dataset's split, with the same metrics and patient bootstrap as promote
(:mod:`raycxr.metrics`), scored by the same function (:func:`raycxr.predict.logits`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raycxr.data import location, read_manifest
from raycxr.storage import is_uri
from raycxr.errors import ConfigError, DataError
from raycxr.storage import write_atomic

if TYPE_CHECKING:
    from raycxr.card import ModelCard

log = logging.getLogger(__name__)


def evaluate_model(model_dir: str | Path, data_dir: str | Path, *, split: str = "holdout", n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Score a promoted model on any ingested dataset (external validation), with the model's own
    calibration and threshold; written to ``MODEL/evaluations/FINGERPRINT-SPLIT.json`` and, when the
    data is not the model's own, added to the model card's internal-vs-external comparison."""
    from raycxr.card import ModelCard, write_model_card
    from raycxr.data import SPLITS, split_arrays
    from raycxr.metrics import bias_shift, calibrate_logits, report
    from raycxr.predict import load_promoted, target_logits, write_predictions
    from raycxr.report import refresh_report

    if split not in (*SPLITS, "all"):
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join((*SPLITS, 'all'))}", source="--split")
    model, promoted = load_promoted(model_dir)
    spec = promoted.spec
    manifest = read_manifest(data_dir)
    # a folder without its card is still scored; only the card's comparison is skipped
    card = ModelCard.load(model_dir) if (Path(model_dir) / ModelCard.FILE).exists() else None
    own = card is not None and manifest.fingerprint == card.data["fingerprint"]
    earlier = []
    if split in ("holdout", "all"):  # a read of the dataset's holdout films, logged before it happens
        from raycxr.ledger import Films, log_read, split_digest, user_ledgers

        earlier = log_read([Films(data_dir, manifest.fingerprint, "holdout", split_digest(data_dir, "holdout"))],
                           by="evaluate", model=str(Path(model_dir).resolve()))
        if own or earlier:
            log.warning("these holdout films were read %d time(s) before (%s); figures from repeated holdout reads are "
                        "optimistic. Use another dataset for external validation.", max(len(earlier), int(own)),
                        "by this model's promote" if own and not earlier else
                        f"see DATA/holdout_reads.jsonl and {user_ledgers()}")
    splits = list(SPLITS) if split == "all" else [split]
    parts = [split_arrays(data_dir, s, spec.target) for s in splits]
    y, g, src = (np.concatenate([getattr(part, f) for part in parts]) for f in ("y", "groups", "sources"))
    if len(y) == 0:
        raise DataError(f"{data_dir} ({split}) has no images with a known {spec.target} label to score")
    z = np.concatenate([target_logits(model, spec, part.images, progress=f"scoring {name}")
                        for name, part in zip(splits, parts)])
    probabilities = calibrate_logits(z, promoted.calibration)
    result = {"data": location(data_dir), "fingerprint": manifest.fingerprint, "split": split,
              "target": spec.target, "threshold": promoted.threshold, "calibration": promoted.calibration,
              "sources": sorted(set(src)), "holdout_previously_read": len(earlier),
              "metrics": report(y, probabilities, groups=g, sources=src,
                                threshold=promoted.threshold, n_boot=n_boot, seed=seed,
                                prior_shift=bias_shift(promoted.calibration))}
    result["overlap"] = overlap = (training_overlap(card, model_dir, data_dir, splits) if card is not None and not own
                                   else None)
    out = Path(model_dir) / "evaluations" / f"{manifest.fingerprint}-{split}.json"
    out.parent.mkdir(exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2, default=str) + "\n", mode=0o644)
    result["predictions"] = str(write_predictions(out.with_name(out.stem + "-predictions.csv"), sources=src, groups=g,
                                                  y=y, probabilities=probabilities))
    if card is not None and not own:  # the card compares internal with every external evaluation (one entry per dataset and split)
        pooled = result["metrics"]["pooled"]
        where = result["data"] if is_uri(result["data"]) else os.path.relpath(result["data"], Path(model_dir).resolve())
        entry = {"data": where, "fingerprint": result["fingerprint"], "split": split,
                 "sources": result["sources"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 **{k: pooled[k] for k in ("n", "positives", "auc", "accuracy", "sensitivity", "specificity")},
                 "ci95": {k: pooled["ci95"][k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
                 "overlap": overlap}
        if overlap["images"] or not overlap["checked"]:
            log.warning("%s: the model card lists it apart, not as external validation", overlap["verdict"])
        card.external = [e for e in card.external if (e["fingerprint"], e["split"]) != (entry["fingerprint"], split)]
        card.external.append(entry)
        card.save(model_dir)  # whole or not at all
        write_model_card(card, Path(model_dir) / "model_card.md")
        refresh_report(Path(model_dir), card)
    result["written_to"] = str(out)
    return result


def _stored(data_dir: Path, splits) -> tuple[list[str], list[np.ndarray]]:
    """(content hashes, stored pixels) of every film of ``splits`` of an ingested dataset."""
    from raycxr.data import decode_images, read_split

    hashes, images = [], []
    for split in splits:
        table = read_split(data_dir, split, columns=["content_hash", "image", "height", "width"])
        hashes += table.column("content_hash").to_pylist()
        images += list(decode_images(table.select(["image", "height", "width"]).to_pydict())[:, 0])
    return hashes, images


OVERLAP_SIMILARITY = 0.99


def training_overlap(card: ModelCard, model_dir: str | Path, data_dir: str | Path, splits: list[str]) -> dict:
    """How many films of ``data_dir``'s ``splits`` the model saw in training or validation: the same
    file (content hash) or a copy of one film (ingest's cross-dataset twin test, on the stored
    pixels: another size, crop or re-encoding of it, e.g. PneumoniaMNIST's 28 px copies of Kermany's
    films). An evaluation with any overlap is not external validation, and the card says so."""
    from raycxr.dedup import cross_source_twins, twin_views

    train_dir = card.data_dir(model_dir)
    where = card.data["dir"]  # as the card has it: relative to the model folder
    try:
        if read_manifest(train_dir).fingerprint != card.data["fingerprint"]:
            raise DataError("another dataset")
    except (DataError, OSError, KeyError, TypeError, ValueError):
        return {"checked": False, "images": None, "same_files": None, "twins": None, "training_data": where,
                "verdict": f"overlap with the training data not checked: the model's training data is not at "
                           f"{where} from the model folder (evaluate on the machine that holds both)"}
    theirs, their_pixels = _stored(train_dir, ("train", "val"))
    ours, our_pixels = _stored(data_dir, splits)
    seen = set(theirs)
    same = {i for i, h in enumerate(ours) if h in seen}
    views = [twin_views(img) for img in our_pixels] + [twin_views(img) for img in their_pixels]
    # stricter than ingest's 0.97: both sides are stored pixels of one size, where a copy of a film
    # scores 0.9994 or more and two different films of one source up to 0.976 (the bundled films)
    pairs = cross_source_twins(views, ["evaluated"] * len(ours) + ["training"] * len(theirs),
                               min_similarity=OVERLAP_SIMILARITY)
    twins = {min(i, j) for i, j, _ in pairs} - same  # our films come first in the list
    n = len(same | twins)
    verdict = (f"overlaps training data ({n} images: {len(same)} identical files, {len(twins)} copies of a training "
               f"or validation film)" if n else "external: no film shared with the model's training or validation data")
    return {"checked": True, "images": n, "same_files": len(same), "twins": len(twins), "training_data": where,
            "verdict": verdict}
