"""RSNA Pneumonia Detection Challenge (stage 2).

Layout under the root: ``stage_2_train_images/*.dcm``, ``stage_2_train_labels.csv``
(``patientId,x,y,width,height,Target``: one row per box, several rows per image collapse to
one label) and, optionally, ``stage_2_detailed_class_info.csv`` (``patientId,class``).

Labels: Target 1 ("Lung Opacity", the challenge's pneumonia label) -> pneumonia 1; Target 0
-> pneumonia 0; class ``Normal`` -> no_finding 1, ``No Lung Opacity / Not Normal`` ->
no_finding 0. The view (PA / AP) is read from each DICOM header. RSNA's ``patientId`` names one
image; images are de-identified, so it is the only identity there is.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, normalise_view, register


def _view(path: Path) -> str:
    import pydicom

    try:
        return normalise_view(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("ViewPosition"))
    except Exception:  # an unreadable header is quarantined later, when the pixels are read
        return ""


@register("rsna")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    labels_csv = root / "stage_2_train_labels.csv"
    if not labels_csv.exists():
        raise DataError(f"source rsna: {labels_csv} is missing; the root must hold stage_2_train_labels.csv "
                        "and stage_2_train_images/")
    target: dict[str, int] = {}
    with open(labels_csv, newline="") as f:
        for row in csv.DictReader(f):
            pid = row["patientId"].strip()
            target[pid] = max(target.get(pid, 0), int(row["Target"]))
    detail: dict[str, str] = {}
    if (info := root / "stage_2_detailed_class_info.csv").exists():
        with open(info, newline="") as f:
            detail = {r["patientId"].strip(): r["class"].strip() for r in csv.DictReader(f)}
    images = root / "stage_2_train_images"
    for pid in sorted(target):
        path = images / f"{pid}.dcm"
        labels = {"pneumonia": target[pid]}
        cls = detail.get(pid, "")
        if cls == "Normal":
            labels["no_finding"] = 1
        elif cls:
            labels["no_finding"] = 0
        exists = path.is_file()
        yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source="rsna", patient_key=pid,
                     labels=labels, label_detail=cls or ("Lung Opacity" if target[pid] else ""),
                     view=_view(path) if exists else "",
                     error="" if exists else "missing file: listed in stage_2_train_labels.csv but not found")
