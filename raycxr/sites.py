"""Site data: a deploying hospital's own labelled films, as a search and promote use them.

A site is any ingested dataset (``raycxr ingest``) passed as ``raycxr search --site [NAME=]DATA``.
Its films (every split of it, pooled) are divided **by patient** into two parts:

- **site-val**: scored by every trial at every epoch (``site_auc``, ``site_loss``), what
  ``--objective site`` optimises and ``promote --select site`` chooses, calibrates and thresholds on;
- **site-test**: read once, by promote (the same ledger as the holdout); its figures are the
  model card's headline.

The division is seeded and stratified by patient label (a patient is positive if any of their films
is), so both parts keep the site's prevalence; it is recorded in ``run.json`` (:class:`Site`) with
each part's counts and a digest of its films' content hashes, and promote re-derives it and checks
the digest, so both stages see the same films. A site must share no film (content hash) with the
search's own data, and must be ingested at the search data's size and resize policy.

Figures on site-val are optimistic once anything was chosen on them (the epoch, the trial, the
threshold); only site-test is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raycxr.errors import ConfigError, DataError

if TYPE_CHECKING:
    import ray.data

    from raycxr.data import SplitArrays

log = logging.getLogger(__name__)

PARTS = ("site-val", "site-test")
# Riley et al., BMJ 2024 ("Evaluation of clinical prediction models (part 3)"): fewer than about
# 100 events and 100 non-events in an external validation set give wide intervals for
# discrimination and calibration. Below this in site-test raycxr warns; below it in site-val the
# recalibration on the site refits only the intercept (calibration-in-the-large), not the slope.
MIN_EVENTS = 100


@dataclass(frozen=True)
class Site:
    """One site of a search, as ``run.json`` records it (:meth:`to_dict` / :meth:`from_dict`)."""

    name: str
    data: str                 # the ingested dataset's folder (absolute)
    fingerprint: str          # its manifest's content fingerprint
    test_fraction: float      # share of the site's patients in site-test
    seed: int
    counts: dict              # part -> {"images", "patients", "positives", "negatives"}
    digest: dict              # part -> SHA-256 (16 hex) of the part's sorted content hashes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "run.json") -> "Site":
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, dict) or any(k not in raw for k in fields):
            raise ConfigError(f"sites: each entry needs {', '.join(fields)}", source=source)
        return cls(**{k: raw[k] for k in fields})


def parse_site(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder's name) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    path = Path(path).expanduser()
    name = name or path.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"site name {name!r}: use letters, digits, '_', '.' or '-' (e.g. --site "
                          f"clinic=PATH)", source="--site")
    return name, path


def _rows(data_dir: Path, target: str) -> dict:
    """Every split of an ingested dataset, pooled: target label, patient, content hash and position
    (split, index among that split's known-label films) of each film whose target label is known."""
    from raycxr.data import SPLITS, read_split, target_labels

    out = {"y": [], "patient": [], "content": [], "split": [], "index": []}
    for split in SPLITS:
        try:
            table = read_split(data_dir, split, columns=["labels", "group_hash", "content_hash"])
        except DataError as exc:
            if "holds no shards" in str(exc):
                continue  # an empty split (ingest --allow-empty-splits)
            raise
        y = target_labels(table, target)
        known = np.flatnonzero(y >= 0)
        out["y"].append(y[known].astype(int))
        out["patient"].append(table.column("group_hash").to_numpy(zero_copy_only=False)[known])  # split groups
        out["content"].append(table.column("content_hash").to_numpy(zero_copy_only=False)[known])
        out["split"].append(np.full(len(known), split, dtype=object))
        out["index"].append(np.arange(len(known)))  # position among the split's known-label films
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def assign(patients: np.ndarray, y: np.ndarray, *, test_fraction: float, seed: int) -> np.ndarray:
    """Which films go to site-test (bool per film): whole patients, stratified by patient label.

    Within each stratum (positive patients: any positive film; negative: the rest), patients are
    ordered by a seeded hash of their (already salted) patient hash and the first
    ``round(test_fraction * n)`` go to site-test. Deterministic: the same films, fraction and seed
    give the same parts on any machine.
    """
    patients = np.asarray(patients).astype(str)
    uniq, inverse = np.unique(patients, return_inverse=True)
    positive = np.zeros(len(uniq), bool)
    np.logical_or.at(positive, inverse, np.asarray(y) == 1)
    key = np.array([hashlib.sha256(f"{seed}:{p}".encode()).hexdigest() for p in uniq])
    test = np.zeros(len(uniq), bool)
    for stratum in (True, False):
        members = np.flatnonzero(positive == stratum)
        order = members[np.argsort(key[members], kind="stable")]
        test[order[:int(round(test_fraction * len(members)))]] = True
    return test[inverse]


def _digest(content: np.ndarray) -> str:
    from raycxr.ledger import films_digest

    return films_digest(content)


def _counts(y: np.ndarray, patients: np.ndarray) -> dict:
    return {"images": int(len(y)), "patients": int(len(np.unique(patients))), "positives": int((y == 1).sum()),
            "negatives": int((y == 0).sum())}


def plan_site(name: str, data_dir: str | Path, *, target: str, test_fraction: float, seed: int,
              search_data: str | Path) -> Site:
    """Check a site against the search's dataset and divide it (see the module's docstring).

    ConfigError, saying what to do, when the site cannot serve: another image size or resize
    policy, films shared with the search's data, a part without both classes.
    """
    from raycxr.data import SPLITS, location, read_manifest, read_split

    data_dir = location(data_dir)
    where = f"--site {name}={data_dir}"
    if not 0 < test_fraction < 1:
        raise ConfigError(f"--site-test-fraction {test_fraction} must be in (0, 1), e.g. 0.5", source=where)
    try:
        manifest = read_manifest(data_dir)
    except DataError as exc:
        raise ConfigError(f"not an ingested dataset ({exc})", source=where) from None
    own = read_manifest(search_data)
    size, resize = own.image_size, own.params["resize"]
    if (manifest.image_size, manifest.params["resize"]) != (size, resize):
        raise ConfigError(f"ingested at {manifest.image_size} px ({manifest.params['resize']}) but the "
                          f"search's data is {size} px ({resize}): re-ingest the site with --image-size {size} "
                          f"--resize {resize}", source=where)
    rows = _rows(data_dir, target)
    if not len(rows["y"]):
        raise ConfigError(f"no film with a known {target} label", source=where)
    ours = set()
    for split in SPLITS:
        try:
            ours.update(read_split(search_data, split, columns=["content_hash"]).column("content_hash").to_pylist())
        except DataError:
            continue
    shared = int(sum(c in ours for c in rows["content"]))
    if shared:
        raise ConfigError(f"{shared} of its {len(rows['y'])} films are also in the search's data {search_data} "
                          "(same file content): a site's films must be ones the model is not trained or validated "
                          "on; ingest the site without them", source=where)
    test = assign(rows["patient"], rows["y"], test_fraction=test_fraction, seed=seed)
    counts = {part: _counts(rows["y"][m], rows["patient"][m]) for part, m in zip(PARTS, (~test, test))}
    for part, c in counts.items():
        if not (c["positives"] and c["negatives"]):
            raise ConfigError(f"{part} would hold {c['positives']} positive and {c['negatives']} negative films: "
                              "it needs both; add films to the site or change --site-test-fraction", source=where)
    t = counts["site-test"]
    if min(t["positives"], t["negatives"]) < MIN_EVENTS:
        log.warning("site %s: site-test holds %d positive and %d negative films; fewer than %d of either gives wide "
                    "confidence intervals (Riley et al., BMJ 2024): its figures are indicative", name,
                    t["positives"], t["negatives"], MIN_EVENTS)
    return Site(name=name, data=str(data_dir), fingerprint=manifest.fingerprint, test_fraction=float(test_fraction),
                seed=int(seed), counts=counts,
                digest={part: _digest(rows["content"][m]) for part, m in zip(PARTS, (~test, test))})


def _part_positions(site: Site, part: str, target: str, *, data: str | Path | None = None) -> tuple[Path, dict]:
    """(dataset folder, {split: row indices}) of one part of a recorded site, checked against the record."""
    from raycxr.data import has_manifest, location, read_manifest

    if part not in PARTS:
        raise ValueError(f"part {part!r} is not one of {PARTS}")
    data_dir = location(data or site.data)
    where = f"site {site.name} ({data_dir})"
    if not has_manifest(data_dir):
        raise ConfigError("is not here: pass this machine's copy of the site's dataset (same fingerprint)",
                          source=where)
    if read_manifest(data_dir).fingerprint != site.fingerprint:
        raise DataError(f"{where} is not the dataset the search divided (fingerprint differs from "
                        f"{site.fingerprint}): use the same ingested site")
    rows = _rows(data_dir, target)
    test = assign(rows["patient"], rows["y"], test_fraction=site.test_fraction, seed=site.seed)
    mask = test if part == "site-test" else ~test
    if _digest(rows["content"][mask]) != site.digest[part]:
        raise DataError(f"{where}: its {part} films are not those the search recorded (digest differs): the site's "
                        "data changed since the search")
    return data_dir, {s: rows["index"][mask & (rows["split"] == s)] for s in np.unique(rows["split"][mask])}


def site_arrays(site: Site, part: str, target: str, *, data: str | Path | None = None) -> "SplitArrays":
    """One part of a site read whole into memory (promote scores every film of it); ``sources`` name
    the site, so per-source tables show one row per site."""
    from raycxr.data import SplitArrays, split_arrays

    data_dir, positions = _part_positions(site, part, target, data=data)
    parts = []
    for split, idx in positions.items():
        arrays = split_arrays(data_dir, split, target)  # the same known-label rows _rows indexed
        parts.append(SplitArrays(arrays.images[idx], arrays.y[idx], arrays.groups[idx],
                                 np.full(len(idx), site.name, dtype=object)))
    return SplitArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "y", "groups", "sources")))


def site_dataset(site: Site, part: str, target: str) -> "ray.data.Dataset":
    """One part of a site as a Ray Dataset of the training columns (what trials validate on)."""
    import pyarrow as pa
    import ray.data

    from raycxr.data import TRAIN_COLUMNS, read_split, target_labels

    data_dir, positions = _part_positions(site, part, target)
    tables = []
    for split, idx in positions.items():
        table = read_split(data_dir, split, columns=TRAIN_COLUMNS)
        known = np.flatnonzero(target_labels(table, target) >= 0)
        tables.append(table.take(pa.array(known[idx])))
    return ray.data.from_arrow(tables)
