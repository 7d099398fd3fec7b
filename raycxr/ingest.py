"""ingest(): image files from dataset adapters -> patient-disjoint Parquet shards + manifest.

Steps: scan every source (adapters in :mod:`raycxr.sources`), decode and resize every file in
parallel (:mod:`raycxr.imaging`), quarantine what cannot be read, group images by patient (and
merge groups that share a byte-identical image), assign each group to train / val / holdout
deterministically from the seed, stratified by label, and write shards following
:data:`raycxr.data.SCHEMA`.

Raw patient keys never leave this module: shards keep only a salted hash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import secrets
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raycxr.data import SCHEMA, SCHEMA_VERSION, SPLITS
from raycxr.errors import ConfigError, DataError, DecodeError
from raycxr.imaging import RESIZE_POLICIES, load_for_model
from raycxr.sources import Record, scan_source

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 1000
_SALT_ENV = "RAYCXR_SALT"
_SALT_FILE = Path.home() / ".config" / "raycxr" / "salt"


@dataclass(frozen=True)
class IngestConfig:
    sources: dict[str, Path]
    out: Path
    image_size: int = 224
    resize: str = "pad"
    val_fraction: float = 0.15
    holdout_fraction: float = 0.15
    seed: int = 0
    workers: int = 0  # 0: one per CPU core
    salt: str | None = None  # default: $RAYCXR_SALT, else a random per-user secret

    def __post_init__(self):
        problems = []
        if not 16 <= self.image_size <= 1024:
            problems.append(f"image_size: {self.image_size} is outside 16..1024 px")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize: {self.resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
        for name in ("val_fraction", "holdout_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name}: {getattr(self, name)} must be between 0 and 1 (exclusive)")
        if self.val_fraction + self.holdout_fraction >= 0.9:
            problems.append("val_fraction + holdout_fraction must leave at least 10% for train")
        if not self.sources:
            problems.append("no --source given: pass --source kermany=PATH")
        if problems:
            raise ConfigError(problems, source="ingest options")


@dataclass
class IngestSummary:
    files_in: int
    rows_written: int
    quarantined: int
    counts: dict = field(default_factory=dict)
    quarantine_reasons: dict = field(default_factory=dict)
    merged_duplicate_groups: int = 0
    exact_duplicates: int = 0
    fingerprint: str = ""
    out: Path = Path()


def _resolve_salt(salt: str | None) -> str:
    """The secret mixed into patient hashes: stable per user, never written into a dataset."""
    if salt:
        return salt
    if os.environ.get(_SALT_ENV):
        return os.environ[_SALT_ENV]
    if not _SALT_FILE.exists():
        _SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        _SALT_FILE.write_text(secrets.token_hex(32))
        _SALT_FILE.chmod(0o600)
    return _SALT_FILE.read_text().strip()


def patient_hash(salt: str, source: str, key: str) -> str:
    return hashlib.sha256(f"{salt}\x00{source}\x00{key}".encode()).hexdigest()[:16]


def _decode_one(args: tuple[str, int, str]) -> tuple[str, bytes | None, tuple[int, int], str]:
    """Worker: read the file once, hash its bytes, decode and resize. Never raises."""
    path, size, policy = args
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return "", None, (0, 0), f"cannot open file: {exc.strerror}"
    content_hash = hashlib.sha256(raw).hexdigest()
    try:
        from raycxr.imaging import read_image, resize

        arr = read_image(path, draft_size=size)
        orig = arr.shape
        return content_hash, resize(arr, size, policy=policy).tobytes(), orig, ""
    except DecodeError as exc:
        return content_hash, None, (0, 0), str(exc)
    except Exception as exc:  # an unexpected decoder failure must quarantine, not kill the run
        return content_hash, None, (0, 0), f"decoder failed: {type(exc).__name__}: {exc}"


def _decode_all(records: list[Record], cfg: IngestConfig) -> list[tuple]:
    from tqdm import tqdm

    jobs = [(str(r.path), cfg.image_size, cfg.resize) for r in records]
    workers = cfg.workers or os.cpu_count() or 1
    progress = dict(total=len(jobs), desc="decode", unit="img", disable=None)
    if workers == 1 or len(jobs) < 64:
        return [_decode_one(j) for j in tqdm(jobs, **progress)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(_decode_one, jobs, chunksize=16), **progress))


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = sorted((ra, rb))  # the smaller hash names the group: deterministic
        self.parent[hi] = lo
        return True


def assign_splits(groups: dict[str, tuple[int, int]], *, val_fraction: float,
                  holdout_fraction: float, seed: int) -> dict[str, str]:
    """Assign each group ``{group_id: (n_images, label)}`` to a split.

    Within each label stratum, groups are ordered by a hash of (seed, group id), then laid
    along the cumulative image count: a group goes to the split whose share of the stratum its
    midpoint falls in. Deterministic, stratified by label, and whole groups only.
    """
    bounds = [("train", 1.0 - val_fraction - holdout_fraction), ("val", 1.0 - holdout_fraction),
              ("holdout", 1.0)]
    by_label: dict[int, list[str]] = defaultdict(list)
    for gid, (_, label) in groups.items():
        by_label[label].append(gid)
    out = {}
    for label, gids in by_label.items():
        gids.sort(key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        total = sum(groups[g][0] for g in gids)
        seen = 0
        for g in gids:
            n = groups[g][0]
            mid = (seen + n / 2) / total
            out[g] = next(name for name, upper in bounds if mid <= upper)
            seen += n
    return out


def _write_split(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["patient_hash"], r["source"], r["path"]))
    for i in range(0, max(len(rows), 1), ROWS_PER_SHARD):
        chunk = rows[i:i + ROWS_PER_SHARD]
        if not chunk:
            break
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        pq.write_table(table, out_dir / f"part-{i // ROWS_PER_SHARD:05d}.parquet", compression="zstd")


def ingest(cfg: IngestConfig) -> IngestSummary:
    """Build a dataset directory from ``cfg.sources``; see the module docstring."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").exists():
            raise DataError(f"{out} exists and is not a raycxr dataset: choose an empty or new --out folder")
        for split in SPLITS:  # re-ingest over an old dataset: drop its shards first
            for f in (out / split).glob("*.parquet"):
                f.unlink()
    salt = _resolve_salt(cfg.salt)

    records: list[Record] = []
    for key, root in cfg.sources.items():
        found = list(scan_source(key, Path(root)))
        log.info("source %s: %d files under %s", key, len(found), root)
        if not found:
            raise DataError(f"source {key}: no files found under {root}; check the layout "
                            f"(see `raycxr ingest --help` and the README's dataset table)")
        records.extend(found)

    decoded = _decode_all(records, cfg)

    quarantine, kept = [], []
    for rec, (content_hash, pixels, orig, reason) in zip(records, decoded):
        if pixels is None:
            quarantine.append({"source": rec.source, "path": rec.rel_path, "reason": reason})
        else:
            kept.append((rec, content_hash, pixels, orig))

    # Group images by patient, then merge groups that share a byte-identical image, so that no
    # patient (or copy of an image) straddles two splits.
    uf = _UnionFind()
    by_content: dict[str, str] = {}
    merged = duplicates = 0
    hashes = []
    for rec, content_hash, _, _ in kept:
        ph = patient_hash(salt, rec.source, rec.patient_key)
        hashes.append(ph)
        uf.find(ph)
        if content_hash in by_content:
            duplicates += 1
            merged += uf.union(by_content[content_hash], ph)
        else:
            by_content[content_hash] = ph
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ph in enumerate(hashes):
        groups[uf.find(ph)].append(i)
    group_info = {g: (len(ix), max(kept[i][0].label for i in ix)) for g, ix in groups.items()}
    split_of = assign_splits(group_info, val_fraction=cfg.val_fraction,
                             holdout_fraction=cfg.holdout_fraction, seed=cfg.seed)

    rows_by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, (rec, content_hash, pixels, orig) in enumerate(kept):
        split = split_of[uf.find(hashes[i])]
        rows_by_split[split].append({
            "image": pixels, "height": cfg.image_size, "width": cfg.image_size,
            "label": rec.label, "label_detail": rec.label_detail, "source": rec.source,
            "patient_hash": hashes[i], "split": split, "path": rec.rel_path,
            "content_hash": content_hash, "orig_height": orig[0], "orig_width": orig[1],
        })

    out.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        _write_split(rows, out / split)
    with open(out / "quarantine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["source", "path", "reason"])
        writer.writeheader()
        writer.writerows(sorted(quarantine, key=lambda q: (q["source"], q["path"])))

    counts = {split: {
        "images": len(rows),
        "patients": len({r["patient_hash"] for r in rows}),
        "by_label": dict(sorted(Counter(str(r["label"]) for r in rows).items())),
        "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
    } for split, rows in rows_by_split.items()}
    fp = hashlib.sha256()
    for split in SPLITS:
        for r in sorted(rows_by_split[split], key=lambda r: (r["patient_hash"], r["path"])):
            fp.update(f"{split}\t{r['source']}\t{r['path']}\t{r['content_hash']}\t{r['label']}\n".encode())
    params = {"image_size": cfg.image_size, "resize": cfg.resize, "val_fraction": cfg.val_fraction,
              "holdout_fraction": cfg.holdout_fraction, "seed": cfg.seed,
              "salt_id": hashlib.sha256(salt.encode()).hexdigest()[:8]}
    fp.update(json.dumps(params, sort_keys=True).encode())
    reasons = dict(sorted(Counter(q["reason"].split(":")[0] for q in quarantine).items()))
    summary = IngestSummary(
        files_in=len(records), rows_written=len(kept), quarantined=len(quarantine), counts=counts,
        quarantine_reasons=reasons, merged_duplicate_groups=merged, exact_duplicates=duplicates, fingerprint=fp.hexdigest()[:16], out=out)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": summary.fingerprint,
        "params": params,
        "sources": {k: {"files": sum(r.source == k for r in records)} for k in cfg.sources},
        "files_in": summary.files_in,
        "rows_written": summary.rows_written,
        "quarantined": summary.quarantined,
        "quarantine_reasons": reasons,
        "exact_duplicates": duplicates,
        "merged_duplicate_groups": merged,
        "split_level": "patient (groups merged across byte-identical images)",
        "counts": counts,
        "schema": {f.name: f.metadata[b"doc"].decode() for f in SCHEMA},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return summary
