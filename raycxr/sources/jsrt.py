"""JSRT (Japanese Society of Radiological Technology) nodule database.

Layout: ``JPCLN###.IMG`` (with a lung nodule) and ``JPCNN###.IMG`` (without) anywhere below
the root: headerless 2048 x 2048, 12-bit values in big-endian 16-bit words (decoded by
:func:`raycxr.imaging.read_image` with ``fmt="jsrt"``). The widely redistributed 8-bit PNG
conversions (``JPCLN001.png``) are read too, with the same labels; a film present in both forms
is taken once, from the original ``.IMG``. One film per patient.
Labels: nodule 1 / 0; every other finding unknown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, find_files, register

_NAME = re.compile(r"^JPC(LN|NN)(\d+)\.(IMG|PNG)$", re.I)


@register("jsrt")
def scan(root: Path, **_) -> Iterator[Record]:
    from raycxr.sources.tb import is_mask

    files = find_files(root, {".img", ".png"}, skip=is_mask)
    originals = {Path(n).stem.upper() for n in files if n.lower().endswith(".img")}
    for name, path in files.items():
        m = _NAME.match(name)
        rel = path.relative_to(root).as_posix()
        if not m:
            if name.lower().endswith(".img"):
                yield Record(path=path, rel_path=rel, source="jsrt", patient_key=name,
                             error="unknown label: JSRT names are JPCLN###.IMG or JPCNN###.IMG")
            continue  # other PNGs beside a JSRT download (previews, figures) are not films
        png = m.group(3).upper() == "PNG"
        if png and Path(name).stem.upper() in originals:
            continue  # the same film as its .IMG
        nodule = int(m.group(1).upper() == "LN")
        yield Record(path=path, rel_path=rel, source="jsrt", patient_key=Path(name).stem.upper(),
                     labels={"nodule": nodule}, label_detail="nodule" if nodule else "non-nodule", view="PA",
                     fmt="" if png else "jsrt")
