"""The trust boundary of a run folder: what ``search --resume`` hands Ray to unpickle was written by
this user's raycxr.

Ray Tune restores a search from pickles (``tune/tuner.pkl``, the searcher's state, objects inside
``experiment_state-*.json``): whoever can write a run folder can make a resume run code. So while
a search runs, raycxr signs every file Ray writes at the top of ``tune/`` with an HMAC-SHA256 under
a key of this user's (created on first use, mode 0600), into ``RUN/signature.json``; ``--resume``
checks every such file against it first and refuses a folder it did not sign, naming the file, unless
``--trust-run`` says the user vouches for it. ``status``, ``promote``, ``evaluate`` and the report
never unpickle anything (search.run_history reads plain JSON), so they need no signature.

Ray saves the experiment state to a staging folder and uploads it in the background, so the copy
in the run's storage may lag the newest state by one save: each file keeps its last few signed
versions, and any version this key signed is accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path

from ray.tune.callback import Callback

from raycxr.errors import RaycxrError
from raycxr.storage import RunStore

log = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
_KEEP_VERSIONS = 8
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


def _mac(key: bytes, name: str, data: bytes) -> str:
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"raycxr-key-id" + key).hexdigest()[:16]


class RunSigner:
    """Signs the files at the top of a Tune experiment folder into the run's ``signature.json``.

    ``sign(folder)`` reads ``folder`` (the run's own ``tune/`` or Ray's staging copy of it), adds the
    HMAC of every file that changed since the last call, and rewrites ``signature.json`` if any did.
    """

    def __init__(self, store: RunStore):
        self.store, self.key = store, _key()
        self._seen: dict[str, tuple] = {}
        self.doc = {"key_id": _key_id(self.key), "files": {}}
        if store.exists(SIGNATURE_FILE):  # a resumed run keeps the versions signed before
            try:
                old = json.loads(store.read_text(SIGNATURE_FILE))
                if old.get("key_id") == self.doc["key_id"] and isinstance(old.get("files"), dict):
                    self.doc["files"] = old["files"]
            except ValueError:
                pass

    def sign(self, folder: str | os.PathLike) -> None:
        changed = False
        for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
            if not path.is_file():
                continue
            stat = path.stat()
            if self._seen.get(path.name) == (stat.st_size, stat.st_mtime_ns):
                continue
            self._seen[path.name] = (stat.st_size, stat.st_mtime_ns)
            changed |= self._add(path.name, path.read_bytes())
        if changed:
            self._save()

    def sign_in_store(self, name: str) -> None:
        """Sign ``tune/NAME`` as it is in the run's storage: for ``tuner.pkl``, which the Tuner this
        process just built writes there directly (not through Tune's staging folder)."""
        if self._add(name, self.store.read_bytes(f"tune/{name}")):
            self._save()

    def _add(self, name: str, data: bytes) -> bool:
        mac = _mac(self.key, name, data)
        versions = self.doc["files"].setdefault(name, [])
        if mac in versions:
            return False
        versions.append(mac)
        del versions[:-_KEEP_VERSIONS]
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


def verify(store: RunStore) -> None:
    """Raise :class:`UntrustedRunError` unless every file at the top of the run's ``tune/`` carries
    a signature of this user's key."""
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
    for name in store.files("tune"):
        rel = f"tune/{name}"
        if name.startswith("."):
            continue
        mac = _mac(key, name, store.read_bytes(rel))
        if not any(hmac.compare_digest(mac, v) for v in files.get(name, [])):
            raise UntrustedRunError(f"{store.child(rel)} is not as raycxr wrote it (its signature does not match): "
                                    f"it was changed or added after the search; {hint}")

