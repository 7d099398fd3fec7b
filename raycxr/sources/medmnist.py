"""PneumoniaMNIST (MedMNIST v2): the Kermany films at 28 x 28 px in one ``.npz`` file.

PATH is the ``.npz`` file (or a folder holding ``pneumoniamnist*.npz``) with ``train_images`` /
``train_labels``, ``val_images`` / ``val_labels`` and, when present, ``test_images`` /
``test_labels`` (label 1 = pneumonia).

MedMNIST's own splits are honoured: ``val`` stays validation, ``test`` (if present) becomes the
holdout; otherwise the holdout is carved from ``train``. ``--source-option pneumoniamnist.splits=ours``
splits every image by raycxr's fractions instead (useful when pooling with Kermany: MedMNIST's val
holds films of many Kermany patients, and twins follow their copy's split). **MedMNIST publishes no patient
identity**, so each image is its own group: patient-disjointness cannot be guaranteed across
these splits (byte-identical and near-duplicate images are still merged). Compare figures with
that in mind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from raycxr.sources import Record, register

_FIXED = {"val": "val", "test": "holdout"}


def npz_file(root: Path) -> Path:
    from raycxr.errors import DataError

    if root.is_file():
        return root
    found = sorted(root.glob("pneumoniamnist*.npz"))
    if not found:
        raise DataError(f"source pneumoniamnist: no pneumoniamnist*.npz under {root}")
    return found[0]


@register("pneumoniamnist")
def scan(root: Path, *, splits: str = "own", **_) -> Iterator[Record]:
    import numpy as np

    from raycxr.errors import ConfigError

    if splits not in ("own", "ours"):
        raise ConfigError(f"pneumoniamnist.splits={splits!r}; allowed: own (MedMNIST's), ours (raycxr's fractions)",
                          source="--source-option")

    from raycxr.errors import DataError, DecodeError
    from raycxr.imaging import npz_member

    path = npz_file(root)
    with np.load(path, allow_pickle=False) as npz:
        members = set(npz.files)
    for split in ("train", "val", "test"):
        if f"{split}_images" not in members:
            continue
        try:  # the labels only; each image is read from its own member's header-checked array
            labels = npz_member(path, f"{split}_labels").reshape(-1)
        except DecodeError as exc:
            raise DataError(f"source pneumoniamnist: {path.name}: {exc}") from None
        for i, label in enumerate(labels.tolist()):
            yield Record(path=path, rel_path=f"{split}/{i:05d}", source="pneumoniamnist",
                         patient_key=f"{split}-{i}", labels={"pneumonia": int(label), "no_finding": 1 - int(label)},
                         view="AP", fmt=f"npz:{split}_images:{i}",
                         fixed_split=_FIXED.get(split) if splits == "own" else None)
