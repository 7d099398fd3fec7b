"""NIH ChestX-ray14 (also published as "NIH Chest X-ray" / "Chest X-ray 14"): one dataset.

Layout under the root: ``Data_Entry_2017*.csv`` (columns ``Image Index``, ``Finding Labels``
joined by ``|``, ``Patient ID``, ``View Position``, ...) and the PNGs anywhere below
(``images/``, or Kaggle's ``images_001/images/`` ... ``images_012/images/``).
``train_val_list.txt`` / ``test_list.txt``, when present, are honoured (the official split is
patient-disjoint): test-list images go to the holdout; train_val-list images are split into train /
val only. With ``train_val_list.txt`` alone, every image it does not list is an official test image.
An image that neither list names goes to train / val (never the holdout the lists fix).

Labels: every listed finding 1, every other of the fourteen 0; ``No Finding`` -> no_finding 1
and all fourteen 0. NIH labels were mined from reports by NLP (about 90% accurate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from raycxr.labels import NIH_NAMES
from raycxr.sources import Record, bad_row, file_name_cell, find_files, normalise_view, read_rows, register


def _labels(text: str) -> tuple[dict, str]:
    names = [t.strip() for t in text.split("|") if t.strip()]
    if names == ["No Finding"]:
        return {**{v: 0 for v in NIH_NAMES.values()}, "no_finding": 1}, ""
    if not names or any(n not in NIH_NAMES for n in names):  # the cell itself is never quoted
        return {}, f"unknown label: a Finding Labels value outside NIH's vocabulary (No Finding, {', '.join(NIH_NAMES)})"
    labels = {v: 0 for v in NIH_NAMES.values()}
    labels.update({NIH_NAMES[n]: 1 for n in names})
    labels["no_finding"] = 0
    return labels, ""


def _official_split(name: str, test: set | None, train_val: set | None) -> str | None:
    """``holdout`` for an official test image, ``train_val`` for an official train/val one."""
    if test is not None and name in test:
        return "holdout"
    if train_val is not None and name in train_val:
        return "train_val"
    if test is None and train_val is not None:
        return "holdout"  # the official lists cover every image: what train_val does not list is test
    return None


@register("nih")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    entries = sorted(root.glob("Data_Entry_2017*.csv"))
    if not entries:
        raise DataError(f"source nih: no Data_Entry_2017*.csv under {root}; download it with the images")
    test_list, train_val_list = root / "test_list.txt", root / "train_val_list.txt"
    test = set(test_list.read_text().split()) if test_list.exists() else None
    train_val = set(train_val_list.read_text().split()) if train_val_list.exists() else None
    files = find_files(root, {".png"})
    listed = set()
    for row in read_rows(entries[0], source="nih", required=["Image Index", "Finding Labels", "Patient ID"]):
        name, pid = row["Image Index"].strip(), (row.get("Patient ID") or "").strip()
        if row["_problem"] or not name or not pid or not file_name_cell(name):
            yield bad_row(entries[0], root, row, "nih", row["_problem"] or (
                "blank Image Index or Patient ID" if not (name and pid) else "Image Index is not a plain name (a "
                                                                             "path separator or '..')"))
            continue
        listed.add(name)
        labels, error = _labels(row.get("Finding Labels") or "")
        path = files.get(name)
        if path is None:
            error = error or ("missing file: listed in Data_Entry_2017 but not found under the root (a partial "
                              "download? the images come in 12 archives, images_001 ... images_012)")
        yield Record(
            path=path or root / name, rel_path=(path or root / name).relative_to(root).as_posix(),
            source="nih", patient_key=pid, labels=labels,
            label_detail=row.get("Finding Labels") or "", view=normalise_view(row.get("View Position")),
            fixed_split=_official_split(name, test, train_val), error=error)
    for name in sorted(set(files) - listed):
        yield Record(path=files[name], rel_path=files[name].relative_to(root).as_posix(), source="nih",
                     patient_key=f"unlisted:{name}", error="unlisted: no row of Data_Entry_2017 names this image")
