"""Dataset adapters: one small module per public chest X-ray dataset, one contract.

An adapter is a function ``scan(root: Path) -> Iterator[Record]`` registered under a key
(the ``KEY`` in ``raycxr ingest --source KEY=PATH``). It only walks the published on-disk
layout and reads labels and identity from names or metadata; pixels are decoded later by
:mod:`raycxr.imaging`, in parallel, so a bad file is quarantined rather than fatal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

_ADAPTERS: dict[str, Callable[[Path], Iterator["Record"]]] = {}


@dataclass(frozen=True)
class Record:
    """One image file as an adapter found it, before decoding.

    ``patient_key`` is the raw identity (never stored: ingest keeps only a salted hash).
    ``label`` is 1 for pneumonia, 0 for normal. ``label_detail`` keeps a finer class
    (for Kermany: ``normal``, ``bacteria`` or ``virus``).
    """

    path: Path
    rel_path: str
    source: str
    patient_key: str
    label: int
    label_detail: str


def register(key: str):
    """Register an adapter's ``scan`` function under ``key``."""

    def wrap(fn):
        _ADAPTERS[key] = fn
        return fn

    return wrap


def list_sources() -> list[str]:
    return sorted(_ADAPTERS)


def scan_source(key: str, root: Path) -> Iterator[Record]:
    """Yield every record that the adapter ``key`` finds under ``root``."""
    from raycxr.errors import DataError

    if key not in _ADAPTERS:
        raise DataError(f"unknown source {key!r}; use one of: {', '.join(list_sources())}")
    if not root.is_dir():
        raise DataError(f"source {key}: {root} is not a folder; pass --source {key}=PATH_TO_DATASET_ROOT")
    return _ADAPTERS[key](root)


# Importing the adapter modules registers them.
from raycxr.sources import kermany  # noqa: E402,F401
