"""ingest(): image files from dataset adapters -> patient-disjoint Parquet shards + manifest.

Steps: scan every source (adapters in :mod:`raycxr.sources`), decode and resize every file in
parallel (:mod:`raycxr.imaging`; a process pool here, or Ray tasks across a cluster) into staging
batches (pixels are never all in memory: see BATCH), quarantine what cannot be read (with the
reason), group images by patient and merge groups that share an exact or near-duplicate image,
assign each group to train / val / holdout deterministically from the seed (stratified by source
and pneumonia label; official test lists pinned to the holdout) from the small per-image facts
alone, and write shards following :data:`raycxr.data.SCHEMA` in one pass over the staging batches.

Raw patient keys and file names never leave this module: shards keep only salted hashes.
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
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycxr import progress
from raycxr.data import SCHEMA, SCHEMA_VERSION, SPLITS, Manifest
from raycxr.dedup import TWIN_SIMILARITY
from raycxr.errors import ConfigError, DataError, DecodeError
from raycxr.imaging import RESIZE_POLICIES
from raycxr.labels import FINDINGS, UNKNOWN, to_vector
from raycxr.sources import Record, scan_source

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 1000
VIEWS = ("frontal", "all")
_SALT_ENV = "RAYCXR_SALT"
_SALT_FILE = Path.home() / ".config" / "raycxr" / "salt"


@dataclass(frozen=True)
class IngestConfig:
    sources: dict[str, Path]
    out: Path | str  # a folder, or a URI pyarrow reaches (s3://, gs://) for a dataset every node reads
    image_size: int = 224
    resize: str = "pad"
    val_fraction: float = 0.15
    holdout_fraction: float = 0.15
    seed: int = 0
    workers: int = 0  # 0: one per CPU core
    salt: str | None = None  # default: $RAYCXR_SALT, else a random per-user secret
    views: str = "frontal"   # frontal: PA, AP and unknown views; all: laterals too
    near_duplicate_bits: int = 6  # dHash bits (of 256) within which two images count as one; -1: off
    twin_similarity: float = TWIN_SIMILARITY  # thumbnail cosine at which images of two sources are one film; <=0 off
    source_options: dict[str, dict[str, str]] = field(default_factory=dict)
    allow_empty_splits: bool = False  # write a dataset whose train, val or holdout ends up empty (warns)
    max_file_mb: float = 512.0  # a larger file is quarantined unread (a chest film is a few MB; a hostile one is not)
    resume: bool = False  # reuse the decoded batches a killed ingest of the same files left beside out
    address: str | None = None  # decode as Ray tasks on this cluster ("local": a Ray on this machine); default
    #                             $RAY_ADDRESS (set inside `ray job submit`), else a local process pool

    def __post_init__(self):
        problems = []
        if not 16 <= self.image_size <= 1024:
            problems.append(f"image_size: {self.image_size} is outside 16..1024 px")
        if self.resize not in RESIZE_POLICIES:
            problems.append(f"resize: {self.resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
        if self.views not in VIEWS:
            problems.append(f"views: {self.views!r} is not one of {', '.join(VIEWS)}")
        for name in ("val_fraction", "holdout_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name}: {getattr(self, name)} must be between 0 and 1 (exclusive)")
        if not self.max_file_mb > 0:
            problems.append(f"max_file_mb: {self.max_file_mb} must be above 0 (MB)")
        if self.val_fraction + self.holdout_fraction >= 0.9:
            problems.append("val_fraction + holdout_fraction must leave at least 10% for train")
        if not self.sources:
            problems.append("no --source given: pass --source kermany=PATH (see --help for the keys)")
        for key in self.source_options:
            if key not in self.sources:
                problems.append(f"--source-option {key}.*: no --source {key}=PATH was given")
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
    near_duplicate_pairs: int = 0
    cross_source_twins: int = 0
    twins_by_source_pair: dict = field(default_factory=dict)
    fingerprint: str = ""
    out: Path = Path()
    # (source, path under the source root, reason): for the operator's console only, never written
    quarantined_files: list = field(default_factory=list, repr=False)


def _resolve_salt(salt: str | None) -> str:
    """The secret mixed into patient hashes: stable per user, never written into a dataset."""
    salt, where = salt or None, "the salt"
    if salt is None and os.environ.get(_SALT_ENV) is not None:
        salt, where = os.environ[_SALT_ENV], f"${_SALT_ENV}"
    if salt is None:
        _SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:  # created private and whole, in one step (never world-readable, even for an instant)
            fd = os.open(_SALT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass  # made earlier (or by a concurrent ingest): read it
        salt, where = _SALT_FILE.read_text().strip(), str(_SALT_FILE)
    if not salt.strip():
        raise ConfigError(f"{where} is empty: an empty salt makes patient hashes guessable from the patient IDs; "
                          f"delete the file (raycxr makes a new one) or set {_SALT_ENV} to a long random secret",
                          source="salt")
    return salt


def salted_hash(salt: str, *parts: str) -> str:
    # surrogateescape: a file name that is not UTF-8 hashes by its raw bytes (os.fsencode's rule)
    return hashlib.sha256("\x00".join((salt, *parts)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


_KEPT_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".img", ".npz"}


def _pseudonym(salt: str, rec: Record) -> str:
    """What shards keep of a file's name: a salted hash plus the suffix (names can carry IDs), the
    suffix only when it is a known image suffix (``Doe.John-MRN998877`` keeps nothing)."""
    suffix = PurePosixPath(rec.rel_path).suffix.lower()
    return salted_hash(salt, "path", rec.source, rec.rel_path) + (suffix if suffix in _KEPT_SUFFIXES else "")


def _decode_one(args: tuple[str, int, str, str, bool, bool, float]) -> tuple:
    """Worker: read the file once, hash its bytes, decode, resize, dHash, twin views. Never raises.

    Returns (content hash, pixels or None, original size, dHash, twin views, reason)."""
    from raycxr.dedup import dhash, twin_views
    from raycxr.imaging import blank_reason, decode, not_regular, resize

    path, size, policy, fmt, want_hash, want_twins, max_mb = args
    raw = None
    if fmt.startswith("npz:"):  # one image of an archive: hash the image, not the whole archive
        content_hash = ""
    else:
        if why := not_regular(path):  # a FIFO or device named by a manifest would block the read for ever
            return "", None, (0, 0), None, None, why
        try:
            if (nbytes := os.stat(path).st_size) > max_mb * 2**20:
                return "", None, (0, 0), None, None, (f"file of {nbytes / 2**20:.0f} MB, over the {max_mb:g} MB "
                                                      "limit (ingest --max-file-mb): not read")
            raw = Path(path).read_bytes()
        except OSError as exc:
            return "", None, (0, 0), None, None, f"cannot open file: {exc.strerror}"
        except MemoryError:
            return "", None, (0, 0), None, None, "not enough memory to read the file: not read"
        content_hash = hashlib.sha256(raw).hexdigest()
    try:
        arr, original = decode(path, draft_size=size, fmt=fmt, data=raw)
        if blank := blank_reason(arr):
            return content_hash, None, (0, 0), None, None, blank
        content_hash = content_hash or hashlib.sha256(arr.tobytes()).hexdigest()
        small = resize(arr, size, policy=policy)
        return (content_hash, small.tobytes(), original, dhash(small) if want_hash else None,
                twin_views(arr) if want_twins else None, "")
    except DecodeError as exc:
        return content_hash, None, (0, 0), None, None, str(exc)
    except Exception as exc:  # an unexpected decoder failure must quarantine, not kill the run
        return content_hash, None, (0, 0), None, None, f"decoder failed ({type(exc).__name__})"


# What quarantine.csv and manifest.json may say about a file: each reason raycxr writes starts with
# one of these fixed texts, and carries at most an exception's type, a count or a constant after it,
# never an exception's message, a cell of a manifest or a path (the files are shared with the dataset).
QUARANTINE_REASONS = (
    "no such file", "cannot stat the file", "a FIFO", "a socket", "a device", "not a file", "file of",
    "cannot open file", "not enough memory", "empty file", "not a PNG, JPEG or DICOM file", "image too large",
    "not a readable image", "not a readable DICOM file", "DICOM pixel pipeline failed", "DICOM has no pixel data",
    "unsupported PhotometricInterpretation", "multi-frame DICOM", "DICOM pixel data", "not a JSRT raw film",
    "unexpected image shape", "blank image", "decoder process died", "decoder failed", "excluded",
    "unusable row", "unlisted", "unknown label", "missing file", "no labels", "npz archive", "npz array too large",
    "not a readable npz archive",
)


def written_reason(reason: str) -> str:
    """``reason`` as quarantine.csv and manifest.json hold it: one of :data:`QUARANTINE_REASONS`'
    texts, or ``unclassified`` for anything else (a message raycxr did not word itself is never
    copied into a file beside the dataset; the console still shows it)."""
    return reason if reason.startswith(QUARANTINE_REASONS) else "unclassified"


_DIED = "decoder process died on this file (out of memory, or a crash in a decoding library)"


def _decode_alone(job: tuple) -> tuple:
    """Decode one file in a process of its own: a file that kills its decoder costs only itself."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1) as pool:
            return pool.submit(_decode_one, job).result()
    except BrokenProcessPool:
        return "", None, (0, 0), None, None, _DIED


# --- Decoding in batches, each written to a staging shard ---------------------------------------
# Pixels never accumulate in memory: files are decoded BATCH at a time, each batch written to a
# staging Parquet file beside the output (pixels plus the small per-image facts: content hash,
# original size, dHash, twin views, quarantine reason), and only the small facts are kept for
# grouping and splitting. The final shards are then written in one pass over the staging files.
# Records are decoded in the order of the final shards (patient hash, source, pseudonym), so that
# pass appends each row to its split's open shard: memory is a few shards, whatever the dataset.
BATCH = ROWS_PER_SHARD
STAGING_SCHEMA = pa.schema([("pos", pa.int64()), ("content_hash", pa.string()), ("image", pa.binary()),
                            ("orig_height", pa.int32()), ("orig_width", pa.int32()), ("dhash", pa.binary()),
                            ("twin", pa.binary()), ("reason", pa.string()), ("decoded", pa.bool_())])
_SMALL = [n for n in STAGING_SCHEMA.names if n != "image"]


def _staging_table(start: int, results: list[tuple]) -> pa.Table:
    """One batch's decode results (records ``start``, ``start + 1``, ...) as a staging table."""
    cols = {n: [] for n in STAGING_SCHEMA.names}
    for i, (content_hash, pixels, orig, dh, twin, reason) in enumerate(results):
        cols["pos"].append(start + i)
        cols["content_hash"].append(content_hash)
        cols["image"].append(pixels)
        cols["orig_height"].append(int(orig[0]))
        cols["orig_width"].append(int(orig[1]))
        cols["dhash"].append(None if dh is None else np.packbits(dh).tobytes())
        cols["twin"].append(None if twin is None else np.ascontiguousarray(twin, np.float16).tobytes())
        cols["reason"].append(reason)
        cols["decoded"].append(pixels is not None)
    return pa.table(cols, schema=STAGING_SCHEMA)


def _small_facts(table: pa.Table) -> list[tuple]:
    """(pos, content hash, original size, dHash bits, twin views, reason, decoded) per staging row."""
    from raycxr.dedup import TWIN_SIDE

    d = table.select(_SMALL).to_pydict()
    out = []
    for i, pos in enumerate(d["pos"]):
        dh, twin = d["dhash"][i], d["twin"][i]
        out.append((pos, d["content_hash"][i], (d["orig_height"][i], d["orig_width"][i]),
                    None if dh is None else np.unpackbits(np.frombuffer(dh, np.uint8)).astype(bool),
                    None if twin is None else np.frombuffer(twin, np.float16).reshape(-1, TWIN_SIDE * TWIN_SIDE),
                    d["reason"][i], d["decoded"][i]))
    return out


def _jobs(records: list[Record], cfg: IngestConfig) -> list[tuple]:
    twins = cfg.twin_similarity > 0 and len(cfg.sources) > 1  # only a pool can hold another set's copies
    return [(str(r.path), cfg.image_size, cfg.resize, r.fmt, cfg.near_duplicate_bits >= 0, twins, cfg.max_file_mb)
            for r in records]


def _decode_batch(jobs: list[tuple], pool_box: list, workers: int) -> list[tuple]:
    """Decode one batch in the local process pool (``pool_box[0]``, made again if a worker died), in order.

    A worker that dies (the OOM killer, a crash in a native decoder) breaks Python's process pool
    and every file in flight with it. The files that were running then are the first unfinished
    ones (the pool hands work out in order, at most one queued beyond its workers): each is
    decoded again in a process of its own, so only a file that kills its decoder by itself is
    quarantined, and the rest of the ingest goes on in a fresh pool.
    """
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    results: dict[int, tuple] = {}
    if workers == 1:
        return [_decode_one(job) for job in jobs]
    todo = list(range(len(jobs)))
    while todo:
        if pool_box[0] is None:
            pool_box[0] = ProcessPoolExecutor(max_workers=workers)
        try:
            futures = {pool_box[0].submit(_decode_one, jobs[i]): i for i in todo}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
        except BrokenProcessPool:
            pool_box[0].shutdown(wait=False, cancel_futures=True)
            pool_box[0] = None
            unfinished = [i for i in todo if i not in results]
            log.warning("a decode worker died; decoding the %d file(s) it may have held one at a time",
                        min(len(unfinished), workers + 1))
            for i in unfinished[:workers + 1]:
                results[i] = _decode_alone(jobs[i])
        todo = [i for i in todo if i not in results]
    return [results[i] for i in range(len(jobs))]


def _decode_batch_task(jobs: list[tuple], start: int) -> pa.Table:
    """Ray task: one batch decoded on whichever node runs it; its staging table goes back to the
    driver through the object store (the files need only be readable where the task runs)."""
    return _staging_table(start, [_decode_one(job) for job in jobs])


class _Staging:
    """The staging folder of one ingest: ``batch-NNNNNN.parquet`` per decoded batch, beside ``out``
    and named by a digest of the work (the files, their sizes and times, the decode settings), so
    that ``--resume`` after a killed ingest reuses exactly the batches that were finished."""

    def __init__(self, out: str, digest: str):
        from raycxr.storage import RunStore

        parent, _, name = out.rstrip("/").rpartition("/")
        self.store = RunStore(f"{parent or '.'}/.{name}.staging-{digest}")

    def name(self, k: int) -> str:
        return f"batch-{k:06d}.parquet"

    def done(self) -> set[int]:
        return {int(n[6:12]) for n in self.store.files() if n.startswith("batch-") and n.endswith(".parquet")}

    def write(self, k: int, table: pa.Table) -> None:
        """Written whole or not at all (a temporary name, then a rename; an object store's put is whole)."""
        if self.store.local is not None:
            self.store.local.mkdir(parents=True, exist_ok=True)
            tmp = self.store.local / f".{self.name(k)}.tmp"
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, self.store.local / self.name(k))
        else:
            pq.write_table(table, self.store._path(self.name(k)), filesystem=self.store.fs, compression="zstd")

    def read(self, k: int, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.store._path(self.name(k)), columns=columns, filesystem=self.store.fs)

    def remove(self) -> None:
        import shutil

        if self.store.local is not None:
            shutil.rmtree(self.store.local, ignore_errors=True)
        elif self.store.exists():
            self.store.fs.delete_dir(self.store.root)


def _work_digest(jobs: list[tuple], salt: str) -> str:
    """What a staging folder's batches depend on: each file (path, size, modification time, format)
    in decode order and the decode settings. A changed or added file gives another digest."""
    h = hashlib.sha256(json.dumps([BATCH, hashlib.sha256(salt.encode()).hexdigest()]).encode())
    for job in jobs:
        try:
            st = os.stat(job[0])
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        h.update(repr((job, stamp)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _decode_all(jobs: list[tuple], cfg: IngestConfig, staging: _Staging) -> list[tuple]:
    """Decode every record's job (:func:`_jobs`) into staging batches (skipping batches a killed run finished); return the
    small facts of every record, in order (:func:`_small_facts`). Locally in a process pool, one
    process per core; on a Ray cluster (``cfg.address``, or $RAY_ADDRESS inside ``ray job submit``)
    as one Ray task per batch, across the nodes."""
    batches = range(0, -(-len(jobs) // BATCH))
    finished = staging.done() & set(batches)
    if finished:
        log.info("resuming: %d of %d decoded batches reused from %s", len(finished), len(batches), staging.store.uri)
    bar = progress.bar(total=len(jobs), desc="decode", unit="img")
    bar.update(sum(min(BATCH, len(jobs) - k * BATCH) for k in finished))
    todo = [k for k in batches if k not in finished]
    if todo and _use_ray(cfg):
        _decode_on_ray(jobs, todo, staging, bar, cfg)
    elif todo:
        workers = 1 if len(jobs) < 64 else cfg.workers or os.cpu_count() or 1  # a pool costs more than a few files
        pool_box: list = [None]
        try:
            for k in todo:
                part = jobs[k * BATCH:(k + 1) * BATCH]
                staging.write(k, _staging_table(k * BATCH, _decode_batch(part, pool_box, workers)))
                bar.update(len(part))
        finally:
            if pool_box[0] is not None:
                pool_box[0].shutdown(cancel_futures=True)
    bar.close()
    facts = []
    for k in batches:  # the small columns only: no pixels are read back here
        facts.extend(_small_facts(staging.read(k, columns=_SMALL)))
    return facts


def _use_ray(cfg: IngestConfig) -> bool:
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def _decode_on_ray(jobs: list[tuple], todo: list[int], staging: _Staging, bar, cfg: IngestConfig) -> None:
    """One Ray task per batch, at most two per CPU in flight; the driver writes each staging batch as
    it arrives. A batch whose task died (a file that kills its decoder) is decoded again one file
    per task, so only such a file is quarantined."""
    import ray

    from raycxr.cluster import init_ray

    init_ray(address=None if cfg.address == "local" else cfg.address, num_cpus=cfg.workers or None)
    batch_task = ray.remote(num_cpus=1, max_retries=1)(_decode_batch_task)
    one_task = ray.remote(num_cpus=1, max_retries=0)(_decode_one)
    slots = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    died = (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)
    pending, queue = {}, list(todo)
    while queue or pending:
        while queue and len(pending) < slots:
            k = queue.pop(0)
            pending[batch_task.remote(jobs[k * BATCH:(k + 1) * BATCH], k * BATCH)] = k
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(ref)
        part = jobs[k * BATCH:(k + 1) * BATCH]
        try:
            table = ray.get(ref)
        except died:
            log.warning("a decode task died on batch %d; decoding its %d files one task each", k, len(part))
            results = []
            for job in part:
                try:
                    results.append(ray.get(one_task.remote(job)))
                except died:
                    results.append(("", None, (0, 0), None, None, _DIED))
            table = _staging_table(k * BATCH, results)
        staging.write(k, table)
        bar.update(len(part))
        del table


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


def assign_splits(groups: dict[str, tuple[int, object]], *, val_fraction: float,
                  holdout_fraction: float, seed: int) -> dict[str, str]:
    """Assign each group ``{group_id: (n_images, stratum)}`` to a split.

    Within each stratum, groups are ordered by a hash of (seed, group id), then laid along the
    cumulative image count: a group goes to the split whose share of the stratum its midpoint
    falls in. Deterministic, stratified, and whole groups only.
    """
    bounds = [("train", 1.0 - val_fraction - holdout_fraction), ("val", 1.0 - holdout_fraction),
              ("holdout", 1.0)]
    strata: dict[object, list[str]] = defaultdict(list)
    for gid, (_, stratum) in groups.items():
        strata[stratum].append(gid)
    out = {}
    for gids in strata.values():
        gids.sort(key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        total = sum(groups[g][0] for g in gids)
        seen = 0
        for g in gids:
            n = groups[g][0]
            mid = (seen + n / 2) / total
            out[g] = next(name for name, upper in bounds if mid <= upper)
            seen += n
    return out


def _scan(cfg: IngestConfig) -> list[Record]:
    records: list[Record] = []
    for key, root in cfg.sources.items():
        found = list(scan_source(key, Path(root), **cfg.source_options.get(key, {})))
        log.info("source %s: %d files under %s", key, len(found), root)
        if not found:
            raise DataError(f"source {key}: no files found under {root}; check the layout "
                            "(the README's dataset table lists what each source expects)")
        records.extend(found)
    return records


def _screen(records: list[Record], cfg: IngestConfig) -> tuple[list[Record], list[dict]]:
    """Records worth decoding, and quarantine rows for the rest (adapter errors, excluded views)."""
    keep, quarantine = [], []
    for r in records:
        reason = r.error
        if not reason and cfg.views == "frontal" and r.view == "LATERAL":
            reason = "excluded: lateral view (pass --views all to keep laterals)"
        if reason:
            quarantine.append({"source": r.source, "record": r, "reason": reason})
        else:
            keep.append(r)
    return keep, quarantine


def _is_dataset(store) -> bool:
    """True if ``store`` (a RunStore) holds a manifest written by raycxr ingest (any schema version)."""
    try:
        manifest = json.loads(store.read_text("manifest.json"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and {"schema_version", "fingerprint", "params"} <= set(manifest)


def _groups(kept: list[tuple], salt: str, cfg: IngestConfig) -> tuple[list[str], _UnionFind, dict]:
    """Patient hash per row and the union-find of groups; merges exact and near duplicates."""
    from raycxr.dedup import near_duplicate_pairs

    uf = _UnionFind()
    hashes, first_with_content = [], {}
    stats = {"exact_duplicates": 0, "merged_duplicate_groups": 0, "near_duplicate_pairs": 0,
             "cross_source_twins": 0, "twins_by_source_pair": {}}
    for i, (rec, content_hash, *_rest) in enumerate(kept):
        ph = salted_hash(salt, rec.source, rec.patient_key)
        hashes.append(ph)
        uf.find(ph)
        if content_hash in first_with_content:
            stats["exact_duplicates"] += 1
            stats["merged_duplicate_groups"] += uf.union(hashes[first_with_content[content_hash]], ph)
        else:
            first_with_content[content_hash] = i
    if cfg.near_duplicate_bits >= 0 and kept:
        dh = np.stack([k[4] for k in kept])
        for i, j in near_duplicate_pairs(dh, max_bits=cfg.near_duplicate_bits):
            if kept[i][1] != kept[j][1]:  # exact copies are counted above
                stats["near_duplicate_pairs"] += 1
                stats["merged_duplicate_groups"] += uf.union(hashes[i], hashes[j])
    if kept and kept[0][5] is not None:
        from raycxr.dedup import cross_source_twins

        pairs = Counter()
        for i, j, _ in cross_source_twins([k[5] for k in kept], [k[0].source for k in kept],
                                          min_similarity=cfg.twin_similarity):
            if kept[i][1] != kept[j][1]:  # byte-identical copies are counted above
                stats["cross_source_twins"] += 1
                pairs["+".join(sorted((kept[i][0].source, kept[j][0].source)))] += 1
                stats["merged_duplicate_groups"] += uf.union(hashes[i], hashes[j])
        stats["twins_by_source_pair"] = dict(sorted(pairs.items()))
    return hashes, uf, stats


def _split_of_groups(kept, hashes, uf, cfg) -> dict[str, str]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, ph in enumerate(hashes):
        members[uf.find(ph)].append(i)
    pinned, free = {}, defaultdict(dict)
    pinned_by_source: dict[str, set] = defaultdict(set)  # which splits each source's own list fixes
    for g, ix in members.items():
        fixed = {kept[i][0].fixed_split for i in ix} - {None}
        for i in ix:
            if kept[i][0].fixed_split:  # "train_val": this source's holdout is its official test list
                pinned_by_source[kept[i][0].source].add(kept[i][0].fixed_split.replace("train_val", "holdout"))
        if fixed - {"train_val"}:  # an official test list wins for the whole group (patient-disjoint by design)
            pinned[g] = "holdout" if "holdout" in fixed else sorted(fixed - {"train_val"})[0]
            continue
        # A group holding a train_val-pinned image is split as that image's source (no holdout there).
        source = next((kept[i][0].source for i in ix if kept[i][0].fixed_split), kept[ix[0]][0].source)
        pneumonia = max(kept[i][0].labels.get("pneumonia", UNKNOWN) for i in ix)
        free[source][g] = (len(ix), (source, pneumonia))
    # A source's official split replaces ours for that source only: its free groups go only to the
    # splits its list does not fix; every other source is split by the fractions asked for.
    out = dict(pinned)
    for source, groups in free.items():
        fixed = pinned_by_source.get(source, set())
        out.update(assign_splits(groups, val_fraction=0.0 if "val" in fixed else cfg.val_fraction,
                                 holdout_fraction=0.0 if "holdout" in fixed else cfg.holdout_fraction,
                                 seed=cfg.seed))
    return out


def _write_shards(staging: _Staging, n_batches: int, rows_at: dict[int, dict], put, fp8: str) -> dict[str, list[str]]:
    """The final shards, in one pass over the staging batches: each decoded row is appended to its
    split's open shard, written out every ROWS_PER_SHARD rows through ``put(name, table)``. Rows come
    in decode order, which is already each split's order (patient hash, source, pseudonym), so a
    few shards' rows are all this holds. Returns each split's shard names, in order."""
    buffers: dict[str, list[dict]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}

    def flush(split: str) -> None:
        name = f"{split}/part-{len(names[split]):05d}-{fp8}.parquet"
        put(name, pa.Table.from_pylist(buffers[split], schema=SCHEMA))
        names[split].append(name)
        buffers[split] = []

    for k in range(n_batches):
        table = staging.read(k, columns=["pos", "image"])
        for pos, image in zip(table.column("pos").to_pylist(), table.column("image").to_pylist()):
            if (row := rows_at.get(pos)) is None:
                continue
            buffers[row["split"]].append({**row, "image": image})
            if len(buffers[row["split"]]) == ROWS_PER_SHARD:
                flush(row["split"])
        del table
    for split in SPLITS:
        if buffers[split]:
            flush(split)
    return names


def _counts(rows: list[dict]) -> dict:
    findings = {}
    for k, f in enumerate(FINDINGS):
        c = Counter(r["labels"][k] for r in rows)
        if c.get(1) or c.get(0):
            findings[f] = {"1": c.get(1, 0), "0": c.get(0, 0), "unknown": c.get(UNKNOWN, 0)}
    patients: dict[str, set] = defaultdict(set)
    for r in rows:
        patients[r["source"]].add(r["patient_hash"])
    return {"images": len(rows), "patients": len({r["patient_hash"] for r in rows}),
            "by_label": dict(sorted(Counter(str(r["labels"][0]) for r in rows).items())),
            "by_source": dict(sorted(Counter(r["source"] for r in rows).items())),
            "patients_by_source": {k: len(v) for k, v in sorted(patients.items())},
            "by_view": dict(sorted(Counter(r["view"] or "unknown" for r in rows).items())),
            "findings": findings}


def _unusable_sources(records: list[Record], kept: list[tuple], quarantine: list[dict]) -> list[str]:
    """Why each source with files but no row written gave nothing (its most common reasons)."""
    used = Counter(k[0].source for k in kept)
    problems = []
    for source, n in sorted(Counter(r.source for r in records).items()):
        if used[source]:
            continue
        reasons = Counter(q["reason"].split(" (")[0] for q in quarantine if q["source"] == source).most_common(3)
        why = "; ".join(f"{c} x {r}" for r, c in reasons)
        problems.append(f"source {source}: none of its {n} files or rows could be used ({why}). "
                        "Check the layout and that the images were downloaded beside the labels")
    return problems


def _check_splits(rows_by_split: dict[str, list[dict]], cfg: IngestConfig) -> list[str]:
    """Splits that ended up empty, said with what there was to split."""
    total = sum(len(r) for r in rows_by_split.values())
    patients = len({r["patient_hash"] for rows in rows_by_split.values() for r in rows})
    return [f"split {split} has no images ({total} images of {patients} patient group(s) in all, val "
            f"{cfg.val_fraction:g} and holdout {cfg.holdout_fraction:g}): add data, or pass --allow-empty-splits "
            "to write it anyway" for split, rows in rows_by_split.items() if not rows]


def ingest(cfg: IngestConfig) -> IngestSummary:
    """Build a dataset from ``cfg.sources``; see the module docstring.

    ``cfg.out`` is a folder, or a URI pyarrow reaches (``s3://``, ``gs://``). A local dataset is
    written into a temporary folder beside ``cfg.out`` and renamed into place at the end; at a URI,
    the new shards get names of their own (the fingerprint is in them) and the manifest, which lists
    them and is what every reader starts from, is written last. Either way a failed or interrupted
    ingest leaves an older dataset at ``cfg.out`` as it was, and its decoded batches in a staging
    folder beside it, which ``cfg.resume`` reuses.
    """
    from raycxr.data import location
    from raycxr.storage import RunStore

    where = location(cfg.out)
    store = RunStore(where)
    if store.exists() and (store.files() or (store.local is not None and any(store.local.iterdir()))) \
            and not _is_dataset(store):
        raise DataError(f"{where} exists and is not a raycxr dataset (no manifest.json written by raycxr ingest): "
                        "nothing in it was touched; choose an empty or new --out folder")
    salt = _resolve_salt(cfg.salt)

    records = _scan(cfg)
    to_decode, quarantine = _screen(records, cfg)
    # decoded in the final shards' order (see BATCH), so the shards are written in one pass
    to_decode.sort(key=lambda r: (salted_hash(salt, r.source, r.patient_key), r.source, _pseudonym(salt, r)))
    jobs = _jobs(to_decode, cfg)
    staging = _Staging(where, _work_digest(jobs, salt))
    if not cfg.resume:
        staging.remove()  # a killed run's batches are reused only when asked (--resume)
    kept = []
    for rec, (pos, content_hash, orig, dh, twin, reason, decoded) in zip(to_decode,
                                                                        _decode_all(jobs, cfg, staging)):
        if not decoded:
            quarantine.append({"source": rec.source, "record": rec, "reason": reason})
        else:
            kept.append((rec, content_hash, pos, orig, dh, twin))
    if problems := _unusable_sources(records, kept, quarantine):
        raise DataError("nothing usable from a source:\n  " + "\n  ".join(problems))
    hashes, uf, dup_stats = _groups(kept, salt, cfg)
    split_of = _split_of_groups(kept, hashes, uf, cfg)

    rows_by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rows_at: dict[int, dict] = {}  # decode position -> the row's columns but its pixels
    for i, (rec, content_hash, pos, orig, *_) in enumerate(kept):
        split = split_of[uf.find(hashes[i])]
        rows_at[pos] = row = {
            "height": cfg.image_size, "width": cfg.image_size,
            "labels": to_vector(rec.labels), "label_detail": rec.label_detail, "view": rec.view,
            "source": rec.source, "patient_hash": hashes[i], "group_hash": uf.find(hashes[i]), "split": split,
            "path": _pseudonym(salt, rec),
            "content_hash": content_hash, "orig_height": orig[0], "orig_width": orig[1],
        }
        rows_by_split[split].append(row)
    if empty := _check_splits(rows_by_split, cfg):
        if not cfg.allow_empty_splits:
            raise DataError("\n  ".join(["a split would be empty:", *empty]))
        for problem in empty:
            log.warning("%s", problem.split(":")[0] + " (written anyway: --allow-empty-splits)")
    params = _params(cfg, salt)
    fingerprint = _fingerprint(rows_by_split, params)
    n_batches = -(-len(to_decode) // BATCH)
    def write(target) -> IngestSummary:
        return _write_dataset(target, staging, n_batches, rows_at, fingerprint, cfg, params, salt, records, kept,
                              quarantine, rows_by_split, dup_stats)

    summary = (_commit_local(store.local, lambda build: write(RunStore(build))) if store.local is not None
               else write(store))
    staging.remove()
    summary.out = Path(where) if store.local is not None else where
    return summary


def _commit_local(out: Path, write):
    """``write(build)`` into a temporary folder beside ``out``, then swap it into place: the old
    dataset is moved aside and removed once the new one is in place (its holdout ledger is kept).
    Returns what ``write`` returned."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    build.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared dataset from colleagues
    try:
        written = write(build)
        if out.exists():
            from raycxr.ledger import FILE as LEDGER

            if (out / LEDGER).is_file():  # every earlier read of a holdout stays with the films (raycxr.ledger)
                shutil.copyfile(out / LEDGER, build / LEDGER)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "dataset")
            try:
                build.rename(out)
            except BaseException:
                (old / "dataset").rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            build.rename(out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return written


def _write_dataset(store, staging: _Staging, n_batches: int, rows_at: dict, fingerprint: str, cfg: IngestConfig,
                   params: dict, salt: str, records, kept, quarantine, rows_by_split, dup_stats) -> IngestSummary:
    """Shards, then the manifest that lists them, then quarantine.csv; at a URI, the shards of an
    earlier dataset there that the new manifest does not list are deleted last."""
    if store.local is not None:
        def put(name: str, table: pa.Table) -> None:
            (store.local / name).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, store.local / name, compression="zstd")
    else:
        def put(name: str, table: pa.Table) -> None:
            pq.write_table(table, store._path(name), filesystem=store.fs, compression="zstd")
    shards = _write_shards(staging, n_batches, rows_at, put, fingerprint[:8])
    summary = _summary(fingerprint, records, kept, quarantine, rows_by_split, dup_stats)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, fingerprint=fingerprint, params=params,
        sources={name: {"files": n} for name, n in sorted(Counter(r.source for r in records).items())},
        files_in=summary.files_in, rows_written=summary.rows_written, quarantined=summary.quarantined,
        quarantine_reasons=summary.quarantine_reasons, **dup_stats,
        split_level="patient (groups merged across exact and near-duplicate images, and twins across sources)",
        findings=list(FINDINGS), counts=summary.counts, schema={f.name: f.metadata[b"doc"].decode() for f in SCHEMA},
        shards=shards)
    for name, text in (("manifest.json", json.dumps(manifest.to_dict(), indent=2) + "\n"),
                       ("quarantine.csv", _quarantine_csv(quarantine, salt))):
        if store.local is not None:  # inside the build folder, whose rename is the commit; the umask's mode
            (store.local / name).write_text(text)
        else:
            store.write_text(name, text)
    if store.local is None:
        listed = {n for names in shards.values() for n in names}
        for split in SPLITS:
            for name in store.files(split):
                if f"{split}/{name}" not in listed:
                    store.delete(f"{split}/{name}")
    return summary


def _params(cfg: IngestConfig, salt: str) -> dict:
    return {"image_size": cfg.image_size, "resize": cfg.resize, "val_fraction": cfg.val_fraction,
            "holdout_fraction": cfg.holdout_fraction, "seed": cfg.seed, "views": cfg.views,
            "near_duplicate_bits": cfg.near_duplicate_bits, "twin_similarity": cfg.twin_similarity,
            "source_options": cfg.source_options,
            "salt_id": hashlib.sha256(salt.encode()).hexdigest()[:8]}


def _fingerprint(rows_by_split: dict[str, list[dict]], params: dict) -> str:
    fp = hashlib.sha256()
    for split in SPLITS:
        for r in sorted(rows_by_split[split], key=lambda r: (r["patient_hash"], r["path"])):
            fp.update(f"{split}\t{r['source']}\t{r['path']}\t{r['content_hash']}\t{r['labels']}\n".encode())
    fp.update(json.dumps(params, sort_keys=True).encode())
    return fp.hexdigest()[:16]


def _summary(fingerprint: str, records, kept, quarantine, rows_by_split, dup_stats) -> IngestSummary:
    reasons = dict(sorted(Counter(written_reason(q["reason"]).split(":")[0] for q in quarantine).items()))
    return IngestSummary(
        files_in=len(records), rows_written=len(kept), quarantined=len(quarantine),
        counts={split: _counts(rows) for split, rows in rows_by_split.items()},
        quarantine_reasons=reasons, fingerprint=fingerprint, **dup_stats,
        quarantined_files=[(q["source"], q["record"].rel_path, q["reason"]) for q in quarantine])


def _quarantine_csv(quarantine: list[dict], salt: str) -> str:
    """``quarantine.csv``: source, pseudonymised path, reason (:func:`written_reason`). Every skipped
    file is listed."""
    import io

    rows = [{"source": q["source"], "path": _pseudonym(salt, q["record"]), "reason": written_reason(q["reason"])}
            for q in quarantine]
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=["source", "path", "reason"])
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda q: (q["source"], q["path"])))
    return f.getvalue()


def api(sources: dict[str, str | Path], out: str | Path, **options) -> IngestSummary:
    """``raycxr.ingest(sources, out, **options)``: :func:`ingest` with keyword options, e.g.
    ``raycxr.ingest({"kermany": "chest_xray"}, "data", image_size=64)``; options are
    :class:`IngestConfig`'s fields. Returns the :class:`IngestSummary`."""
    return ingest(IngestConfig(sources={k: Path(v).expanduser() for k, v in sources.items()}, out=Path(out),
                               **options))


from raycxr import callable_stage  # noqa: E402  (after api, which it calls)

callable_stage(__name__)
