"""The pooled findings: one fixed, documented list for every source.

Each image carries one value per finding: 1 present, 0 absent, -1 unknown (the source does not
say). Training masks unknowns in the loss, so a tuberculosis-only source (Montgomery,
Shenzhen) still teaches "abnormal vs normal" without inventing pneumonia labels. Searches
target ``pneumonia`` by default (``--target FINDING`` for another).

Order matters: it is the order of the ``labels`` column in every shard and of a model's logits.
"""

from __future__ import annotations

UNKNOWN = -1

FINDINGS: tuple[str, ...] = (
    "pneumonia",           # Kermany, RSNA (Target), NIH, MIMIC, Open-I
    "no_finding",          # "normal": Kermany NORMAL, NIH "No Finding", MIMIC "No Finding", TB-negative films
    "tuberculosis",        # Montgomery, Shenzhen
    "nodule",              # JSRT, NIH
    # NIH ChestX-ray14's other findings (also mapped from MIMIC where it has them)
    "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "pneumothorax",
    "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia",
)
DEFAULT_TARGET = "pneumonia"

# NIH "Finding Labels" vocabulary -> pooled finding
NIH_NAMES = {
    "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "effusion",
    "Infiltration": "infiltration", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "edema",
    "Emphysema": "emphysema", "Fibrosis": "fibrosis", "Pleural_Thickening": "pleural_thickening",
    "Hernia": "hernia",
}


def check_finding(name: str) -> str:
    if name not in FINDINGS:
        raise ValueError(f"unknown finding {name!r}; use one of: {', '.join(FINDINGS)}")
    return name


def to_vector(labels: dict[str, int]) -> list[int]:
    """{finding: 0/1} -> one value per FINDINGS entry, UNKNOWN where not given."""
    for k, v in labels.items():
        check_finding(k)
        if v not in (0, 1):
            raise ValueError(f"label {k}={v!r} must be 0 or 1")
    return [labels.get(f, UNKNOWN) for f in FINDINGS]


def index(name: str) -> int:
    return FINDINGS.index(check_finding(name))
