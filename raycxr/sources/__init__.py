"""Dataset adapters: one small module per public chest X-ray dataset, one contract.

An adapter is a function ``scan(root: Path) -> Iterator[Record]`` registered under a key
(the ``KEY`` in ``raycxr ingest --source KEY=PATH``). It only walks the published on-disk
layout and reads labels and identity from names or metadata; pixels are decoded later by
:mod:`raycxr.imaging`, in parallel, so a bad file is quarantined rather than fatal. A row the
adapter itself cannot use (a CSV row naming a missing file, an unknown label) is yielded with
``error`` set, so that it is quarantined with its reason instead of silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

_ADAPTERS: dict[str, Callable[[Path], Iterator["Record"]]] = {}


@dataclass(frozen=True)
class Record:
    """One image file as an adapter found it, before decoding.

    ``patient_key`` is the raw identity (never stored: ingest keeps only a salted hash).
    ``labels`` maps pooled findings (:data:`raycxr.labels.FINDINGS`) to 1 or 0; a finding left
    out is unknown. ``label_detail`` keeps the source's finer class (Kermany: ``normal``,
    ``bacteria`` or ``virus``). ``view`` is ``PA``, ``AP``, ``FRONTAL`` (PA or AP, unstated), ``LATERAL`` or ``""``.
    ``fmt`` names a special pixel format (``jsrt`` raw files). ``fixed_split`` pins an official
    split (NIH's ``test_list.txt`` -> ``holdout``).
    """

    path: Path
    rel_path: str
    source: str
    patient_key: str
    labels: dict = field(default_factory=dict)
    label_detail: str = ""
    view: str = ""
    fmt: str = ""
    fixed_split: str | None = None
    error: str = ""


def register(key: str):
    """Register an adapter's ``scan`` function under ``key``."""

    def wrap(fn):
        _ADAPTERS[key] = fn
        return fn

    return wrap


def list_sources() -> list[str]:
    return sorted(_ADAPTERS)


def scan_source(key: str, root: Path, **options) -> Iterator[Record]:
    """Yield every record that the adapter ``key`` finds under ``root``."""
    from raycxr.errors import DataError

    if key not in _ADAPTERS:
        raise DataError(f"unknown source {key!r}; use one of: {', '.join(list_sources())}")
    if not root.exists() or (key not in ("csv", "pneumoniamnist") and not root.is_dir()):
        raise DataError(f"source {key}: {root} is not a folder; pass --source {key}=PATH_TO_DATASET_ROOT")
    return _ADAPTERS[key](root, **options)


def find_files(root: Path, suffixes: set[str]) -> dict[str, Path]:
    """File name -> path for every file under ``root`` with one of ``suffixes`` (lower case)."""
    return {p.name: p for p in sorted(root.rglob("*")) if p.suffix.lower() in suffixes and p.is_file()}


def normalise_view(value) -> str:
    v = str(value or "").strip().upper()
    if v in {"PA", "AP", "AP AXIAL", "PA LLD"} or v.startswith(("PA", "AP")):
        return v[:2]
    if v in {"LL", "LATERAL", "RL", "LAT", "L"} or "LAT" in v:
        return "LATERAL"
    if v == "FRONTAL":
        return "FRONTAL"  # PA or AP, the source does not say which
    return ""


# Importing the adapter modules registers them.
from raycxr.sources import csv_manifest, jsrt, kermany, medmnist, mimic, nih, openi, rsna, tb  # noqa: E402,F401
