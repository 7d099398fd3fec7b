"""Near-duplicate images: a perceptual difference hash and a banded search for close pairs.

A re-encoded, slightly resized or re-windowed copy of a radiograph keeps its gradient pattern:
dHash (horizontal gradient signs on a 17x16 thumbnail, 256 bits) stays within a few bits. Pairs
within ``max_bits`` are found without comparing all pairs: split the hash into ``max_bits + 1``
bands; by the pigeonhole principle two hashes that differ in at most ``max_bits`` bits agree
on at least one whole band, so only images sharing a band value are compared.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

HASH_SIDE = 16  # 16 x 16 = 256 gradient bits


def dhash(image: np.ndarray) -> np.ndarray:
    """256-bit difference hash of a greyscale uint8 image, as 256 booleans."""
    from PIL import Image

    small = np.asarray(Image.fromarray(image).resize((HASH_SIDE + 1, HASH_SIDE), Image.BILINEAR), dtype=np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def near_duplicate_pairs(hashes: np.ndarray, *, max_bits: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``max_bits`` bits."""
    n, bits = hashes.shape
    if n < 2 or max_bits < 0:
        return []
    bands = np.array_split(np.arange(bits), max_bits + 1)
    full = np.packbits(hashes, axis=1)
    seen: set[tuple[int, int]] = set()
    for band in bands:
        buckets = defaultdict(list)
        for i, key in enumerate(map(bytes, np.packbits(hashes[:, band], axis=1))):
            buckets[key].append(i)
        for members in buckets.values():
            if len(members) > 1:
                seen.update(_close_pairs(full, np.asarray(members), max_bits))
    return sorted(seen)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)


def _close_pairs(packed: np.ndarray, members: np.ndarray, max_bits: int, block: int = 256):
    """Pairs within one bucket, compared in blocks so a large bucket stays small in memory."""
    sub = packed[members]
    for start in range(0, len(members), block):
        rows = sub[start:start + block]
        dist = _POPCOUNT[rows[:, None, :] ^ sub[None, :, :]].sum(axis=2)
        for a, b in zip(*np.nonzero(dist <= max_bits)):
            i, j = members[start + a], members[b]
            if i < j:
                yield int(i), int(j)
