"""NIH ChestX-ray14 (also published as "NIH Chest X-ray" / "Chest X-ray 14"): one dataset.

Layout under the root: ``Data_Entry_2017*.csv`` (columns ``Image Index``, ``Finding Labels``
joined by ``|``, ``Patient ID``, ``View Position``, ...) and the PNGs anywhere below
(``images/``, or Kaggle's ``images_001/images/`` ... ``images_012/images/``).
``train_val_list.txt`` / ``test_list.txt``, when present, are honoured: test-list images go to
the holdout (the official split is patient-disjoint); the rest is split into train / val.

Labels: every listed finding 1, every other of the fourteen 0; ``No Finding`` -> no_finding 1
and all fourteen 0. NIH labels were mined from reports by NLP (about 90% accurate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from raycxr.labels import NIH_NAMES
from raycxr.sources import Record, bad_row, find_files, normalise_view, read_rows, register


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


@register("nih")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    entries = sorted(root.glob("Data_Entry_2017*.csv"))
    if not entries:
        raise DataError(f"source nih: no Data_Entry_2017*.csv under {root}; download it with the images")
    test_list = root / "test_list.txt"
    test = set(test_list.read_text().split()) if test_list.exists() else set()
    files = find_files(root, {".png"})
    listed = set()
    for row in read_rows(entries[0], source="nih", required=["Image Index", "Finding Labels", "Patient ID"]):
        name, pid = row["Image Index"].strip(), (row.get("Patient ID") or "").strip()
        if row["_problem"] or not name or not pid:
            yield bad_row(entries[0], root, row, "nih", row["_problem"] or "blank Image Index or Patient ID")
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
            fixed_split="holdout" if name in test else None, error=error)
    for name in sorted(set(files) - listed):
        yield Record(path=files[name], rel_path=files[name].relative_to(root).as_posix(), source="nih",
                     patient_key=f"unlisted:{name}", error="unlisted: no row of Data_Entry_2017 names this image")
