"""Twins across datasets: a film republished by another dataset (centre-cropped and shrunk like
PneumoniaMNIST, or squashed to a square like Kaggle's Kermany224) is found and shares a split."""

from __future__ import annotations

import glob
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycxr.dedup import cross_source_twins, twin_views

from .conftest import SAMPLE, shared


def _films(n: int, aspect: float = 1.3) -> list[np.ndarray]:
    """Real films from the bundled sample, given back a landscape aspect (the sample is squashed to
    128 px squares, as Kermany224 is): the "originals" the copies below are made from."""
    files = sorted(glob.glob(str(SAMPLE / "*" / "*.jpeg")))[:n]
    return [np.asarray(Image.open(f).convert("L").resize((round(128 * aspect), 128), Image.BILINEAR)) for f in files]


def _mnist_copy(film: np.ndarray) -> np.ndarray:
    """MedMNIST's recipe: the centre square, shrunk to 28 px."""
    h, w = film.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.asarray(Image.fromarray(film[top:top + side, left:left + side]).resize((28, 28), Image.BILINEAR,
                                                                                    reducing_gap=2.0))


def _squashed_copy(film: np.ndarray) -> np.ndarray:
    """Kermany224's recipe: the whole film squashed to a square and re-encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(film).resize((224, 224), Image.BILINEAR).save(buf, format="JPEG", quality=85)
    return np.asarray(Image.open(buf).convert("L"))


@pytest.mark.parametrize("index", ["exact", "ivf"])
@pytest.mark.parametrize("aspect", [1.0, 1.25, 1.6])
def test_each_copy_finds_its_own_film_and_no_other(aspect, index):
    films = _films(40, aspect)
    for copies in ([_mnist_copy(f) for f in films], [_squashed_copy(f) for f in films]):
        # the hardest case too: MNIST copy against the squashed copy (both lost the true aspect)
        for left, right in ((films, copies), ([_mnist_copy(f) for f in films], [_squashed_copy(f) for f in films])):
            views = [twin_views(a) for a in left + right]
            pairs = cross_source_twins(views, ["a"] * len(left) + ["b"] * len(right), index=index)
            found = {(i, j - len(left)) for i, j, _ in pairs}
            assert found == {(k, k) for k in range(len(films))}, sorted(found)


def test_images_of_one_source_are_never_paired_here():
    films = _films(10)
    views = [twin_views(a) for a in films + films]
    assert cross_source_twins(views, ["a"] * 20) == []


def _pooled(tmp_path: Path, twin_similarity: float, splits: str = "own"):
    """The sample's Kermany films pooled with a PneumoniaMNIST file made from the same films by
    MedMNIST's recipe, its val split holding the copies of four patients' films."""
    from raycxr.ingest import IngestConfig, ingest

    kermany = tmp_path / "chest_xray" / "train"
    files = sorted(glob.glob(str(SAMPLE / "NORMAL" / "*.jpeg")))[:20] + sorted(
        glob.glob(str(SAMPLE / "PNEUMONIA" / "*.jpeg")))[:20]
    for f in files:
        (kermany / Path(f).parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, kermany / Path(f).parent.name / Path(f).name)
    films = [np.asarray(Image.open(f).convert("L")) for f in files]
    copies = np.stack([_mnist_copy(f) for f in films])
    labels = np.array([[int("PNEUMONIA" in f)] for f in files])
    in_val = np.zeros(len(files), bool)
    in_val[[0, 5, 25, 30]] = True
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=copies[~in_val], train_labels=labels[~in_val],
             val_images=copies[in_val], val_labels=labels[in_val])
    out = tmp_path / f"pooled-{twin_similarity}"
    summary = ingest(IngestConfig(sources={"kermany": kermany.parent, "pneumoniamnist": tmp_path / "pneumoniamnist.npz"},
                                  out=out, image_size=32, seed=1, workers=1, twin_similarity=twin_similarity,
                                  source_options={"pneumoniamnist": {"splits": splits}}))
    split_of = {}
    for part in out.glob("*/part-*.parquet"):
        t = pq.read_table(part, columns=["content_hash", "split"]).to_pylist()
        split_of.update({r["content_hash"]: r["split"] for r in t})
    film_split = [split_of[hashlib.sha256(Path(f).read_bytes()).hexdigest()] for f in files]
    copy_split = [split_of[hashlib.sha256(c.tobytes()).hexdigest()] for c in copies]
    return summary, [film_split[i] for i in np.flatnonzero(in_val)], film_split, copy_split


def test_a_pooled_ingest_puts_each_film_in_the_split_of_its_copy(tmp_path):
    summary, val_films, films, copies = _pooled(tmp_path, twin_similarity=0.97)
    assert summary.cross_source_twins >= 40 and summary.twins_by_source_pair == {
        "kermany+pneumoniamnist": summary.cross_source_twins}
    assert val_films == ["val"] * 4  # the originals follow their copies into MedMNIST's val
    # without twin matching the same originals land wherever the fractions put them: a leak
    _, unmatched, _, _ = _pooled(tmp_path / "off", twin_similarity=0)
    assert unmatched != ["val"] * 4


def test_with_our_splits_for_medmnist_every_film_shares_the_split_of_its_copy(tmp_path):
    summary, _, films, copies = _pooled(tmp_path, twin_similarity=0.97, splits="ours")
    assert films == copies and set(films) == {"train", "val", "holdout"}, (films, copies)


@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_the_real_kermany_val_films_each_find_their_one_pneumoniamnist_copy(index):
    """The 16 films of Kermany's official val split, at full size and true aspect, against the
    5,232 real PneumoniaMNIST train+val images (which include them): one twin each, exactly and
    through the inverted-file index (whose MNIST bank has 134 k-means cells, 16 probed)."""
    from raycxr.imaging import read_image

    npz = np.load(shared("pneumoniamnist/pneumoniamnist_trainval.npz"))
    mnist = list(np.concatenate([npz["train_images"], npz["val_images"]]))
    films = [read_image(f) for f in sorted(glob.glob(str(shared("kermany-val-original") / "*" / "*.jpeg")))]
    views = [twin_views(a) for a in films + mnist]
    pairs = cross_source_twins(views, ["kermany"] * len(films) + ["mnist"] * len(mnist), index=index)
    per_film = {i: [j for a, j, _ in pairs if a == i] for i in range(len(films))}
    assert len(films) == 16 and all(len(v) == 1 for v in per_film.values()), per_film


def test_the_index_finds_the_pairs_exact_matching_finds_on_real_twins():
    """1,500 real Kermany224 train films against the 5,232 real PneumoniaMNIST train+val images
    (copies of Kermany's train and val films): the inverted-file index gives the same pairs as
    exact matching, the same pairs again when run twice, and nearly every film its one copy
    (BENCHMARKS.md: 5,209 pairs for all 5,232 MNIST images)."""
    from raycxr.imaging import read_image

    npz = np.load(shared("pneumoniamnist/pneumoniamnist_trainval.npz"))
    mnist = list(np.concatenate([npz["train_images"], npz["val_images"]]))
    files = sorted(glob.glob(str(shared("kermany224") / "train" / "*" / "*.jpeg")))
    films = [read_image(f) for f in files[::len(files) // 1500][:1500]]
    views = [twin_views(a) for a in films + mnist]
    sources = ["kermany"] * len(films) + ["mnist"] * len(mnist)
    exact = cross_source_twins(views, sources, index="exact")
    ivf = cross_source_twins(views, sources, index="ivf")
    assert [(i, j) for i, j, _ in ivf] == [(i, j) for i, j, _ in exact]
    assert np.allclose([s for *_, s in ivf], [s for *_, s in exact], atol=1e-5)
    assert cross_source_twins(views, sources, index="ivf") == ivf
    matched = {i for i, _, _ in exact}
    assert len(matched) >= 0.98 * len(films) and len(exact) <= 1.02 * len(films), (len(matched), len(exact))
    with pytest.raises(ValueError, match="choose one of auto, exact, ivf"):
        cross_source_twins(views, sources, index="hnsw")


def test_identical_copies_cost_pairs_linear_in_their_number(sample_dir):
    """Issue 27: 3,000 copies of one film (a hostile or a careless dataset) gave 4.5 million pairs,
    held in memory, from each search; now each copy is linked to the first, and the groups are
    the same as the full pair list gives."""
    from raycxr.dedup import dhash, near_duplicate_pairs

    films = [np.asarray(Image.open(f).convert("L")) for f in sorted(sample_dir.rglob("*.jpeg"))[:4]]
    hashes = np.stack([dhash(f) for f in films] * 750)  # 3,000 rows: 750 copies of each of 4 films
    pairs = near_duplicate_pairs(hashes, max_bits=8)
    assert len(pairs) <= 2996 + 6 and all(i < j for i, j in pairs)  # 2,996 copies + pairs among the 4 films
    groups = {i: i for i in range(len(hashes))}

    def find(i):
        while groups[i] != i:
            i = groups[i]
        return i
    for i, j in pairs:
        groups[find(j)] = find(i)
    assert len({find(i) for i in range(len(hashes))}) == len({tuple(h) for h in hashes[:4]})
    assert all(find(i) == find(i % 4) for i in range(len(hashes)))  # every copy with its film
    views = [twin_views(f) for f in films] * 200 + [twin_views(f) for f in films]
    sources = ["a"] * 800 + ["b"] * 4
    twins = cross_source_twins(views, sources)
    assert 800 <= len(twins) <= 808  # each of a's 200 copies of a film with b's one copy of it, once
    assert {(i % 4, j - 800) for i, j, _ in twins} == {(k, k) for k in range(4)}
