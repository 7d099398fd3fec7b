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

import csv
from pathlib import Path
from typing import Iterator

from raycxr.labels import NIH_NAMES
from raycxr.sources import Record, find_files, normalise_view, register


def _labels(text: str) -> tuple[dict, str]:
    names = [t.strip() for t in text.split("|") if t.strip()]
    if names == ["No Finding"]:
        return {**{v: 0 for v in NIH_NAMES.values()}, "no_finding": 1}, ""
    unknown = [n for n in names if n not in NIH_NAMES]
    if unknown or not names:
        return {}, f"unknown label: {'|'.join(unknown) or 'empty'} (NIH vocabulary: No Finding, {', '.join(NIH_NAMES)})"
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
    with open(entries[0], newline="") as f:
        for row in csv.DictReader(f):
            name = row["Image Index"].strip()
            labels, error = _labels(row.get("Finding Labels", ""))
            path = files.get(name)
            if path is None:
                error = error or "missing file: listed in Data_Entry_2017 but not found under the root"
            yield Record(
                path=path or root / name, rel_path=(path or root / name).relative_to(root).as_posix(),
                source="nih", patient_key=row["Patient ID"].strip(), labels=labels,
                label_detail=row.get("Finding Labels", ""), view=normalise_view(row.get("View Position")),
                fixed_split="holdout" if name in test else None, error=error)
