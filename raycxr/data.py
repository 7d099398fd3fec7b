"""The one data schema, and the readers of ingested shards.

A dataset directory written by :func:`raycxr.ingest.ingest` looks like::

    DATA_DIR/
      manifest.json         counts, parameters, schema version, content fingerprint
      quarantine.csv        every file that could not be read, with the reason
      train/part-00000.parquet ...
      val/part-00000.parquet ...
      holdout/part-00000.parquet ...   read only by promote / evaluate, never by search

Every shard follows :data:`SCHEMA`. Pixels are stored pre-resized as raw uint8 bytes, so no
image is decoded during training and a batch goes to the device as uint8.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raycxr.errors import DataError, RaycxrError
from raycxr.labels import FINDINGS, index

if TYPE_CHECKING:
    import ray.data

SCHEMA_VERSION = 3  # 3: group_hash
SPLITS = ("train", "val", "holdout")

SCHEMA = pa.schema([
    pa.field("image", pa.binary(), nullable=False,
             metadata={"doc": "greyscale pixels, uint8, row-major, height*width bytes; air is dark"}),
    pa.field("height", pa.int32(), nullable=False, metadata={"doc": "stored height in px"}),
    pa.field("width", pa.int32(), nullable=False, metadata={"doc": "stored width in px"}),
    pa.field("labels", pa.list_(pa.int8(), len(FINDINGS)), nullable=False,
             metadata={"doc": "one value per raycxr.labels.FINDINGS (pneumonia first): 1 present, 0 absent, "
                              "-1 unknown"}),
    pa.field("label_detail", pa.string(), nullable=False,
             metadata={"doc": "finer class from the source, e.g. normal / bacteria / virus"}),
    pa.field("view", pa.string(), nullable=False, metadata={"doc": "PA, AP, FRONTAL (PA or AP, unstated), LATERAL, or empty (unknown)"}),
    pa.field("source", pa.string(), nullable=False, metadata={"doc": "dataset key, e.g. kermany"}),
    pa.field("patient_hash", pa.string(), nullable=False,
             metadata={"doc": "salted SHA-256 of the source's patient key (16 hex); raw IDs are never stored"}),
    pa.field("group_hash", pa.string(), nullable=False,
             metadata={"doc": "the split group: patients merged because they share an identical or near-duplicate "
                              "film (or a twin across sources) are one group, named by its smallest patient_hash; "
                              "splits keep groups whole and every bootstrap resamples groups"}),
    pa.field("split", pa.string(), nullable=False, metadata={"doc": "train, val or holdout (patient-disjoint)"}),
    pa.field("path", pa.string(), nullable=False,
             metadata={"doc": "pseudonymised file name: salted hash of the path under the source root + suffix "
                              "(file names can carry patient IDs)"}),
    pa.field("content_hash", pa.string(), nullable=False,
             metadata={"doc": "SHA-256 of the original file's bytes"}),
    pa.field("orig_height", pa.int32(), nullable=False, metadata={"doc": "decoded height before resizing"}),
    pa.field("orig_width", pa.int32(), nullable=False, metadata={"doc": "decoded width before resizing"}),
], metadata={"raycxr_schema_version": str(SCHEMA_VERSION)})

# Columns a training loop needs; the rest stays on disk.
TRAIN_COLUMNS = ["image", "height", "width", "labels"]


MANIFEST = "manifest.json"
_MANIFEST_CAP = 64 * 2**20  # a manifest is a few KB plus a shard name per 1,000 films


def location(data_dir: str | Path) -> str:
    """A dataset's location as runs record it: an absolute local path, or the URI as given."""
    from raycxr.storage import is_uri

    text = str(data_dir)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return text.rstrip("/") if is_uri(text) else str(Path(text).expanduser().resolve())


def _store(data_dir: str | Path):
    from raycxr.storage import RunStore  # a location of files, local or on storage every node reaches

    return RunStore(location(data_dir))


def has_manifest(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` (a folder or a URI) holds a dataset's manifest."""
    try:
        return _store(data_dir).exists(MANIFEST)
    except (OSError, RaycxrError):
        return False


@dataclass(frozen=True)
class Manifest:
    """A dataset's ``manifest.json``, as ``raycxr ingest`` writes it (field order is the file's key
    order) and :func:`read_manifest` reads and checks it, once."""

    schema_version: int
    fingerprint: str           # the dataset's content fingerprint (its films, labels, splits and settings)
    params: dict               # the ingest settings: image_size, resize, fractions, seed, views, ..., salt_id
    sources: dict              # source -> {"files": n}
    files_in: int
    rows_written: int
    quarantined: int
    quarantine_reasons: dict
    exact_duplicates: int
    merged_duplicate_groups: int
    near_duplicate_pairs: int
    cross_source_twins: int
    twins_by_source_pair: dict
    split_level: str
    findings: list
    counts: dict               # split -> {"images", "patients", "by_label", "by_source"}
    schema: dict               # column -> what it holds
    shards: dict | None = None  # split -> its shards (SPLIT/FILE.parquet), in order; None before manifests listed them

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc, *, where: str) -> Manifest:
        """Checked: a dict of this schema version with every field of the right kind, else DataError."""
        if not isinstance(doc, dict):
            raise DataError(f"{where}/manifest.json is not a JSON object: re-run `raycxr ingest`")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise DataError(f"{where} was written with schema version {doc.get('schema_version')}, "
                            f"this raycxr reads version {SCHEMA_VERSION}: re-run `raycxr ingest`")
        kinds = {"int": int, "str": str, "dict": dict, "list": list, "dict | None": (dict, type(None))}
        fields = dataclasses.fields(cls)
        wrong = [f.name for f in fields if (f.name in doc or f.default is dataclasses.MISSING)
                 and not isinstance(doc.get(f.name), kinds[f.type])]
        if wrong:
            raise DataError(f"{where}/manifest.json lacks or mistypes {', '.join(wrong)}: not a manifest this raycxr "
                            "wrote; re-run `raycxr ingest`")
        return cls(**{f.name: doc[f.name] for f in fields if f.name in doc})

    @property
    def image_size(self) -> int:
        return self.params["image_size"]


def read_manifest(data_dir: str | Path) -> Manifest:
    """The dataset's manifest, read and checked (:class:`Manifest`)."""
    store = _store(data_dir)
    if not store.exists(MANIFEST):
        raise DataError(f"{data_dir} has no manifest.json: create it with `raycxr ingest --source kermany=PATH --out {data_dir}`")
    raw = store.read_bytes(MANIFEST)
    if len(raw) > _MANIFEST_CAP:
        raise DataError(f"{data_dir}/manifest.json is {len(raw) / 2**20:.0f} MB, not a manifest raycxr wrote: re-run "
                        "`raycxr ingest`")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise DataError(f"{data_dir}/manifest.json is not JSON: re-run `raycxr ingest`") from None
    return Manifest.from_dict(doc, where=str(data_dir))


def split_files(data_dir: str | Path, split: str):
    """(pyarrow filesystem or None for local files, the split's shard paths in order): the shards the
    manifest lists (an ingest at a URI leaves an older dataset's shards until the new manifest is
    written), or for a dataset written before manifests listed them, the split folder's."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    store = _store(data_dir)
    listed = read_manifest(data_dir).shards
    if isinstance(listed, dict):
        names = [n for n in listed.get(split, []) if isinstance(n, str) and _confined(n, split)]
    else:
        names = [f"{split}/{n}" for n in store.files(split) if n.endswith(".parquet")]
    if not names:
        raise DataError(f"{data_dir}/{split} holds no shards: the split is empty; ingest more data "
                        "or change the split fractions")
    return store.fs, [store._path(n) for n in names]


def _confined(name: str, split: str) -> bool:
    """A shard name a manifest may list: ``SPLIT/FILE.parquet``, nothing outside the dataset."""
    parts = name.split("/")
    return len(parts) == 2 and parts[0] == split and parts[1].endswith(".parquet") and parts[1] not in ("", ".", "..")


def read_split(data_dir: str | Path, split: str, *, columns: list[str] | None = None) -> pa.Table:
    """Read one split into memory as a pyarrow Table (no Ray), checking the schema."""
    import pyarrow.parquet as pq

    fs, files = split_files(data_dir, split)
    tables = [pq.read_table(f, columns=columns, filesystem=fs) for f in files]
    table = pa.concat_tables(tables)
    expected = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
    if not table.schema.remove_metadata().equals(expected.remove_metadata()):
        raise DataError(f"{data_dir}/{split} does not match the raycxr schema: re-run `raycxr ingest`")
    return table


def open_split(data_dir: str | Path, split: str, *, extra_columns: list[str] = ()) -> "ray.data.Dataset":
    """One split's training columns (and ``extra_columns``, e.g. ``source``) as a Ray Dataset, one block per shard.

    The driver reads the shards (from a folder or a URI) and puts them in the object store, so the
    dataset need only be reachable where the search is launched, and no Parquet read tasks compete
    with training workers for CPUs: the materialised path. :class:`StreamedSplit` is the other.
    """
    import pyarrow.parquet as pq
    import ray.data

    columns = [*TRAIN_COLUMNS, *extra_columns]
    fs, files = split_files(data_dir, split)
    return ray.data.from_arrow([pq.read_table(f, columns=columns, filesystem=fs) for f in files])


# CPUs each shard-reading task asks for. Ray Data's own read_parquet lists files in a task that asks
# for a whole CPU, which never starts while trials hold every CPU (a search on 2 CPUs hung):
# these tasks ask for a sliver, and a streamed search's trials leave STREAM_CPU_RESERVE free.
STREAM_READ_CPU = 0.05
STREAM_CPU_RESERVE = 0.1


class _ReadShards:
    """Ray Data map: a batch of shard paths -> those shards' columns (one task reads one shard)."""

    def __init__(self, fs, columns: tuple[str, ...]):
        self.fs, self.columns = fs, list(columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq

        return pa.concat_tables([pq.read_table(f, columns=self.columns, filesystem=self.fs)
                                 for f in batch.column("shard").to_pylist()])


@dataclass(frozen=True)
class StreamedSplit:
    """One split streamed from storage: each iteration reads the shards in Ray Data tasks on
    whichever node iterates (a folder every node mounts, or a URI), so the driver never holds the
    pixels and the object store holds a few blocks at a time. An iteration with a seed (each
    training epoch passes its own) reads the shards in that seed's order, before the local shuffle
    buffer mixes rows; without one, in the manifest's order."""

    fs: object
    files: tuple[str, ...]
    columns: tuple[str, ...]

    @classmethod
    def open(cls, data_dir: str | Path, split: str, *, extra_columns: list[str] = ()) -> "StreamedSplit":
        fs, files = split_files(data_dir, split)
        return cls(fs, tuple(files), (*TRAIN_COLUMNS, *extra_columns))

    def nbytes(self) -> int:
        """The shards' total size on storage (pixels are stored raw: about their size in memory)."""
        return sum(info.size or 0 for info in self.fs.get_file_info(list(self.files)))

    def order(self, seed: int | None = None) -> list[str]:
        """The shards in ``seed``'s order (the manifest's without one)."""
        order = list(self.files)
        if seed is not None:
            np.random.default_rng(seed).shuffle(order)
        return order

    def dataset(self, seed: int | None = None, *, files: list[str] | None = None) -> "ray.data.Dataset":
        """A Ray Dataset reading the shards (``files``, else all in ``seed``'s order) in Ray tasks, in
        that order: what a DDP trial's ``streaming_split`` and a materialised chunk read."""
        import ray.data

        order = files if files is not None else self.order(seed)
        ds = ray.data.from_items([{"shard": f} for f in order], override_num_blocks=len(order)).map_batches(
            _ReadShards(self.fs, self.columns), batch_size=1, batch_format="pyarrow", num_cpus=STREAM_READ_CPU)
        ds.context.execution_options.preserve_order = True  # the shards' order, not their tasks' finishing order
        return ds

    def iter_torch_batches(self, *, local_shuffle_seed: int | None = None, batch_size: int = 256,
                           drop_last: bool = False, **options):
        """One pass in batches of ``batch_size``, as a materialised dataset's ``iter_torch_batches``.

        The shards go in ``local_shuffle_seed``'s order, :data:`STREAM_CHUNK_SHARDS` at a time: each
        chunk is read by Ray tasks into the object store (materialised, so no Ray Data executor runs
        in this process while it trains: a running one holds the GIL in its scheduling loop and
        slowed a 200k-film epoch several times over), the next chunk is read while this one trains,
        and batches run on across chunks (a chunk's last rows begin the next chunk's first batch)."""
        from concurrent.futures import ThreadPoolExecutor

        order = self.order(local_shuffle_seed)
        chunks = [order[i:i + STREAM_CHUNK_SHARDS] for i in range(0, len(order), STREAM_CHUNK_SHARDS)]
        if len(chunks) <= 1:  # one chunk: exactly the materialised path's batches
            yield from self.dataset(files=order).materialize().iter_torch_batches(
                batch_size=batch_size, local_shuffle_seed=local_shuffle_seed, drop_last=drop_last, **options)
            return
        def read(files):
            return self.dataset(files=files).materialize()

        with ThreadPoolExecutor(1, thread_name_prefix="raycxr-next-chunk") as pool:
            ahead = pool.submit(read, chunks[0])
            carry = None
            for k in range(len(chunks)):
                chunk = ahead.result()
                if k + 1 < len(chunks):
                    ahead = pool.submit(read, chunks[k + 1])
                seed = None if local_shuffle_seed is None else local_shuffle_seed * 1_000_003 + k
                for batch in chunk.iter_torch_batches(batch_size=batch_size, local_shuffle_seed=seed, drop_last=False,
                                                      **options):
                    if carry is not None:
                        batch, carry = _joined(carry, batch), None
                    n = _rows(batch)
                    whole = n - n % batch_size
                    for i in range(0, whole, batch_size):
                        yield _sliced(batch, i, i + batch_size)
                    if whole < n:
                        carry = _sliced(batch, whole, n)
                del chunk  # its blocks leave the object store
            if carry is not None and not drop_last:
                yield carry


# Shards a streamed split materialises at a time (about 4,000 films: 200 MB at 224 px), with the next
# chunk being read meanwhile: the object store holds two chunks of a streamed split at most.
STREAM_CHUNK_SHARDS = 4


def _rows(batch) -> int:
    return len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)


def _sliced(batch, start: int, stop: int):
    return {k: v[start:stop] for k, v in batch.items()} if isinstance(batch, dict) else batch[start:stop]


def _joined(first, second):
    import torch

    if isinstance(first, dict):
        return {k: torch.cat([first[k], second[k]]) for k in first}
    return torch.cat([first, second])


def label_matrix(labels) -> np.ndarray:
    """The ``labels`` column (Arrow or a list of lists) -> (N, len(FINDINGS)) int8 array."""
    if isinstance(labels, (pa.ChunkedArray, pa.Array)):
        labels = labels.to_pylist()
    return np.asarray(list(labels), dtype=np.int8).reshape(-1, len(FINDINGS))


def target_labels(table: pa.Table, finding: str) -> np.ndarray:
    """One finding's column of a table: 1, 0, or -1 unknown."""
    return label_matrix(table.column("labels"))[:, index(finding)]


def decode_images(batch: dict) -> np.ndarray:
    """Raw uint8 bytes of a batch -> (N, 1, H, W) uint8 array. All rows share one size."""
    heights, widths = np.asarray(batch["height"]), np.asarray(batch["width"])
    if heights.min() != heights.max() or widths.min() != widths.max():
        raise DataError("a batch mixes image sizes; ingest writes one size per dataset")
    h, w = int(heights[0]), int(widths[0])
    flat = np.frombuffer(b"".join(bytes(b) for b in batch["image"]), dtype=np.uint8)
    return flat.reshape(len(heights), 1, h, w)


@dataclass(frozen=True)
class SplitArrays:
    """One split's rows where the target finding is known: pixels as stored, labels, patients, sources."""

    images: np.ndarray   # uint8 (N, 1, S, S)
    y: np.ndarray        # 0/1
    groups: np.ndarray   # split groups (group_hash): the bootstrap's clusters
    sources: np.ndarray


def split_arrays(data_dir: str | Path, split: str, target: str) -> SplitArrays:
    """A split read whole into memory (promote and evaluate score every row of it)."""
    table = read_split(data_dir, split, columns=["image", "height", "width", "labels", "source", "group_hash"])
    labels = target_labels(table, target)
    table = table.filter(pa.array(labels >= 0))
    images = (decode_images(table.select(["image", "height", "width"]).to_pydict()) if table.num_rows
              else np.zeros((0, 1, 1, 1), np.uint8))
    return SplitArrays(images, labels[labels >= 0].astype(int),
                       table.column("group_hash").to_numpy(zero_copy_only=False),
                       table.column("source").to_numpy(zero_copy_only=False))
