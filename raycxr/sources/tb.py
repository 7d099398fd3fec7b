"""Tuberculosis screening sets from the NLM: Montgomery County (USA) and Shenzhen (China).

Layouts as shipped: Montgomery ``MontgomerySet/CXR_png/MCUCXR_####_{0,1}.png`` with
``ClinicalReadings/*.txt`` and lung masks of the same names in ``ManualMask/{left,right}Mask/``;
Shenzhen ``ChinaSet_AllFiles/CXR_png/CHNCXR_####_{0,1}.png`` with ``ClinicalReadings/`` (its
masks, published separately, are ``mask/CHNCXR_####_{0,1}_mask.png``). The last digit: 1
tuberculosis, 0 normal. Films are the PNGs anywhere below the root except lung masks (any folder
whose name contains "mask", or a ``*_mask.png``): a mask shares its film's name and would
otherwise be read, or even taken, in its place.

Labels: tuberculosis from the name; the 0 films are read as normal (no_finding 1), the 1 films
as abnormal (no_finding 0). Pneumonia is unknown: these sources never teach it directly.
All films are PA. One film per patient: the number is the identity.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, find_files, register


def is_mask(path: Path) -> bool:
    """A segmentation mask shipped beside the films, not a film."""
    return path.stem.lower().endswith("_mask") or any("mask" in part.lower() for part in path.parent.parts)

_NAMES = {"montgomery": re.compile(r"^(MCUCXR_\d+)_([01])\.png$", re.I),
          "shenzhen": re.compile(r"^(CHNCXR_\d+)_([01])\.png$", re.I)}


def _scan(key: str, root: Path) -> Iterator[Record]:
    pattern = _NAMES[key]
    for name, path in find_files(root, {".png"}, skip=is_mask).items():
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
