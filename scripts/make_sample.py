"""Rebuild sample/kermany-mini from ../shared/data/kermany224 (a maintainer's script, run once).

Picks whole patients deterministically (by a hash of the patient key), 150 images per class,
downsampled to 128 px JPEG. The package never reads ../shared; this script only refreshes the
small real sample that ships inside the repo.
"""

import hashlib
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raycxr.sources.kermany import patient_key  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "shared/data/kermany224/train"
DST = Path(__file__).resolve().parents[1] / "sample/kermany-mini"
PER_CLASS = 150
SIZE = 128

for cls in ("NORMAL", "PNEUMONIA"):
    by_patient = defaultdict(list)
    for p in sorted((SRC / cls).iterdir()):
        by_patient[patient_key(p.name)].append(p)
    order = sorted(by_patient, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    chosen = []
    for k in order:
        if len(chosen) + len(by_patient[k]) > PER_CLASS:
            continue
        chosen += by_patient[k]
        if len(chosen) == PER_CLASS:
            break
    (DST / cls).mkdir(parents=True, exist_ok=True)
    for p in chosen:
        Image.open(p).convert("L").resize((SIZE, SIZE), Image.BILINEAR).save(DST / cls / p.name, quality=90)
    print(cls, len(chosen), "images from", len({patient_key(p.name) for p in chosen}), "patients")
