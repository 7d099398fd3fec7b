"""The trust boundary of a run folder: what ``search --resume`` hands Ray to unpickle was written by
this user's raycxr.

Ray Tune restores a search from pickles (``tune/tuner.pkl``, the searcher's state, objects inside
``experiment_state-*.json``): whoever can write a run folder can make a resume run code. So while
a search runs, raycxr signs every file Ray writes at the top of ``tune/`` with an HMAC-SHA256 under
a key of this user's (created on first use, mode 0600), into ``RUN/signature.json``; ``--resume``
checks every such file against it first and refuses a folder it did not sign, naming the file, unless
``--trust-run`` says the user vouches for it. ``status``, ``promote``, ``evaluate`` and the report
never unpickle anything (runs.run_history reads plain JSON), so they need no signature.

Each MAC binds the run's own random id, the file's path in the run, a version counter and the
bytes: a file copied in from another run (even one of this user's) does not verify. Ray saves the
experiment state to a staging folder and uploads it file by file in the background, so the copy in
the run's storage may lag the newest state by a few saves, or mix two saves (a driver killed mid-upload,
or a save while the last upload still runs). So each time raycxr signs the staging folder it also
writes the whole save, every file of it, as one signed object, ``RUN/tune-state.json``; ``--resume``
hands Ray that save and nothing else of ``tune/`` (the run's other files there are still checked,
each against its last ``_KEEP_VERSIONS`` signed versions, and a changed or unsigned one refuses the
run), so the files Ray restores always come from one save: none can be spliced in from another save
or rolled back alone. The save in ``tune-state.json`` is the newest or, after a driver killed between
signing and writing it, the one before (its two newest versions verify); older ones are refused.
A local run's Optuna study (``RUN/optuna.db``, SQLite, which Optuna's searcher writes itself) is
kept in each save too, as it was when Tune saved: ``--resume`` puts that copy back before Ray
starts, so the study and the searcher's state come from the same save. ``tuner.pkl`` (which the
Tuner writes to the run itself) and ``run.json`` (raycxr's) are signed where they are. Signatures
of raycxr before this format are refused (``--trust-run`` resumes such a run, which is then signed
anew).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path

import pyarrow.fs
from ray.tune.callback import Callback

from raycxr.errors import RaycxrError
from raycxr.storage import RunStore

log = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
STATE_FILE = "tune-state.json"  # the newest signed save of Tune's state, whole: what --resume hands Ray
_FORMAT = 3
_KEEP_VERSIONS = 8        # of a tune/ file: Ray's upload of the staging folder lags a few saves
_KEEP_RECORD_VERSIONS = 2  # of run.json and tune-state.json, which raycxr writes itself
_IN_STORE = "tuner.pkl"   # written by the Tuner to the run itself, not through the staging folder
STUDY_FILE = "optuna.db"  # a local run's Optuna study (search.py), kept in each save
_KEY_BYTES = 32


class UntrustedRunError(RaycxrError):
    """A run folder whose pickled state raycxr did not sign with this user's key."""


def key_path() -> Path:
    """``$RAYCXR_KEY_FILE``, else ``$XDG_CONFIG_HOME/raycxr/run-signing.key`` (``~/.config`` by default)."""
    if os.environ.get("RAYCXR_KEY_FILE"):
        return Path(os.environ["RAYCXR_KEY_FILE"]).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "raycxr" / "run-signing.key"


def _key() -> bytes:
    """This user's signing key, created on first use (readable by its owner only)."""
    path = key_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 16:
            raise RaycxrError(f"{path} holds no usable raycxr signing key: delete it (runs it signed will then "
                              "need --trust-run to resume)") from None
        return key
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(_KEY_BYTES) + "\n")
    log.info("created this user's run-signing key at %s", path)
    return bytes.fromhex(path.read_text().strip())


def _mac(key: bytes, run_id: str, rel: str, counter: int, data: bytes) -> str:
    message = b"\0".join([b"raycxr-run-file-v2", run_id.encode(), rel.encode(), str(counter).encode(), data])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"raycxr-key-id" + key).hexdigest()[:16]


class RunSigner:
    """Signs the files at the top of a Tune experiment folder (and ``run.json``) into the run's
    ``signature.json``.

    ``sign(folder)`` reads ``folder`` (the run's own ``tune/`` or Ray's staging copy of it), adds the
    HMAC of every file that changed since the last call, and rewrites ``signature.json`` if any did.
    """

    def __init__(self, store: RunStore):
        self.store, self.key = store, _key()
        self._seen: dict[str, tuple] = {}
        self._bytes: dict[str, bytes] = {}
        self.doc = {"format": _FORMAT, "key_id": _key_id(self.key), "run_id": secrets.token_hex(16), "counter": 0,
                    "files": {}}
        if store.exists(SIGNATURE_FILE):  # a resumed run keeps its id and the versions signed before
            try:
                old = json.loads(store.read_text(SIGNATURE_FILE))
                if (old.get("format") == _FORMAT and old.get("key_id") == self.doc["key_id"]
                        and isinstance(old.get("files"), dict) and isinstance(old.get("run_id"), str)
                        and isinstance(old.get("counter"), int)):
                    self.doc = old
            except ValueError:
                pass

    def sign(self, folder: str | os.PathLike) -> None:
        changed = False
        present = sorted(p for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else []
        for path in present:
            stat = path.stat()
            if self._seen.get(path.name) == (stat.st_size, stat.st_mtime_ns):
                continue
            self._seen[path.name] = (stat.st_size, stat.st_mtime_ns)
            self._bytes[path.name] = path.read_bytes()
            changed |= self._add(f"tune/{path.name}", self._bytes[path.name])
        if changed:
            save = {p.name: self._bytes[p.name] for p in present if not p.name.startswith(".") and p.name != _IN_STORE}
            # the study as Tune saved its state (the searcher writes it in this process, before the save)
            study = self.store.local / STUDY_FILE if self.store.local is not None else None
            state = _state_text(self.doc["run_id"], save, study.read_bytes() if study and study.is_file() else None)
            self._add(STATE_FILE, state.encode())
            # the signature first: a kill before the state is written leaves the previous save,
            # whose version is still listed, not a new save nobody signed
            self._save()
            self.store.write_text(STATE_FILE, state)

    def sign_in_store(self, rel: str) -> None:
        """Sign the run's file ``rel`` as it is in the run's storage: ``tune/tuner.pkl``, which the
        Tuner this process just built writes there directly (not through Tune's staging folder),
        and ``run.json``."""
        if self._add(rel, self.store.read_bytes(rel)):
            self._save()

    def _add(self, rel: str, data: bytes) -> bool:
        versions = self.doc["files"].setdefault(rel, [])
        if any(hmac.compare_digest(_mac(self.key, self.doc["run_id"], rel, n, data), mac) for n, mac in versions):
            return False
        self.doc["counter"] += 1
        versions.append([self.doc["counter"], _mac(self.key, self.doc["run_id"], rel, self.doc["counter"], data)])
        del versions[:-(_KEEP_VERSIONS if rel.startswith("tune/") else _KEEP_RECORD_VERSIONS)]
        return True

    def _save(self) -> None:
        self.store.write_text(SIGNATURE_FILE, json.dumps(self.doc, indent=1) + "\n")


class SignRunCallback(Callback):
    """A Tune callback: signs the experiment's state right after Tune saves it (Tune saves in its
    controller loop just before ``on_step_end``), and once more when the experiment ends.

    Which run to sign comes from the experiment Tune is running (its trials' storage), not from a
    location fixed when the search started: Tune pickles its callbacks into ``tuner.pkl``, and a
    run folder resumed after being copied or moved must sign itself, not the folder it came from.
    Holds no key (read from the user's key file in the process that signs)."""

    def __init__(self):
        self._signer = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._signer = None

    def _sign(self, trials) -> None:
        if not trials:
            return
        storage = trials[0].storage  # every trial's names the experiment's storage and staging folder
        if self._signer is None:
            self._signer = RunSigner(RunStore.on(storage.storage_filesystem,
                                                 Path(storage.experiment_fs_path).parent.as_posix()))
        self._signer.sign(storage.experiment_driver_staging_path)

    def on_step_end(self, iteration, trials, **info):
        self._sign(trials)

    def on_experiment_end(self, trials, **info):
        self._sign(trials)


def _state_text(run_id: str, files: dict[str, bytes], study: bytes | None) -> str:
    """One save of Tune's state, every file of it (and the Optuna study, if local), as the text of
    ``tune-state.json``."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return json.dumps({"format": _FORMAT, "run_id": run_id, "files": {name: b64(data) for name, data in files.items()},
                       "study": None if study is None else b64(study)}, sort_keys=True) + "\n"


def _signed(key: bytes, run_id: str, rel: str, data: bytes, versions) -> bool:
    """True if ``data`` is one of the versions of ``rel`` signed for this run."""
    return isinstance(versions, list) and any(
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
        and hmac.compare_digest(_mac(key, run_id, rel, v[0], data), str(v[1])) for v in versions)


def verify(store: RunStore) -> dict[str, bytes]:
    """Raise :class:`UntrustedRunError` unless every file at the top of the run's ``tune/``, ``run.json``
    and the saved state ``tune-state.json`` carry a signature of this user's key for this run; return
    what a resume hands Ray, by path in the run: ``run.json``, ``tune/tuner.pkl`` and the files of the
    newest signed save of Tune's state (:class:`VerifiedFiles` serves exactly these), and ``optuna.db``
    as it was at that save, if the run keeps its study locally (the resume writes it back)."""
    hint = ("resume only runs you or raycxr on your account wrote; if you trust this folder's origin (e.g. you "
            "copied it from your own cluster), pass --trust-run")
    if not store.exists(SIGNATURE_FILE):
        raise UntrustedRunError(f"{store.uri} has no {SIGNATURE_FILE}: it was not written by raycxr on this account "
                                f"(or by a raycxr before run signing), and resuming unpickles what it holds; {hint}")
    try:
        doc = json.loads(store.read_text(SIGNATURE_FILE))
        files = doc["files"]
    except (ValueError, KeyError, TypeError):
        raise UntrustedRunError(f"{store.child(SIGNATURE_FILE)} is damaged; {hint}") from None
    key = _key()
    if doc.get("key_id") != _key_id(key):
        raise UntrustedRunError(f"{store.uri} was signed with another key than this user's ({key_path()}); {hint}")
    if doc.get("format") != _FORMAT or not isinstance(doc.get("run_id"), str) or not isinstance(files, dict):
        raise UntrustedRunError(f"{store.child(SIGNATURE_FILE)} is in an older raycxr's format, which did not bind "
                                f"each file to its run and save; {hint}")
    run_id = doc["run_id"]
    names = [f"tune/{name}" for name in store.files("tune") if not name.startswith(".")]
    checked = {}
    for rel in names + ["run.json"]:
        data = store.read_bytes(rel)
        if not _signed(key, run_id, rel, data, files.get(rel)):
            raise UntrustedRunError(f"{store.child(rel)} is not as raycxr wrote it for this run (its signature does "
                                    f"not match): it was changed, added, rolled back or copied from another run "
                                    f"after the search; {hint}")
        if rel in ("run.json", f"tune/{_IN_STORE}"):
            checked[rel] = data
    if not store.exists(STATE_FILE):
        if any(rel != f"tune/{_IN_STORE}" for rel in names):
            raise UntrustedRunError(f"{store.child(STATE_FILE)} is missing: raycxr keeps Tune's newest signed save "
                                    f"there, and it was deleted (or the search stopped while saving its first "
                                    f"state; then start it again); {hint}")
        return checked  # Tune saved nothing yet: there is nothing to resume
    state = store.read_bytes(STATE_FILE)
    if not _signed(key, run_id, STATE_FILE, state, files.get(STATE_FILE)):
        raise UntrustedRunError(f"{store.child(STATE_FILE)} is not a save raycxr signed for this run, or an older "
                                f"one than its last two: it was changed, rolled back or copied from another run; "
                                f"{hint}")
    saved = json.loads(state)
    for name, data in saved["files"].items():
        if name != Path(name).name or name.startswith(".") or name == _IN_STORE:
            raise UntrustedRunError(f"{store.child(STATE_FILE)} names a file {name!r} outside tune/; {hint}")
        checked[f"tune/{name}"] = base64.b64decode(data, validate=True)
    if saved.get("study") is not None:
        checked[STUDY_FILE] = base64.b64decode(saved["study"], validate=True)
    return checked


def verified_filesystem(store: RunStore, checked: dict[str, bytes]):
    """The run's storage as a pyarrow filesystem for ``Tuner.restore``: the files :func:`verify`
    checked are read from the bytes it checked, so a writer to the run between the check and Ray's
    read changes nothing Ray unpickles (:class:`VerifiedFiles`)."""
    fs = store.fs
    root = store.root.rstrip("/")
    return pyarrow.fs.PyFileSystem(VerifiedFiles(fs, {f"{root}/{rel}": data for rel, data in checked.items()},
                                                 hidden=f"{root}/tune"))


class VerifiedFiles(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler over a run's storage: reads of the verified files return the
    verified bytes (until Ray writes that file itself) and they are listed even where the storage's
    upload lags; any other file at the top of ``tune/`` (one of an older save, or one that appeared
    after the check), unless this process wrote it, is not listed or read. Everything else (trials'
    results and checkpoints, new state) goes to the storage as it is."""

    def __init__(self, fs, snapshot: dict[str, bytes], *, hidden: str):
        self.fs, self.snapshot, self.hidden = fs, dict(snapshot), hidden
        self.written: set[str] = set()

    def __eq__(self, other):
        return isinstance(other, VerifiedFiles) and other.fs.equals(self.fs) and other.snapshot == self.snapshot

    def _unknown(self, path: str) -> bool:  # a top-level tune/ file neither verified nor written by us
        return (path.rsplit("/", 1)[0] == self.hidden and path not in self.snapshot and path not in self.written)

    def get_type_name(self):
        return f"raycxr-verified+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def _info(self, info):
        import pyarrow.fs

        if info.path in self.snapshot:
            return pyarrow.fs.FileInfo(info.path, pyarrow.fs.FileType.File, size=len(self.snapshot[info.path]),
                                       mtime=info.mtime)
        if info.type == pyarrow.fs.FileType.File and self._unknown(info.path):
            return pyarrow.fs.FileInfo(info.path, pyarrow.fs.FileType.NotFound)
        return info

    def get_file_info(self, paths):
        return [self._info(i) for i in self.fs.get_file_info(paths)]

    def get_file_info_selector(self, selector):
        import pyarrow.fs

        found = [i for i in map(self._info, self.fs.get_file_info(selector)) if i.type != pyarrow.fs.FileType.NotFound]
        base, listed = selector.base_dir.rstrip("/"), {i.path for i in found}
        inside = (lambda path: path.startswith(base + "/")) if selector.recursive else (
            lambda path: path.rsplit("/", 1)[0] == base)
        return found + [pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=len(data))
                        for path, data in sorted(self.snapshot.items()) if inside(path) and path not in listed]

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def _wrote(self, path: str) -> None:
        self.snapshot.pop(path, None)
        self.written.add(path)

    def delete_file(self, path):
        self._wrote(path)
        self.fs.delete_file(path)

    def move(self, src, dest):
        self._wrote(src)
        self._wrote(dest)
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._wrote(dest)
        if src in self.snapshot:
            with self.fs.open_output_stream(dest) as f:
                f.write(self.snapshot[src])
        else:
            self.fs.copy_file(src, dest)

    def _read(self, path):
        import pyarrow

        if path in self.snapshot:
            return pyarrow.BufferReader(self.snapshot[path])
        if self._unknown(path):
            raise FileNotFoundError(f"{path} appeared after the run was verified: not read")
        return None

    def open_input_stream(self, path):
        verified = self._read(path)
        return self.fs.open_input_stream(path) if verified is None else verified

    def open_input_file(self, path):
        verified = self._read(path)
        return self.fs.open_input_file(path) if verified is None else verified

    def open_output_stream(self, path, metadata):
        self._wrote(path)
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._wrote(path)
        return self.fs.open_append_stream(path, metadata=metadata)
