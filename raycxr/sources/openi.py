"""Open-I / Indiana University chest X-ray collection, in its common CSV variant.

Layout under the root: ``indiana_reports.csv`` (``uid``, ``MeSH``, ``Problems``, ``image``,
``indication``, ``comparison``, ``findings``, ``impression``), ``indiana_projections.csv``
(``uid``, ``filename``, ``projection``: Frontal / Lateral) and the PNGs anywhere below (e.g.
``images/images_normalized/``).

Labels from the report's MeSH and Problems fields: ``normal`` alone -> pneumonia 0,
no_finding 1; any ``Pneumonia`` term -> pneumonia 1, no_finding 0; other findings ->
pneumonia 0, no_finding 0 (the reports list every finding). ``No Indexing`` (a report never
coded) is no label at all, and a report whose impression or findings raise pneumonia as a
possibility ("concerning for pneumonia", "cannot exclude pneumonia") leaves pneumonia unknown
rather than a hard negative. Identity: the report ``uid``
(Open-I is de-identified; one report per study).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import (Record, bad_row, file_name_cell, find_files, normalise_view, read_rows, register,
                            table_path)


# Words that make a report's mention of pneumonia a possibility rather than a finding.
_HEDGE = re.compile(r"\b(concerning for|cannot (be )?(exclude|excluded|ruled out|rule out)|can't (exclude|rule out)|"
                    r"not (be )?excluded|possibl[ey]|may (represent|reflect|be)|might|could (represent|reflect|be)|"
                    r"suggestive of|suspicious for|question(able)?|versus|vs|differential|likely|probabl[ey]|"
                    r"equivocal|early|developing|atelectasis or|or pneumoni)\b")
_NEGATED = re.compile(r"\b(no|without|negative for|free of|resolved|resolution of)\b[^.;]{0,40}pneumoni")


def pneumonia_uncertain(text: str) -> bool:
    """Whether a report sentence raises pneumonia as a possibility (hedged, not negated)."""
    for sentence in re.split(r"[.;\n]", (text or "").lower()):
        if "pneumoni" in sentence and _HEDGE.search(sentence) and not _NEGATED.search(sentence):
            return True
    return False


def _labels(mesh: str, problems: str, report_text: str = "") -> dict:
    terms = [t.strip().lower() for t in f"{mesh};{problems}".replace("|", ";").split(";") if t.strip()]
    terms = [t for t in terms if t != "no indexing"]  # "No Indexing": the report was never coded: unknown
    if not terms:
        return {}
    if any(t.startswith("pneumonia") for t in terms):
        return {"pneumonia": 1, "no_finding": 0}
    labels = {"pneumonia": 0, "no_finding": 1} if all(t == "normal" for t in terms) else \
        {"pneumonia": 0, "no_finding": 0}
    if pneumonia_uncertain(report_text):  # "concerning for pneumonia": neither a positive nor a hard negative
        del labels["pneumonia"]
    return labels


@register("openi")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.errors import DataError

    reports, projections = table_path(root, "indiana_reports.csv"), table_path(root, "indiana_projections.csv")
    for f in (reports, projections):
        if not f.exists():
            raise DataError(f"source openi: {f.name} is missing under {root}")
    by_uid = {r["uid"].strip(): r for r in read_rows(reports, source="openi", required=["uid", "MeSH", "Problems"])
              if not r["_problem"] and r["uid"].strip()}
    files = find_files(root, {".png", ".jpg", ".jpeg", ".dcm"})
    listed = set()
    for row in read_rows(projections, source="openi", required=["uid", "filename", "projection"]):
        uid, name = row["uid"].strip(), (row.get("filename") or "").strip()
        if row["_problem"] or not uid or not name or not file_name_cell(name):
            yield bad_row(projections, root, row, "openi", row["_problem"] or (
                "blank uid or filename" if not (uid and name) else "filename is not a plain name (a path separator "
                                                                   "or '..')"))
            continue
        listed.add(name)
        report = by_uid.get(uid)
        text = " ".join((report or {}).get(k) or "" for k in ("impression", "findings"))
        labels = _labels(report.get("MeSH") or "", report.get("Problems") or "", text) if report else {}
        path = files.get(name)
        error = ""
        if report is None:
            error = "no labels: uid missing from indiana_reports.csv"
        elif not labels:
            error = "no labels: MeSH and Problems are empty or 'No Indexing' (the report was not coded)"
        elif path is None:
            error = "missing file: listed in indiana_projections.csv but not found (download the images)"
        yield Record(path=path or root / name, rel_path=(path or root / name).relative_to(root).as_posix(),
                     source="openi", patient_key=uid, labels=labels,
                     label_detail=(report or {}).get("Problems") or "",
                     view=normalise_view(row.get("projection")), error=error)
    for name in sorted(set(files) - listed):
        yield Record(path=files[name], rel_path=files[name].relative_to(root).as_posix(), source="openi",
                     patient_key=f"unlisted:{name}", error="unlisted: no row of indiana_projections.csv names this image")
