"""MIMIC-CXR-JPG (PhysioNet, credentialed access).

Layout under the root: ``files/pXX/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg``,
``mimic-cxr-2.0.0-chexpert.csv`` (per study: 1 positive, 0 negative, -1 uncertain, blank not
mentioned) and ``mimic-cxr-2.0.0-metadata.csv`` (per image: ``dicom_id``, ``ViewPosition``).

Uncertain-label policy (``--source-option mimic.uncertain=ignore|zeros|ones``): ``ignore``
(default, CheXpert's U-Ignore) leaves -1 unknown and masked in the loss; ``zeros`` / ``ones``
map it to 0 / 1. Blank (not mentioned) is unknown, except that ``No Finding`` = 1 makes every
mapped finding 0.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, normalise_view, register

# CheXpert labeller column -> pooled finding
_COLUMNS = {"Pneumonia": "pneumonia", "No Finding": "no_finding", "Atelectasis": "atelectasis",
            "Cardiomegaly": "cardiomegaly", "Pleural Effusion": "effusion", "Pneumothorax": "pneumothorax",
            "Consolidation": "consolidation", "Edema": "edema"}
_POLICIES = {"ignore": None, "zeros": 0, "ones": 1}


def _labels(row: dict, uncertain) -> dict:
    out = {}
    for col, finding in _COLUMNS.items():
        raw = (row.get(col) or "").strip()
        if raw in ("", "nan"):
            continue
        v = int(float(raw))
        if v == -1:
            if uncertain is None:
                continue
            v = uncertain
        out[finding] = v
    if out.get("no_finding") == 1:
        out.update({f: 0 for f in _COLUMNS.values() if f != "no_finding" and f not in out})
    return out


@register("mimic")
def scan(root: Path, *, uncertain: str = "ignore", **_) -> Iterator[Record]:
    from raycxr.errors import ConfigError, DataError

    if uncertain not in _POLICIES:
        raise ConfigError(f"mimic.uncertain={uncertain!r}; allowed: {', '.join(_POLICIES)}", source="--source-option")
    chexpert, meta = root / "mimic-cxr-2.0.0-chexpert.csv", root / "mimic-cxr-2.0.0-metadata.csv"
    for f in (chexpert, meta):
        if not f.exists():
            raise DataError(f"source mimic: {f.name} is missing under {root}")
    with open(chexpert, newline="") as f:
        studies = {(r["subject_id"], r["study_id"]): r for r in csv.DictReader(f)}
    with open(meta, newline="") as f:
        for row in csv.DictReader(f):
            subject, study = row["subject_id"].strip(), row["study_id"].strip()
            path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{row['dicom_id'].strip()}.jpg"
            error = ""
            if (subject, study) not in studies:
                error = "no labels: study missing from mimic-cxr-2.0.0-chexpert.csv"
            elif not path.is_file():
                error = "missing file: listed in the metadata CSV but not found"
            yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source="mimic", patient_key=subject,
                         labels=_labels(studies.get((subject, study), {}), _POLICIES[uncertain]),
                         view=normalise_view(row.get("ViewPosition")), error=error)
