"""JSRT (Japanese Society of Radiological Technology) nodule database.

Layout: ``JPCLN###.IMG`` (with a lung nodule) and ``JPCNN###.IMG`` (without) anywhere below
the root: headerless 2048 x 2048, 12-bit values in big-endian 16-bit words (decoded by
:func:`raycxr.imaging.read_image` with ``fmt="jsrt"``). One film per patient.
Labels: nodule 1 / 0; every other finding unknown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, find_files, register

_NAME = re.compile(r"^JPC(LN|NN)(\d+)\.IMG$", re.I)


@register("jsrt")
def scan(root: Path, **_) -> Iterator[Record]:
    for name, path in find_files(root, {".img"}).items():
        m = _NAME.match(name)
        rel = path.relative_to(root).as_posix()
        if not m:
            yield Record(path=path, rel_path=rel, source="jsrt", patient_key=name,
                         error="unknown label: JSRT names are JPCLN###.IMG or JPCNN###.IMG")
            continue
        nodule = int(m.group(1).upper() == "LN")
        yield Record(path=path, rel_path=rel, source="jsrt", patient_key=name.upper(), labels={"nodule": nodule},
                     label_detail="nodule" if nodule else "non-nodule", view="PA", fmt="jsrt")
