"""Any other collection (KIT, an in-house export, ...) through a CSV manifest.

``--source csv=PATH/manifest.csv``; paths in the CSV are relative to the CSV's folder (or
absolute). Default columns, each renamable with ``--source-option csv.COLUMN=HEADER``:

- ``path``: the image file (DICOM, PNG or JPEG);
- ``patient_id``: the patient's identity (hashed at ingest, never stored);
- ``labels``: findings separated by ``|`` or ``;``: a pooled finding name means 1,
  ``name=0`` means 0, ``normal`` means no_finding 1 and pneumonia 0; unlisted findings stay
  unknown;
- ``view`` (optional): PA, AP, LATERAL...

``--source-option csv.name=kit`` names the source in shards and metrics (default ``csv``).
Rows naming a missing file or an unknown label, short rows and rows with a blank path or
patient ID are quarantined with the reason (never the cell's text). The manifest may be
comma-, semicolon- or tab-separated, UTF-8 (with or without a byte-order mark) or Windows-1252,
plain or gzipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from raycxr.labels import FINDINGS
from raycxr.sources import Record, bad_row, is_file, normalise_view, read_rows, register


def parse_labels(text: str) -> tuple[dict, str]:
    out: dict[str, int] = {}
    for token in (t.strip() for t in text.replace(";", "|").split("|")):
        if not token:
            continue
        name, _, value = token.partition("=")
        name = name.strip().lower().replace(" ", "_")
        if name == "normal":
            out.update(no_finding=1, pneumonia=0)
            continue
        if name not in FINDINGS or value.strip() not in ("", "0", "1"):  # the cell itself is never quoted
            return {}, f"unknown label: not a pooled finding (use finding names: {', '.join(FINDINGS)}; or name=0, normal)"
        out[name] = int(value) if value.strip() else 1
    if not out:
        return {}, "unknown label: empty labels cell"
    return out, ""


@register("csv")
def scan(manifest: Path, *, path: str = "path", patient_id: str = "patient_id", labels: str = "labels",
         view: str = "view", name: str = "csv", **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    if manifest.is_dir():
        raise DataError(f"source csv: {manifest} is a folder; pass the manifest file: --source csv=PATH/manifest.csv")
    base = manifest.parent
    for row in read_rows(manifest, source=name, required=[path, patient_id, labels],
                         hint="Rename with --source-option csv.path=HEADER (and csv.patient_id, csv.labels)."):
        cell, pid = (row.get(path) or "").strip(), (row.get(patient_id) or "").strip()
        if row["_problem"] or not cell or not pid:
            yield bad_row(manifest, base, row, name, row["_problem"] or
                          f"blank {path if not cell else patient_id}: every image needs a file and a patient")
            continue
        file = Path(cell)
        file = file if file.is_absolute() else base / file
        parsed, error = parse_labels(row.get(labels) or "")
        if not error and not is_file(file):
            error = "missing file: named in the manifest but not found"
        try:
            rel = file.relative_to(base).as_posix()
        except ValueError:
            rel = file.as_posix()
        yield Record(path=file, rel_path=rel, source=name, patient_key=pid, labels=parsed,
                     label_detail=row.get(labels) or "", view=normalise_view(row.get(view)), error=error)
