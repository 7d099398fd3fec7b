"""The holdout ledger: every read of a dataset's held-out films, kept with the dataset.

A holdout is read once to be an unbiased estimate; two searches over one dataset, or a promote
and a later ``raycxr evaluate --split holdout``, read the same films again. So each read is
recorded where the films live, not in a run folder: ``DATA/holdout_reads.jsonl`` beside the
dataset's manifest, or, when that folder is read-only, a user-level ledger named by the dataset's
fingerprint (``$RAYCXR_CACHE/ledgers/FINGERPRINT.jsonl``, default ``~/.cache/raycxr``).

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
import time
from pathlib import Path

FILE = "holdout_reads.jsonl"


def films_digest(content_hashes) -> str:
    """SHA-256 (16 hex) of the sorted content hashes of a set of films."""
    return hashlib.sha256("\n".join(sorted(map(str, content_hashes))).encode()).hexdigest()[:16]


def split_digest(data_dir: str | Path, split: str) -> str:
    """:func:`films_digest` of every film of one split of an ingested dataset."""
    from raycxr.data import read_split

    return films_digest(read_split(data_dir, split, columns=["content_hash"]).column("content_hash").to_pylist())


def ledger_path(data_dir: str | Path, fingerprint: str) -> Path:
    """Beside the dataset when its folder is writable, else the user-level ledger for it."""
    folder = Path(data_dir)
    if os.access(folder, os.W_OK):
        return folder / FILE
    cache = Path(os.environ.get("RAYCXR_CACHE", Path.home() / ".cache" / "raycxr")).expanduser()
    return cache / "ledgers" / f"{fingerprint}.jsonl"


def reads(path: Path, *, split: str, digest: str) -> list[dict]:
    """The ledger's entries for these films (same split name and content digest)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by a killed writer: it was a read, but not one that can be matched
        if isinstance(entry, dict) and entry.get("split") == split and entry.get("digest") == digest:
            out.append(entry)
    return out


def record_read(data_dir: str | Path, *, fingerprint: str, split: str, digest: str, by: str, **details) -> list[dict]:
    """Log a read of ``split`` (films ``digest``) of the dataset at ``data_dir`` before it happens;
    returns the earlier reads of the same films, whichever run or command made them. ``by``:
    ``promote`` or ``evaluate``; ``details``: what else the entry keeps (run, trial, output)."""
    path = ledger_path(data_dir, fingerprint)
    earlier = reads(path, split=split, digest=digest)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fingerprint": fingerprint, "split": split,
             "digest": digest, "by": by, **details}
    _append(path, json.dumps(entry, default=str))
    return earlier


def _append(path: Path, line: str) -> None:
    """Append one line durably; a torn last line (no newline) is ended first, never continued."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
