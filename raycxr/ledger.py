"""The holdout ledger: every read of a dataset's held-out films, kept with the dataset.

A holdout is read once to be an unbiased estimate; two searches over one dataset, or a promote
and a later ``raycxr evaluate --split holdout``, read the same films again. So each read is
recorded where the films live, not in a run folder: ``DATA/holdout_reads.jsonl`` beside the
dataset's manifest (when that folder is writable), and always in a user-level ledger named by
the films themselves (``films-SPLIT-DIGEST.jsonl`` in :func:`user_ledgers`, by default
``~/.cache/raycxr/ledgers``): the same films ingested again into another folder (a film's content hash is
the SHA-256 of its file, so the same files split alike give the same digest, at any image size)
share it, so a read through one copy counts for the other. One read kept in both ledgers counts once.

A run that reads films (promote) also keeps one entry per read in its own folder's
``holdout_reads.jsonl`` (:func:`run_reads`). :func:`log_read` writes every ledger of one read;
nothing else writes them.

Each entry names the dataset's content fingerprint, the split (``holdout``, or ``site-test`` of a
site's films) and a digest of the read films' content hashes, so "the same images" is checked by
content. It is written before the films are read (write-ahead: a crash while scoring still
counts), appended line by line, and a torn last line (a killed writer) is skipped when read and
never glued to the next entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raycxr.storage import RunStore

FILE = "holdout_reads.jsonl"  # in a dataset's folder and in a run's


@dataclass(frozen=True)
class Films:
    """A set of test films about to be read: a split (``holdout``, or a site's ``site-test`` part) of
    the dataset at ``data`` (content ``fingerprint``), named by the ``digest`` of its films."""

    data: str | Path
    fingerprint: str
    split: str
    digest: str
    site: str | None = None    # the site's name, for a site's films


def log_read(films: list[Films], *, by: str, store: RunStore | None = None, **details) -> list[dict]:
    """Log one read of ``films`` before it happens, in every ledger that counts them: the run's own
    (``store``, when a run reads them: one entry for the read) and each dataset's
    (:func:`record_read`). Returns the earlier reads of these films: the longest of those ledgers'
    histories. ``by``: ``promote`` or ``evaluate``; ``details``: what else the entries keep (``run``,
    ``trial_id``, ``out``...)."""
    histories = []
    if store is not None:
        split = films[0].split
        histories.append(run_reads(store, split))
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "split": split, "trial_id": details.get("trial_id")}
        if any(f.site for f in films):
            entry["sites"] = {f.site: f.digest for f in films}
        entry["out"] = details.get("out")
        store.append_line(FILE, json.dumps(entry))
    for f in films:
        histories.append(record_read(f.data, fingerprint=f.fingerprint, split=f.split, digest=f.digest, by=by,
                                     **({"site": f.site} if f.site else {}), **details))
    return max(histories, key=len)


def run_reads(store: RunStore, split: str = "holdout") -> list[dict]:
    """Earlier reads of ``split`` (``holdout`` or ``site-test``) logged in a run's own ledger."""
    if not store.exists(FILE):
        return []
    return [e for e in _entries(store.read_text(FILE)) if e.get("split", "holdout") == split]


def films_digest(content_hashes) -> str:
    """SHA-256 (16 hex) of the sorted content hashes of a set of films."""
    return hashlib.sha256("\n".join(sorted(map(str, content_hashes))).encode()).hexdigest()[:16]


def split_digest(data_dir: str | Path, split: str) -> str:
    """:func:`films_digest` of every film of one split of an ingested dataset."""
    from raycxr.data import read_split

    return films_digest(read_split(data_dir, split, columns=["content_hash"]).column("content_hash").to_pylist())


def ledger_paths(data_dir: str | Path, *, split: str, digest: str) -> list[Path]:
    """Where reads of these films are kept: beside the dataset when its folder is writable, and the
    user-level ledger of the films (by split and content digest) always."""
    from raycxr.storage import is_uri

    if is_uri(data_dir):  # a dataset on object storage keeps its ledger there too (read, add, write back)
        beside = [f"{str(data_dir).rstrip('/')}/{FILE}"]
    else:
        folder = Path(data_dir)
        beside = [folder / FILE] if os.access(folder, os.W_OK) else []
    return beside + [user_ledgers() / f"films-{split}-{digest}.jsonl"]


def user_ledgers() -> Path:
    """``$RAYCXR_LEDGER_DIR`` (a folder a team shares, say), else ``$RAYCXR_CACHE/ledgers``
    (default ``~/.cache/raycxr/ledgers``)."""
    if os.environ.get("RAYCXR_LEDGER_DIR"):
        return Path(os.environ["RAYCXR_LEDGER_DIR"]).expanduser()
    from raycxr.storage import user_cache

    return user_cache() / "ledgers"


def reads(path: Path, *, split: str, digest: str) -> list[dict]:
    """The ledger's entries for these films (same split name and content digest)."""
    from raycxr.storage import is_uri

    if is_uri(path):
        store, name = _on_storage(path)
        text = store.read_bytes(name).decode(errors="replace") if store.exists(name) else ""
    elif not Path(path).is_file():
        return []
    else:
        text = Path(path).read_text(errors="replace")
    return [e for e in _entries(text) if e.get("split") == split and e.get("digest") == digest]


def _entries(text: str) -> list[dict]:
    """A ledger's entries; a line torn by a killed writer is skipped (it was a read, but not one that
    can be matched or counted)."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def record_read(data_dir: str | Path, *, fingerprint: str, split: str, digest: str, by: str, **details) -> list[dict]:
    """Log a read of ``split`` (films ``digest``) of the dataset at ``data_dir`` before it happens;
    returns the earlier reads of the same films, whichever run or command made them. ``by``:
    ``promote`` or ``evaluate``; ``details``: what else the entry keeps (run, trial, output)."""
    paths = ledger_paths(data_dir, split=split, digest=digest)
    earlier: dict[str, dict] = {}  # one read recorded in both ledgers counts once
    for path in paths:
        for e in reads(path, split=split, digest=digest):
            earlier.setdefault(str(e.get("id") or json.dumps(e, sort_keys=True, default=str)), e)
    entry = {"id": secrets.token_hex(8), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": fingerprint,
             "split": split, "digest": digest, "by": by, **details}
    for path in paths:
        _append(path, json.dumps(entry, default=str))
    return sorted(earlier.values(), key=lambda e: str(e.get("time")))


def _on_storage(uri: str):
    """(the RunStore of a ledger's folder on object storage, the ledger's name in it)."""
    from raycxr.storage import RunStore

    folder, _, name = str(uri).rpartition("/")
    return RunStore(folder), name


def _append(path: Path, line: str) -> None:
    """Append one line durably; a torn last line (no newline) is ended first, never continued."""
    from raycxr.storage import is_uri

    if is_uri(path):  # an object is replaced whole: no torn line to end
        store, name = _on_storage(path)
        store.append_line(name, line)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
