"""MIMIC-CXR-JPG (PhysioNet, credentialed access).

Layout under the root: ``files/pXX/pNNNNNNNN/sNNNNNNNN/DICOM_ID.jpg``,
``mimic-cxr-2.0.0-chexpert.csv`` (or ``.csv.gz``, as PhysioNet ships both CSVs; per study: 1 positive, 0 negative, -1 uncertain, blank not
mentioned) and ``mimic-cxr-2.0.0-metadata.csv`` (per image: ``dicom_id``, ``ViewPosition``).

Uncertain-label policy (``--source-option mimic.uncertain=ignore|zeros|ones``): ``ignore``
(default, CheXpert's U-Ignore) leaves -1 unknown and masked in the loss; ``zeros`` / ``ones``
map it to 0 / 1. Blank (not mentioned) is unknown, except that ``No Finding`` = 1 makes every
mapped finding 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from raycxr.sources import (Record, bad_row, file_name_cell, is_file, normalise_view, read_rows, register,
                            table_path)

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
        try:
            v = int(float(raw))
        except ValueError:
            continue  # not a CheXpert value: unknown
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
    chexpert = table_path(root, "mimic-cxr-2.0.0-chexpert.csv")
    meta = table_path(root, "mimic-cxr-2.0.0-metadata.csv")
    for f in (chexpert, meta):
        if not f.exists():
            raise DataError(f"source mimic: {f.name} (or {f.name}.gz, as PhysioNet ships it) is missing under {root}")
    studies = {(r["subject_id"].strip(), r["study_id"].strip()): r
               for r in read_rows(chexpert, source="mimic", required=["subject_id", "study_id"]) if not r["_problem"]}
    for row in read_rows(meta, source="mimic", required=["subject_id", "study_id", "dicom_id"]):
        subject, study, dicom = (row.get(k, "").strip() for k in ("subject_id", "study_id", "dicom_id"))
        if row["_problem"] or not (subject and study and dicom) or not file_name_cell(subject, study, dicom):
            yield bad_row(meta, root, row, "mimic", row["_problem"] or (
                "blank subject_id, study_id or dicom_id" if not (subject and study and dicom) else
                "subject_id, study_id or dicom_id is not a plain name (a path separator or '..')"))
            continue
        path = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        error = ""
        if (subject, study) not in studies:
            error = "no labels: study missing from mimic-cxr-2.0.0-chexpert.csv"
        elif not is_file(path):
            error = "missing file: listed in the metadata CSV but not found"
        yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source="mimic", patient_key=subject,
                     labels=_labels(studies.get((subject, study), {}), _POLICIES[uncertain]),
                     view=normalise_view(row.get("ViewPosition")), error=error)
