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

from pathlib import Path
from typing import Iterator

from raycxr.sources import (Record, bad_row, file_name_cell, is_file, normalise_view, read_rows, register, table_path,
                            unlisted)


def _view(path: Path) -> str:
    from raycxr.imaging import read_dicom_header

    try:
        return normalise_view(read_dicom_header(path).get("ViewPosition"))
    except Exception:  # an unreadable header is quarantined later, when the pixels are read
        return ""


@register("rsna")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    labels_csv = table_path(root, "stage_2_train_labels.csv")
    if not labels_csv.exists():
        raise DataError(f"source rsna: {labels_csv} is missing; the root must hold stage_2_train_labels.csv "
                        "and stage_2_train_images/")
    target: dict[str, int] = {}
    for row in read_rows(labels_csv, source="rsna", required=["patientId", "Target"]):
        pid, value = row["patientId"].strip(), (row.get("Target") or "").strip()
        problem = row["_problem"] or ("blank patientId" if not pid else "") or (
            "patientId is not a plain name (a path separator or '..')" if not file_name_cell(pid) else "") or (
            "unknown label: Target is not 0 or 1" if value not in ("0", "1", "0.0", "1.0") else "")
        if problem:
            yield bad_row(labels_csv, root, row, "rsna", problem)
            continue
        target[pid] = max(target.get(pid, 0), int(float(value)))
    detail: dict[str, str] = {}
    if (info := table_path(root, "stage_2_detailed_class_info.csv")).exists():
        detail = {r["patientId"].strip(): r["class"].strip() for r in
                  read_rows(info, source="rsna", required=["patientId", "class"]) if not r["_problem"]}
    images = root / "stage_2_train_images"
    for pid in sorted(target):
        path = images / f"{pid}.dcm"
        labels = {"pneumonia": target[pid]}
        cls = detail.get(pid, "")
        if cls == "Normal":
            labels["no_finding"] = 1
        elif cls:
            labels["no_finding"] = 0
        exists = is_file(path)
        yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source="rsna", patient_key=pid,
                     labels=labels, label_detail=cls or ("Lung Opacity" if target[pid] else ""),
                     view=_view(path) if exists else "",
                     error="" if exists else "missing file: listed in stage_2_train_labels.csv but not found "
                                             "(download stage_2_train_images)")
    yield from unlisted(images, {f"{pid}.dcm" for pid in target}, root, "rsna", "stage_2_train_labels.csv")
