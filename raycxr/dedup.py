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


TWIN_INDEX = ("auto", "exact", "ivf")
# Above this many centre-square x view comparisons for one source (about half a second exact on two
# cores), "auto" searches an inverted-file index instead: already 2x faster at Kermany224 x
# PneumoniaMNIST (4e8), 3x at 5k x 50k films, with the same pairs (BENCHMARKS.md "Twins at scale").
EXACT_COMPARISONS = 100_000_000
IVF_NEIGHBOURS = 16  # images kept per query view; the margin rule keeps only the best of them
IVF_PROBES = 16


def cross_source_twins(views: list[np.ndarray], sources: list[str], *,
                       min_similarity: float = TWIN_SIMILARITY, margin: float = 0.01,
                       block: int = 512, index: str = "auto") -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity) of images from different sources that are copies of one film:
    i's centre square against every view of j (and the reverse) at ``min_similarity`` or more, and
    within ``margin`` of the best match of both i and j.

    For each source, its images' centre squares are the bank and every view of the other sources'
    images a query. ``index="exact"`` compares every pair in chunked matrix products (Kermany224 x
    PneumoniaMNIST, 5,232 x 5,232 images: about 5 s on two cores); ``"ivf"`` searches a FAISS
    inverted-file index of the bank (k-means cells, IVF_PROBES cells probed, the IVF_NEIGHBOURS
    nearest images per query), so the time grows about as the queries times the square root of the
    bank instead of their product (10k x 100k films: 24 s against 123 s exact, the same pairs; NIH
    x MIMIC-CXR on paper: a minute or two against about 45 minutes); ``"auto"`` picks exact below
    EXACT_COMPARISONS per source. Images of one source are never compared here
    (dHash covers them). Images of one source with identical descriptors are compared once: each
    copy is paired with the other side's first image only, so the pairs grow linearly in the
    copies, not as their square.
    """
    if index not in TWIN_INDEX:
        raise ValueError(f"twin index {index!r}: choose one of {', '.join(TWIN_INDEX)}")
    reps, rep_of = _distinct((s, v.tobytes()) for s, v in zip(sources, views))
    if len(reps) == len(views):
        return _twins_of_distinct(views, sources, min_similarity=min_similarity, margin=margin, block=block,
                                  index=index)
    copies = defaultdict(list)
    for i, r in enumerate(rep_of):
        copies[r].append(i)
    out: dict[tuple[int, int], float] = {}
    for a, b, sim in _twins_of_distinct([views[r] for r in reps], [sources[r] for r in reps],
                                        min_similarity=min_similarity, margin=margin, block=block, index=index):
        u, v = reps[a], reps[b]
        for i, j in [(c, v) for c in copies[u]] + [(u, c) for c in copies[v]]:
            out[(min(i, j), max(i, j))] = sim
    return [(i, j, s) for (i, j), s in sorted(out.items())]


def _blocks(views: np.ndarray, rows: np.ndarray, block: int):
    """(offset, float32 rows) of ``views[rows]`` a block at a time: the float16 views are gathered
    and widened one block at a time, never all at once."""
    for start in range(0, len(rows), block):
        yield start, views[rows[start:start + block]].astype(np.float32)


def _exact_matches(bank: np.ndarray, views: np.ndarray, rows: np.ndarray, min_similarity: float, block: int):
    """(query, bank row, similarity) of every query view ``views[rows]`` and bank row at
    ``min_similarity`` or more."""
    theirs = np.ascontiguousarray(bank.T)
    for start, queries in _blocks(views, rows, block):
        sim = queries @ theirs
        a, b = np.nonzero(sim >= min_similarity)
        yield a + start, b, sim[a, b]


def _ivf_matches(bank: np.ndarray, views: np.ndarray, rows: np.ndarray, min_similarity: float, block: int):
    """As :func:`_exact_matches`, among each query's IVF_NEIGHBOURS nearest bank rows in an
    inverted-file index (k-means seeded, so the same inputs give the same pairs)."""
    import faiss

    d = bank.shape[1]
    cells = int(np.clip(round(4 * np.sqrt(len(bank))), 1, max(1, len(bank) // 39)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    index.train(bank)
    index.add(bank)
    index.nprobe = min(cells, IVF_PROBES)
    k = min(IVF_NEIGHBOURS, len(bank))
    for start, queries in _blocks(views, rows, 32 * block):
        sim, found = index.search(queries, k)
        a, b = np.nonzero((sim >= min_similarity) & (found >= 0))
        yield a + start, found[a, b], sim[a, b]


def _twins_of_distinct(views: list[np.ndarray], sources: list[str], *, min_similarity: float, margin: float,
                       block: int, index: str) -> list[tuple[int, int, float]]:
    """:func:`cross_source_twins` over images whose descriptors are distinct within each source."""
    src = np.asarray(sources)
    if len(views) < 2 or len(set(sources)) < 2:
        return []
    owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(views)])
    every_view = np.concatenate(views)                                       # every view of every image
    centres = np.stack([v[0] for v in views]).astype(np.float32)             # each image's centre square
    best: dict[tuple[int, int], float] = {}
    for source in sorted(set(sources)):
        mine = np.flatnonzero(src == source)
        others = np.flatnonzero(src[owner] != source)
        exact = index == "exact" or (index == "auto" and len(mine) * len(others) <= EXACT_COMPARISONS)
        search = _exact_matches if exact else _ivf_matches
        for q, b, sims in search(centres[mine], every_view, others, min_similarity, block):
            for i, j, s in zip(owner[others[q]].tolist(), mine[b].tolist(), sims.tolist()):
                key = (min(i, j), max(i, j))
                best[key] = max(best.get(key, -1.0), s)
    # A copy is one film's: keep a pair only if it is (within ``margin``) the best match of both its
    # images. Two children's films that look alike at 16 px score lower than each one's true copy,
    # and left in, such pairs would chain unrelated patients into one ever larger group.
    top: dict[int, float] = {}
    for (i, j), s in best.items():
        top[i], top[j] = max(top.get(i, -1.0), s), max(top.get(j, -1.0), s)
    return [(i, j, s) for (i, j), s in sorted(best.items()) if s >= top[i] - margin and s >= top[j] - margin]
