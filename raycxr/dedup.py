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


def _distinct(keys) -> tuple[list[int], list[int]]:
    """(the first index of each distinct key, each index's first index with its key)."""
    first: dict = {}
    rep_of = [first.setdefault(k, i) for i, k in enumerate(keys)]
    return sorted(first.values()), rep_of


def near_duplicate_pairs(hashes: np.ndarray, *, max_bits: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) that link every image to each one whose hash differs from its own in at
    most ``max_bits`` bits (what grouping needs, not every such pair): identical hashes are
    compared once, and each further copy is linked to the first, so a thousand copies of one film
    cost a thousand pairs, not half a million."""
    n, bits = hashes.shape
    if n < 2 or max_bits < 0:
        return []
    full = np.packbits(hashes, axis=1)
    reps, rep_of = _distinct(map(bytes, full))
    seen: set[tuple[int, int]] = {(r, i) for i, r in enumerate(rep_of) if r != i}
    sub, packed = hashes[reps], full[reps]
    for band in np.array_split(np.arange(bits), max_bits + 1):
        buckets = defaultdict(list)
        for i, key in enumerate(map(bytes, np.packbits(sub[:, band], axis=1))):
            buckets[key].append(i)
        for members in buckets.values():
            if len(members) > 1:
                seen.update((reps[i], reps[j]) for i, j in _close_pairs(packed, np.asarray(members), max_bits))
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


# --- Twins across datasets -------------------------------------------------------------------
# Public chest X-ray sets republish each other: PneumoniaMNIST is Kermany centre-cropped to a
# square and shrunk to 28 px; Kaggle's Kermany224 squashes whole films to 224 px; RSNA and
# SIIM-ACR are NIH films. A 16x16 thumbnail of the film's centre, zero-mean and unit-norm, is
# compared by cosine similarity: a copy and its original score about 0.99, two different
# children's films rarely above 0.97 (measured on Kermany224 x PneumoniaMNIST, BENCHMARKS.md).
# A square image may be a squashed film whose true aspect is lost, so it also offers centre crops
# that undo a squash of aspect up to 2:1 (the 28 px copy's framing is one of them).
TWIN_SIDE = 16
TWIN_CROPS = tuple((f, 1.0) for f in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)) + tuple(
    (1.0, f) for f in (0.95, 0.9, 0.85))
TWIN_SIMILARITY = 0.97


def _centre(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def _thumb(view: np.ndarray) -> np.ndarray:
    from PIL import Image

    t = np.asarray(Image.fromarray(view).resize((TWIN_SIDE, TWIN_SIDE), Image.BILINEAR, reducing_gap=2.0),
                   dtype=np.float32).ravel()
    t -= t.mean()
    norm = float(np.linalg.norm(t))
    return t / norm if norm else t


def twin_views(image: np.ndarray) -> np.ndarray:
    """(views, 256) float16 descriptors of a greyscale image: its centre square first, then, for a
    square image only, the centre crops in TWIN_CROPS."""
    from PIL import Image

    h, w = image.shape
    if max(h, w) > 4 * TWIN_SIDE:  # crops of a 64 px copy frame the film as crops of the original do
        scale = 4 * TWIN_SIDE / max(h, w)
        image = np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                         Image.BILINEAR, reducing_gap=2.0))
        h, w = image.shape
    side = min(h, w)
    views = [_centre(image, side, side)]
    if abs(h - w) <= 0.02 * max(h, w):
        views += [_centre(image, max(8, round(h * fy)), max(8, round(w * fx))) for fx, fy in TWIN_CROPS]
    return np.stack([_thumb(v) for v in views]).astype(np.float16)


def cross_source_twins(views: list[np.ndarray], sources: list[str], *,
                       min_similarity: float = TWIN_SIMILARITY, margin: float = 0.01,
                       block: int = 512) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity) of images from different sources that are copies of one film:
    i's centre square against every view of j (and the reverse) at ``min_similarity`` or more, and
    within ``margin`` of the best match of both i and j.

    Exact, chunked matrix products of each source's centre squares against the other sources'
    views: about 30 s for Kermany224 x PneumoniaMNIST (5,232 x 5,232 images) on two cores, far less
    when one source is small. Images of one source are never compared here (dHash covers them).
    Images of one source with identical descriptors are compared once: each copy is paired with
    the other side's first image only, so the pairs grow linearly in the copies, not as their square.
    """
    reps, rep_of = _distinct((s, v.tobytes()) for s, v in zip(sources, views))
    if len(reps) == len(views):
        return _twins_of_distinct(views, sources, min_similarity=min_similarity, margin=margin, block=block)
    copies = defaultdict(list)
    for i, r in enumerate(rep_of):
        copies[r].append(i)
    out: dict[tuple[int, int], float] = {}
    for a, b, sim in _twins_of_distinct([views[r] for r in reps], [sources[r] for r in reps],
                                        min_similarity=min_similarity, margin=margin, block=block):
        u, v = reps[a], reps[b]
        for i, j in [(c, v) for c in copies[u]] + [(u, c) for c in copies[v]]:
            out[(min(i, j), max(i, j))] = sim
    return [(i, j, s) for (i, j), s in sorted(out.items())]


def _twins_of_distinct(views: list[np.ndarray], sources: list[str], *, min_similarity: float, margin: float,
                       block: int) -> list[tuple[int, int, float]]:
    """:func:`cross_source_twins` over images whose descriptors are distinct within each source."""
    src = np.asarray(sources)
    if len(views) < 2 or len(set(sources)) < 2:
        return []
    owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(views)])
    bank = np.concatenate(views).astype(np.float32)                      # every view of every image
    queries = np.stack([v[0] for v in views]).astype(np.float32)          # each image's centre square
    best: dict[tuple[int, int], float] = {}
    for source in sorted(set(sources)):
        mine = np.flatnonzero(src == source)
        others = np.flatnonzero(src[owner] != source)
        theirs = bank[others].T  # gathered once per source, not once per block
        for start in range(0, len(mine), block):
            rows = mine[start:start + block]
            sim = queries[rows] @ theirs
            for a, b in zip(*np.nonzero(sim >= min_similarity)):
                i, j = int(rows[a]), int(owner[others[b]])
                key = (min(i, j), max(i, j))
                best[key] = max(best.get(key, -1.0), float(sim[a, b]))
    # A copy is one film's: keep a pair only if it is (within ``margin``) the best match of both its
    # images. Two children's films that look alike at 16 px score lower than each one's true copy,
    # and left in, such pairs would chain unrelated patients into one ever larger group.
    top: dict[int, float] = {}
    for (i, j), s in best.items():
        top[i], top[j] = max(top.get(i, -1.0), s), max(top.get(j, -1.0), s)
    return [(i, j, s) for (i, j), s in sorted(best.items()) if s >= top[i] - margin and s >= top[j] - margin]
