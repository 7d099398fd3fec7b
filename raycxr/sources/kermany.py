"""Kermany et al. 2018 pediatric pneumonia (Kaggle "Chest X-Ray Images (Pneumonia)", Mendeley).

Layout: any folder tree whose leaf folders are named ``NORMAL`` or ``PNEUMONIA``: the Kaggle
``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` layout and the Mendeley V2
``ChestXRay2017/chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg`` layout alike. Every image
found is pooled (once: Kaggle's zip nests a second copy under ``chest_xray/chest_xray/`` and
adds ``__MACOSX/``, both skipped); the official split folders are ignored because raycxr carves its own
patient-disjoint splits. Labels: PNEUMONIA -> pneumonia 1, no_finding 0; NORMAL -> pneumonia 0,
no_finding 1; ``bacteria`` / ``virus`` from the file name kept as ``label_detail``. All views are
frontal (AP, children).

Patient identity comes from the file name:
- ``IM-NNNN-MMMM[-KKKK].jpeg``        -> normal patient ``IM-NNNN``
- ``NORMAL2-IM-NNNN-MMMM.jpeg``       -> normal patient ``NORMAL2-NNNN`` (a second series)
- ``personN_{bacteria,virus}_M.jpeg`` -> patient ``personN`` across both types: the dataset does
  not say whether the number is per type, so we group conservatively (merging two children
  into one split group is harmless; splitting one child across splits is a leak).
A name matching none of these becomes its own patient (its file stem), which is still safe.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, register

_CLASS_DIRS = {"NORMAL": 0, "PNEUMONIA": 1}
_NORMAL2 = re.compile(r"^NORMAL2-IM-(\d+)-", re.IGNORECASE)
_NORMAL = re.compile(r"^IM-(\d+)-", re.IGNORECASE)
_PERSON = re.compile(r"^person(\d+)_(bacteria|virus)_\d+", re.IGNORECASE)


def patient_key(file_name: str) -> str:
    """Patient identity from a Kermany file name (see the module docstring)."""
    if m := _NORMAL2.match(file_name):
        return f"NORMAL2-{int(m.group(1))}"
    if m := _NORMAL.match(file_name):
        return f"IM-{int(m.group(1))}"
    if m := _PERSON.match(file_name):
        return f"person{int(m.group(1))}"
    return f"file:{Path(file_name).stem}"


def _detail(file_name: str, label: int) -> str:
    if m := _PERSON.match(file_name):
        return m.group(2).lower()
    return "pneumonia" if label else "normal"


@register("kermany")
def scan(root: Path, **_) -> Iterator[Record]:
    found = sorted(
        (p for p in root.rglob("*")
         if p.is_file() and p.parent.name.upper() in _CLASS_DIRS and not p.name.startswith(".")
         and "__MACOSX" not in p.relative_to(root).parts),  # macOS resource forks in the Kaggle zip
        key=lambda p: (len(p.relative_to(root).parts), p.as_posix()))
    # Kaggle's archive holds everything twice (chest_xray/ and chest_xray/chest_xray/): one film is
    # one (split folder, class folder, file name), counted once, at its shallowest path.
    paths, seen = [], set()
    for p in found:
        if (key := tuple(part.upper() for part in p.parts[-3:])) not in seen:
            seen.add(key)
            paths.append(p)
    for path in sorted(paths):
        label = _CLASS_DIRS[path.parent.name.upper()]
        yield Record(
            path=path,
            rel_path=path.relative_to(root).as_posix(),
            source="kermany",
            patient_key=patient_key(path.name),
            labels={"pneumonia": label, "no_finding": 1 - label},
            label_detail=_detail(path.name, label),
            view="AP",
        )
