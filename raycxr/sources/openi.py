"""Open-I / Indiana University chest X-ray collection, in its common CSV variant.

Layout under the root: ``indiana_reports.csv`` (``uid``, ``MeSH``, ``Problems``, ``image``,
``indication``, ``comparison``, ``findings``, ``impression``), ``indiana_projections.csv``
(``uid``, ``filename``, ``projection``: Frontal / Lateral) and the PNGs anywhere below (e.g.
``images/images_normalized/``).

Labels from the report's MeSH and Problems fields: ``normal`` alone -> pneumonia 0,
no_finding 1; any ``Pneumonia`` term -> pneumonia 1, no_finding 0; other findings ->
pneumonia 0, no_finding 0 (the reports list every finding). Identity: the report ``uid``
(Open-I is de-identified; one report per study).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, find_files, normalise_view, register


def _labels(mesh: str, problems: str) -> dict:
    terms = [t.strip().lower() for t in f"{mesh};{problems}".replace("|", ";").split(";") if t.strip()]
    if terms and all(t == "normal" for t in terms):
        return {"pneumonia": 0, "no_finding": 1}
    if any(t.startswith("pneumonia") for t in terms):
        return {"pneumonia": 1, "no_finding": 0}
    return {"pneumonia": 0, "no_finding": 0} if terms else {}


@register("openi")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    reports, projections = root / "indiana_reports.csv", root / "indiana_projections.csv"
    for f in (reports, projections):
        if not f.exists():
            raise DataError(f"source openi: {f.name} is missing under {root}")
    with open(reports, newline="") as f:
        by_uid = {r["uid"].strip(): r for r in csv.DictReader(f)}
    files = find_files(root, {".png", ".jpg", ".jpeg", ".dcm"})
    with open(projections, newline="") as f:
        for row in csv.DictReader(f):
            uid, name = row["uid"].strip(), row["filename"].strip()
            report = by_uid.get(uid)
            labels = _labels(report.get("MeSH", ""), report.get("Problems", "")) if report else {}
            path = files.get(name)
            error = ""
            if report is None:
                error = "no labels: uid missing from indiana_reports.csv"
            elif not labels:
                error = "no labels: empty MeSH and Problems fields"
            elif path is None:
                error = "missing file: listed in indiana_projections.csv but not found"
            yield Record(path=path or root / name, rel_path=(path or root / name).relative_to(root).as_posix(),
                         source="openi", patient_key=uid, labels=labels,
                         label_detail=(report or {}).get("Problems", ""),
                         view=normalise_view(row.get("projection")), error=error)
