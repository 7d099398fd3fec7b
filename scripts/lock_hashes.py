"""Add PyPI's SHA-256 hashes to requirements.lock, so `pip install --require-hashes -r requirements.lock`
(cluster.yaml's setup) installs exactly the files CI tested, from any mirror.

Usage: .venv/bin/python scripts/lock_hashes.py [requirements.lock]   (needs https://pypi.org)
Run it after changing a pin: it reads each `name==version` line (hashes already there are replaced),
asks PyPI's simple index (PEP 691 JSON) for every file of that release (wheels for every platform and the sdist, so
the lock installs on a laptop and on the cluster's image alike) and rewrites the file in pip's
hash format. A pin PyPI does not have stops it with the name. `pip freeze` leaves out setuptools,
which tensorboard needs at run time: keep its pin in the lock (hash-checking mode refuses any
requirement without one).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
HASHES_LINE = "# Hashes: .venv/bin/python scripts/lock_hashes.py (PyPI's SHA-256 of every file of each release)."


def _version(filename: str):
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except ValueError:  # an old upload whose name does not parse (.exe, .egg): not installable by pip
        return None


def release_hashes(name: str, version: str) -> list[str]:
    url = f"https://pypi.org/simple/{canonicalize_name(name)}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
    except OSError as e:
        raise SystemExit(f"{name}=={version}: PyPI did not answer for {url} ({e}); is the name right?") from None
    hashes = sorted({f["hashes"]["sha256"] for f in files
                     if not f.get("yanked") and _version(f["filename"]) == Version(version)})
    if not hashes:
        raise SystemExit(f"{name}=={version}: PyPI lists no files for this release")
    return hashes


def main(path: str = "requirements.lock") -> None:
    lock = Path(path)
    header, pins = [], []
    for line in lock.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins.append(match.groups())
        elif line.startswith("#") and not pins and line != HASHES_LINE:  # a re-run writes its line once
            header.append(line)
    out = header + [HASHES_LINE]
    for i, (name, version) in enumerate(pins, 1):
        print(f"[{i}/{len(pins)}] {name}=={version}", file=sys.stderr)
        options = [f"--hash=sha256:{h}" for h in release_hashes(name, version)]
        out.append(" \\\n    ".join([f"{name}=={version}", *options]))
    lock.write_text("\n".join(out) + "\n")
    print(f"{lock}: {len(pins)} pins with their hashes", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:])
