"""Where a run lives: a local folder, or any URI pyarrow reaches (``s3://``, ``gs://``, ``file://``).

A run is one location holding ``run.json``, ``tune/``, ``trials/``, ``leaderboard.csv`` and
``holdout_reads.jsonl``. ``raycxr search --storage URI`` puts it at ``URI/NAME``; without
``--storage`` it is ``runs/NAME`` on this disk. Every stage that reads a run (status, resume,
promote, the report) takes the same location, so a run written from a cluster to S3 is read
from a laptop with the same commands. Object-store credentials and endpoints come from the
usual environment (``AWS_*``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path, PurePosixPath

from raycxr.errors import ConfigError, DataError, RaycxrError

log = logging.getLogger(__name__)


class RunBusyError(RaycxrError):
    """Another driver holds the run (its lease)."""


def _dead_here(holder: dict) -> bool:
    """Whether a lease's holder was a process on this host that no longer runs."""
    import socket

    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class RunStore:
    """One run's location, on a pyarrow filesystem either way (:class:`pyarrow.fs.LocalFileSystem` for a
    folder, S3 or GCS for a URI: as Ray's own storage context resolves them). ``uri`` is what run.json
    records and what users pass back; ``local`` is the folder on this disk, or None for a URI. Only
    what an object store does differently is written twice: replacing a file whole, appending a
    line and creating a file only if absent."""

    def __init__(self, location: str | os.PathLike):
        import pyarrow.fs

        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if is_uri(text):
            try:
                self.fs, self.root = pyarrow.fs.FileSystem.from_uri(text.rstrip("/"))
            except Exception as exc:  # unknown scheme, missing credentials, unreachable endpoint
                raise ConfigError(f"cannot open {text}: {exc}. Storage is a local path or a URI pyarrow can reach "
                                  "(s3://, gs://, file://), with credentials in the environment", source="storage")
            self.local = None
            self.uri = text.rstrip("/")
        else:
            self.local = Path(text).expanduser().resolve()
            self.fs, self.root, self.uri = pyarrow.fs.LocalFileSystem(), str(self.local), str(self.local)

    @classmethod
    def on(cls, fs, path: str) -> "RunStore":
        """The run at ``path`` on a pyarrow filesystem (as Ray names an experiment's storage)."""
        import pyarrow.fs

        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            return cls(path)
        store = cls.__new__(cls)
        store.fs, store.root, store.local = fs, path.rstrip("/"), None
        store.uri = f"{fs.type_name}://{store.root}"
        return store

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    def child(self, *parts: str) -> str:
        """The location of ``parts`` under this run (a local path or a URI)."""
        return "/".join([self.uri, *parts])

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._path(rel)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def files(self, rel: str = "") -> list[str]:
        """Names of the files (not folders) directly in ``rel``, sorted; none if it does not exist."""
        import pyarrow.fs

        if self.fs.get_file_info(self._path(rel)).type != pyarrow.fs.FileType.Directory:
            return []  # missing, or a file: no files in it
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(rel)))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)

    def write_text(self, rel: str, text: str) -> None:
        """Replace ``rel`` whole: a reader sees the old or the new file, never half of one (a temp
        file and a rename on a disk; an object store's put is whole or nothing)."""
        if self.local is not None:
            write_atomic(Path(self._path(rel)), text)
            return
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(text.encode())

    def append_line(self, rel: str, line: str) -> None:
        """Append one line (object stores cannot append: read, add, write back)."""
        if self.local is not None:
            with open(self._path(rel), "a") as f:
                f.write(line.rstrip("\n") + "\n")
            return
        old = self.read_text(rel) if self.exists(rel) else ""
        self.write_text(rel, old + line.rstrip("\n") + "\n")

    def claim(self, rel: str, text: str) -> bool:
        """Create ``rel`` only if it does not exist; False when it does. ``text`` should be unique
        to the claimant (it is what :meth:`release` checks).

        Atomic on a filesystem (O_EXCL) and on S3 (a conditional put, ``If-None-Match: *``: of two
        claims, S3 refuses the second with 412). Other object stores (``gs://`` through pyarrow)
        have no create-if-absent here: there the rule is one writer per run name (names default to
        SPACE-DATE-TIME), and the write is read back so that a claim overwritten at once is lost,
        not shared.
        """
        if self.local is not None:
            path = Path(self._path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "x") as f:
                    f.write(text)
            except FileExistsError:
                return False
            return True
        if self.fs.type_name == "s3":
            return self._claim_s3(rel, text)
        if self.exists(rel):
            return False
        self.write_text(rel, text)
        return self.read_text(rel) == text

    def _claim_s3(self, rel: str, text: str) -> bool:
        """S3's create-if-absent (boto3 reads the same AWS_* environment as pyarrow)."""
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, key = self._path(rel).partition("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = boto3.client("s3", endpoint_url=endpoint or None, region_name=getattr(self.fs, "region", None) or None)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    LEASE = "lease.json"

    def lease(self, what: str) -> "RunLease":
        """Hold the run exclusively while ``what`` (a search, a resume) works on it (:class:`RunLease`)."""
        return RunLease(self, what)

    def release(self, rel: str, text: str) -> bool:
        """Delete ``rel`` only if it still holds ``text`` (a claim this process made and nobody has
        replaced): a search that failed to start never deletes what another one wrote."""
        try:
            if self.read_text(rel) != text:
                return False
        except (FileNotFoundError, OSError):
            return False
        self.delete(rel)
        return True

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._path(rel))
        except FileNotFoundError:
            pass
        if self.local is not None:
            try:
                Path(self.root).rmdir()  # the folder a failed claim made, if it holds nothing else
            except OSError:
                pass

    def resolve(self, reported: str) -> str | None:
        """A checkpoint path as Ray reports it (a filesystem path without scheme) as a location
        users can pass on: a path locally, a URI for an object store; always inside this run.

        A run's result files are not signed, so what they name is confined here: a location under
        this run's root is kept; one under another root that names this run's own ``tune/`` tree
        (the run was copied or moved) is read from this run; anything else is None (refused:
        promote never fetches what a run folder merely points at)."""
        path = reported.split("://", 1)[1] if is_uri(reported) else reported
        if is_uri(reported) and self.local is None and not reported.startswith(self.uri.split("://", 1)[0] + "://"):
            return None  # another storage service
        root = self.root.rstrip("/")
        parts = PurePosixPath(path).parts
        if ".." in parts:
            return None
        if path.startswith(root + "/"):
            return self.child(path[len(root) + 1:])
        if "tune" in parts:  # a moved or copied run: the same trial folder in this run
            rel = "/".join(parts[len(parts) - parts[::-1].index("tune") - 1:])
            return self.child(rel) if self.exists(rel) else None
        return None

    def require_run(self, option: str) -> None:
        if not self.exists("run.json"):
            raise ConfigError(f"{self.uri} is not a raycxr run (no run.json): pass {option} runs/NAME, or the "
                              "URI the search printed when it used --storage (e.g. s3://bucket/raycxr/NAME)",
                              source=option)


class RunLease:
    """A run held exclusively while a search or a resume works on it: a second driver on the same run
    is refused with the holder named (:class:`RunBusyError`). The lease is a claimed file
    (:meth:`RunStore.claim`: O_EXCL, or S3's conditional put); one left by a process that died on
    this host is taken over. A context manager: released on exit."""

    def __init__(self, store: RunStore, what: str):
        self.store, self.what, self.mine = store, what, None

    def __enter__(self) -> RunLease:
        import secrets
        import socket

        store = self.store
        mine = json.dumps({"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": secrets.token_hex(8)}) + "\n"
        if not store.claim(store.LEASE, mine):
            try:
                held = store.read_text(store.LEASE)
                holder = json.loads(held)
            except (OSError, ValueError):
                held, holder = None, {}
            holder = holder if isinstance(holder, dict) else {}
            stale = held is not None and _dead_here(holder)
            if stale:
                log.warning("%s: taking over the lease of %s (pid %s, gone)", store.uri, holder.get("what"),
                            holder.get("pid"))
                store.release(store.LEASE, held)
            if not (stale and store.claim(store.LEASE, mine)):  # a live holder, or another taker was first
                raise RunBusyError(
                    f"{store.uri} is in use by {holder.get('what', 'another raycxr')} on {holder.get('host', '?')} "
                    f"(pid {holder.get('pid', '?')}, since {holder.get('since', '?')}): wait for it to end (raycxr "
                    f"status shows it), or, if that process is gone, delete {store.child(store.LEASE)}")
        self.mine = mine
        return self

    def __exit__(self, *exc) -> None:
        self.store.release(self.store.LEASE, self.mine)


def exists(location: str | os.PathLike) -> bool:
    """Whether a path or URI exists."""
    if not is_uri(location):
        return Path(location).exists()
    store = RunStore(location)
    return store.exists()


_FETCH_CAP_ENV = "RAYCXR_MAX_FETCH_MB"


def user_cache() -> Path:
    """The user's cache folder, ``$RAYCXR_CACHE`` (default ``~/.cache/raycxr``): fetched checkpoints,
    converted weights, the user-level holdout ledgers."""
    return Path(os.environ.get("RAYCXR_CACHE", Path.home() / ".cache" / "raycxr")).expanduser()


def _fetch_cap() -> int:
    """The most bytes :func:`local_copy` fetches for one location (default 8 GB: a VGG-16 ensemble's
    checkpoints are a few GB; a whole bucket is not a checkpoint)."""
    return int(float(os.environ.get(_FETCH_CAP_ENV, 8192)) * 2**20)


def local_copy(location: str | os.PathLike) -> Path:
    """A folder on this disk holding ``location`` (a checkpoint folder, a path or a URI): the
    folder itself when local, else a copy in the user's cache ($RAYCXR_CACHE, default
    ~/.cache/raycxr), fetched again only when a file in it changed (a resumed trial may rewrite
    an epoch's checkpoint)."""
    location = str(location)
    if not is_uri(location):
        return Path(location)
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    listing = sorted((i.path, i.size, i.mtime_ns) for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
                     if i.type == pyarrow.fs.FileType.File)
    if not listing:
        raise DataError(f"{location} is empty or missing: the run's storage lost this checkpoint (or the URI is "
                        "wrong); check it with your storage's own tools, or promote another run")
    total, cap = sum(size or 0 for _, size, _ in listing), _fetch_cap()
    if total > cap:
        raise DataError(f"{location} holds {total / 2**20:.0f} MB, more than a checkpoint ({cap / 2**20:.0f} MB, "
                        f"${_FETCH_CAP_ENV}): not fetched; is the run's result pointing at the right folder?")
    key = hashlib.sha256(repr((location, listing)).encode()).hexdigest()[:16]
    cache = user_cache()
    dest = cache / "runs" / key / Path(path).name
    if not (dest.parent / ".complete").exists():
        import shutil

        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".fetch-"))
        try:
            for file, _, _ in listing:
                target = tmp / dest.name / file[len(path):].lstrip("/")
                if ".." in PurePosixPath(file[len(path):]).parts or not file.startswith(path.rstrip("/") + "/"):
                    raise DataError(f"{location} lists a file outside itself ({file!r}): not fetched; the storage "
                                    "holds a key that would write outside raycxr's cache")
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(file) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            shutil.rmtree(dest.parent, ignore_errors=True)  # a half-fetched copy from a process that died
            dest.parent.mkdir(parents=True)
            os.replace(tmp / dest.name, dest)
            (dest.parent / ".complete").touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_atomic(path: Path, text: str | bytes, *, mode: int | None = None) -> None:
    """Replace a local file whole (a temp file beside it, then a rename): a reader or a crash sees
    the old or the new file, never half of one. ``mode``: its permissions (default mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
