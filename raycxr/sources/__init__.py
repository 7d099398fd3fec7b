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
    split (NIH's ``test_list.txt`` -> ``holdout``); ``train_val`` keeps an image out of the holdout
    (train or val by the fractions asked for), and fixes that source's holdout to its pinned images.
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


def find_files(root: Path, suffixes: set[str], *, skip=None) -> dict[str, Path]:
    """File name -> path for every file under ``root`` with one of ``suffixes`` (lower case),
    leaving out paths (relative to ``root``) for which ``skip`` says so."""
    return {p.name: p for p in sorted(root.rglob("*")) if p.suffix.lower() in suffixes and p.is_file()
            and not (skip and skip(p.relative_to(root)))}


def is_file(path: Path) -> bool:
    """Whether a file a table names is there; a name the system cannot even look up (longer than
    the filesystem allows, a NUL byte in it) is not, rather than an error that ends the ingest."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def file_name_cell(*cells: str) -> bool:
    """Whether cells that name one file each (an ID a dataset's table joins into a path) are plain
    names: no path separator, no NUL, not '.' or '..' (a hostile table cannot point outside the root)."""
    return all(c and c not in (".", "..") and not any(ch in c for ch in "/\\\0") for c in cells)


def table_path(root: Path, name: str) -> Path:
    """``root/name``, or its gzipped form ``root/name.gz`` as PhysioNet ships MIMIC's CSVs."""
    plain = root / name
    return plain if plain.exists() or not (root / f"{name}.gz").exists() else root / f"{name}.gz"


# The most a label table may hold, decompressed (MIMIC-CXR's largest CSV is about 60 MB; NIH's
# Data_Entry_2017 9 MB): a .csv.gz that inflates past it (a gzip bomb) stops there, never in memory.
MAX_TABLE_BYTES = 1 << 30


def _read_table(path: Path, *, source: str, limit: int | None = None) -> bytes:
    """A table's bytes, a ``.gz`` inflated in 1 MB steps: at most ``limit`` (MAX_TABLE_BYTES) read."""
    import gzip

    from raycxr.errors import DataError

    limit = MAX_TABLE_BYTES if limit is None else limit
    too_big = DataError(f"source {source}: {path.name} holds more than {limit / 2**20:.0f} MB of table"
                        f"{' once decompressed' if path.suffix == '.gz' else ''}: not a label table raycxr reads "
                        "(is it the file the README names?)")
    if path.suffix != ".gz":
        if path.stat().st_size > limit:
            raise too_big
        return path.read_bytes()
    chunks, total = [], 0
    try:
        with gzip.open(path) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise too_big
                chunks.append(chunk)
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
        raise DataError(f"source {source}: {path.name} is not a readable gzip file ({type(exc).__name__})") from None
    return b"".join(chunks)


# Delimiters seen in real exports: commas, Excel's semicolons (European locales), tabs.
_DELIMITERS = (",", ";", "\t")


def read_rows(path: Path, *, source: str, required: list[str], hint: str = "Is this the file the README names?"
              ) -> list[dict]:
    """Every data row of a CSV as users really have it, as dicts keyed by the stripped header.

    Reads ``.csv`` or ``.csv.gz``; strips a UTF-8 byte-order mark; falls back from UTF-8 to
    Windows-1252 (Excel's usual re-save) with a warning; takes the delimiter the header line
    uses most among comma, semicolon and tab. A header lacking any ``required`` column raises a
    DataError listing what is missing and what is there. Each row carries ``_line`` (its line in
    the file) and ``_problem``: "" or why the row cannot be used (fewer cells than the header).
    Values never appear in messages: source cells can hold patient data.
    """
    import csv
    import io

    from raycxr.errors import DataError

    raw = _read_table(path, source=source)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        import logging

        logging.getLogger(__name__).warning("source %s: %s is not UTF-8; read as Windows-1252 (Excel's encoding)",
                                            source, path.name)
        text = raw.decode("cp1252", errors="replace")
    header_line = text.split("\n", 1)[0]
    delimiter = max(_DELIMITERS, key=header_line.count) if any(d in header_line for d in _DELIMITERS) else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        shown = ", ".join(header[:15]) + (" ..." if len(header) > 15 else "")
        raise DataError(f"source {source}: {path.name} lacks column(s) {', '.join(missing)} (read with delimiter "
                        f"{delimiter!r}; its header has: {shown or 'nothing'}). {hint}")
    rows = []
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # blank line
        # every header column is a key (a short row's missing cells are ""), so an adapter can read any
        # column before it looks at _problem
        row = {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}
        row["_line"] = line
        row["_problem"] = (f"short row: line {line} has {len(cells)} of the header's {len(header)} cells"
                           if len(cells) < len(header) else "")
        rows.append(row)
    return rows


def bad_row(table: Path, root: Path, row: dict, source: str, problem: str) -> Record:
    """A quarantine record for a CSV row that names no usable image (its line stands in for a file)."""
    rel = f"{table.relative_to(root).as_posix() if table.is_relative_to(root) else table.name}:line{row['_line']}"
    return Record(path=table, rel_path=rel, source=source, patient_key=f"{table.name}:{row['_line']}",
                  error=f"unusable row: {problem}")


IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}


def unlisted(folder: Path, listed: set[str], root: Path, source: str, table: str) -> Iterator[Record]:
    """Quarantine records for image files in ``folder`` that no row of ``table`` names: counted and
    reported, never silently skipped (files in = rows written + quarantined)."""
    if not folder.is_dir():
        return
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in listed:
            yield Record(path=p, rel_path=p.relative_to(root).as_posix(), source=source,
                         patient_key=f"unlisted:{p.name}", error=f"unlisted: no row of {table} names this image")


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
