"""Tuberculosis screening sets from the NLM: Montgomery County (USA) and Shenzhen (China).

Layouts: Montgomery ``CXR_png/MCUCXR_####_{0,1}.png`` (with ``ClinicalReadings/``), Shenzhen
``CXR_png/CHNCXR_####_{0,1}.png`` (the last digit: 1 tuberculosis, 0 normal). PNGs are found
anywhere below the root.

Labels: tuberculosis from the name; the 0 films are read as normal (no_finding 1), the 1 films
as abnormal (no_finding 0). Pneumonia is unknown: these sources never teach it directly.
All films are PA. One film per patient: the number is the identity.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, find_files, register

_NAMES = {"montgomery": re.compile(r"^(MCUCXR_\d+)_([01])\.png$", re.I),
          "shenzhen": re.compile(r"^(CHNCXR_\d+)_([01])\.png$", re.I)}


def _scan(key: str, root: Path) -> Iterator[Record]:
    pattern = _NAMES[key]
    for name, path in find_files(root, {".png"}).items():
        m = pattern.match(name)
        if not m:
            yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source=key, patient_key=name,
                         error=f"unknown label: file name does not match {pattern.pattern}")
            continue
        tb = int(m.group(2))
        yield Record(path=path, rel_path=path.relative_to(root).as_posix(), source=key,
                     patient_key=m.group(1).upper(), labels={"tuberculosis": tb, "no_finding": 1 - tb},
                     label_detail="tuberculosis" if tb else "normal", view="PA")


@register("montgomery")
def scan_montgomery(root: Path, **_) -> Iterator[Record]:
    return _scan("montgomery", root)


@register("shenzhen")
def scan_shenzhen(root: Path, **_) -> Iterator[Record]:
    return _scan("shenzhen", root)
