import pytest

from raycxr.errors import ConfigError, DataError
from raycxr.sources import list_sources, normalise_view, scan_source
from raycxr.sources.kermany import patient_key
from tests import builders


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return builders.build_all(tmp_path_factory.mktemp("fixtures"))


@pytest.mark.parametrize("name, key", [
    ("IM-0115-0001.jpeg", "IM-115"),
    ("IM-0429-0001-0002.jpeg", "IM-429"),
    ("NORMAL2-IM-1345-0001.jpeg", "NORMAL2-1345"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),  # one key across types: conservative grouping
    ("person7_bacteria_24.jpeg", "person7"),
    ("odd-name.jpeg", "file:odd-name"),
])
def test_kermany_patient_key(name, key):
    assert patient_key(name) == key


def test_kermany_scan_reads_labels_and_details(sample_dir):
    records = list(scan_source("kermany", sample_dir))
    assert len(records) == 300
    assert all(r.labels == {"pneumonia": 0, "no_finding": 1} for r in records if "NORMAL" in r.rel_path)
    assert all(r.labels == {"pneumonia": 1, "no_finding": 0} for r in records if "PNEUMONIA" in r.rel_path)
    assert {r.label_detail for r in records} == {"normal", "bacteria", "virus"}
    assert all(not r.rel_path.startswith("/") for r in records)


def _by_name(records):
    return {r.path.name: r for r in records}


def test_nih_labels_identity_views_and_official_split(fixtures):
    recs = _by_name(scan_source("nih", fixtures["nih"]))
    assert len(recs) == 18 and not any(r.error for r in recs.values())
    r = recs["00000013_010.png"]
    assert r.labels["pneumonia"] == r.labels["effusion"] == r.labels["pneumothorax"] == 1
    assert r.labels["cardiomegaly"] == 0 and r.labels["no_finding"] == 0 and r.view == "AP"
    nf = recs["00000002_000.png"].labels
    assert nf["no_finding"] == 1 and nf["pneumonia"] == 0 and "tuberculosis" not in nf
    assert {recs[n].patient_key for n in recs if n.startswith("00000003_")} == {"3"}
    assert recs["00000003_000.png"].fixed_split == "holdout" and recs["00000001_000.png"].fixed_split == "train_val"


def test_rsna_collapses_boxes_and_reads_view_from_dicom(fixtures):
    recs = {r.patient_key: r for r in scan_source("rsna", fixtures["rsna"])}
    assert len(recs) == 8
    assert recs["00436515-870c-4b36-a041-de91049b9ab4"].labels == {"pneumonia": 1, "no_finding": 0}
    assert recs["003d8fa0-6bf1-40ed-b54c-ac657f8495c5"].labels == {"pneumonia": 0, "no_finding": 1}
    assert recs["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].labels == {"pneumonia": 0, "no_finding": 0}
    assert {r.view for r in recs.values()} == {"PA", "AP"}


@pytest.mark.parametrize("policy, expected", [("ignore", None), ("zeros", 0), ("ones", 1)])
def test_mimic_uncertain_policy(fixtures, policy, expected):
    recs = list(scan_source("mimic", fixtures["mimic"], uncertain=policy))
    assert len(recs) == 5 and {r.patient_key for r in recs} == {"10000001", "10000002", "10000003"}
    uncertain = next(r for r in recs if r.patient_key == "10000002")
    assert uncertain.labels.get("pneumonia") == expected and uncertain.labels["effusion"] == 1
    normal = next(r for r in recs if r.path.name.startswith("aaaa0001"))
    assert normal.labels["no_finding"] == 1 and normal.labels["pneumonia"] == 0
    assert [r.view for r in recs].count("LATERAL") == 1


def test_mimic_rejects_unknown_policy(fixtures):
    with pytest.raises(ConfigError, match="allowed: ignore, zeros, ones"):
        list(scan_source("mimic", fixtures["mimic"], uncertain="maybe"))


def test_openi_labels_from_mesh_and_problems(fixtures):
    recs = list(scan_source("openi", fixtures["openi"]))
    by_uid = {}
    for r in recs:
        by_uid.setdefault(r.patient_key, []).append(r)
    assert by_uid["1"][0].labels == {"pneumonia": 0, "no_finding": 1}
    assert {r.view for r in by_uid["1"]} == {"FRONTAL", "LATERAL"}
    assert by_uid["2"][0].labels == {"pneumonia": 1, "no_finding": 0}
    assert by_uid["3"][0].labels == {"pneumonia": 0, "no_finding": 0}
    assert by_uid["4"][0].error.startswith("no labels") and by_uid["5"][0].error.startswith("no labels")


@pytest.mark.parametrize("key", ["montgomery", "shenzhen"])
def test_tuberculosis_sets_leave_pneumonia_unknown(fixtures, key):
    recs = list(scan_source(key, fixtures[key]))
    assert len(recs) == 6 and all("pneumonia" not in r.labels for r in recs)
    assert sorted(r.labels["tuberculosis"] for r in recs) == [0, 0, 0, 1, 1, 1]
    assert all(r.labels["no_finding"] == 1 - r.labels["tuberculosis"] for r in recs)


def test_jsrt_names_and_format(fixtures):
    recs = list(scan_source("jsrt", fixtures["jsrt"]))
    assert sorted(r.labels["nodule"] for r in recs) == [0, 0, 1, 1] and {r.fmt for r in recs} == {"jsrt"}


def test_csv_manifest_maps_columns_and_flags_bad_rows(fixtures):
    recs = list(scan_source("csv", fixtures["csv"], name="kit"))
    good = [r for r in recs if not r.error]
    assert len(good) == 8 and {r.source for r in recs} == {"kit"}
    assert {tuple(sorted(r.labels.items())) for r in good} == {
        (("pneumonia", 1),), (("no_finding", 1), ("pneumonia", 0))}
    errors = sorted(r.error.split(":")[0] for r in recs if r.error)
    assert errors == ["missing file", "unknown label"]


def test_csv_manifest_names_missing_columns(fixtures):
    with pytest.raises(DataError, match="lacks column.*patient.*--source-option"):
        list(scan_source("csv", fixtures["csv"], patient_id="patient"))


@pytest.mark.parametrize("raw, view", [("PA", "PA"), ("AP", "AP"), ("LL", "LATERAL"), ("Lateral", "LATERAL"),
                                       ("Frontal", "FRONTAL"), ("", ""), (None, "")])
def test_normalise_view(raw, view):
    assert normalise_view(raw) == view


def test_unknown_source_and_missing_root(tmp_path):
    assert {"kermany", "nih", "rsna", "mimic", "openi", "montgomery", "shenzhen", "jsrt", "csv"} <= set(list_sources())
    with pytest.raises(DataError, match="use one of: .*kermany"):
        scan_source("nope", tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        scan_source("kermany", tmp_path / "missing")


def test_pneumoniamnist_npz_keeps_medmnist_splits(tmp_path, sample_dir):
    import numpy as np
    from PIL import Image

    from raycxr.data import read_split, target_labels
    from raycxr.ingest import IngestConfig, ingest

    files = sorted(sample_dir.rglob("*.jpeg"))[::10]  # 30 real films at 28 px, both classes
    imgs = np.stack([np.asarray(Image.open(f).convert("L").resize((28, 28))) for f in files])
    labels = np.array([[int("PNEUMONIA" in str(f))] for f in files], dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=imgs[:20], train_labels=labels[:20],
             val_images=imgs[20:], val_labels=labels[20:])
    recs = list(scan_source("pneumoniamnist", tmp_path))
    assert len(recs) == 30 and sum(r.fixed_split == "val" for r in recs) == 10
    s = ingest(IngestConfig(sources={"pneumoniamnist": tmp_path}, out=tmp_path / "o", image_size=28,
                            near_duplicate_bits=-1))
    assert s.counts["val"]["images"] == 10 and s.counts["train"]["images"] + s.counts["holdout"]["images"] == 20
    assert s.counts["holdout"]["images"] > 0
    val = read_split(tmp_path / "o", "val")
    got = sorted(target_labels(val, "pneumonia").tolist())
    assert got == sorted(labels[20:, 0].tolist())


def _npy_header_only(shape, dtype="|u1") -> bytes:
    """An .npy file that declares ``shape`` but holds a few bytes: what a hostile archive sends."""
    import io

    import numpy as np

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + b"\0" * 64


def test_an_npz_member_is_sized_from_its_header_before_it_is_loaded(tmp_path, sample_dir):
    """Issue 27: an archive whose images member declares 10^6 x 10^5 x 10^5 bytes (or hides a
    pickle) is refused from the .npy header alone, and only the member asked for is ever loaded."""
    import zipfile

    import numpy as np

    from raycxr.errors import DecodeError
    from raycxr.imaging import npz_member
    from raycxr.ingest import IngestConfig, ingest

    bad = tmp_path / "bad" / "pneumoniamnist.npz"
    bad.parent.mkdir()
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("train_images.npy", _npy_header_only((10**6, 10**5, 10**5)))
        zf.writestr("train_labels.npy", _array_bytes(np.array([[0], [1], [0]], np.uint8)))
        zf.writestr("val_images.npy", _npy_header_only((4, 28, 28), "|O"))
        zf.writestr("val_labels.npy", _array_bytes(np.array([[1], [0], [1], [1]], np.uint8)))
    with pytest.raises(DecodeError, match="npz array too large"):
        npz_member(bad, "train_images")
    with pytest.raises(DecodeError, match="object array"):
        npz_member(bad, "val_images")
    assert npz_member(bad, "train_labels").tolist() == [[0], [1], [0]]
    # every image of the archive quarantined with its reason, none allocated: nothing usable
    with pytest.raises(DataError, match=r"none of its 7 files or rows could be used \(4 x npz archive holds an object "
                                        r"array.*; 3 x npz array too large"):
        ingest(IngestConfig(sources={"pneumoniamnist": bad.parent}, out=tmp_path / "o", image_size=28,
                            allow_empty_splits=True))


def _array_bytes(arr) -> bytes:
    import io

    import numpy as np

    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


@pytest.mark.parametrize("key", ["montgomery", "shenzhen"])
def test_lung_masks_shipped_beside_the_films_are_never_read_as_films(fixtures, key):
    """Montgomery ships ManualMask/{left,right}Mask/MCUCXR_*.png under the films' own names:
    taken by name, the right-lung mask replaced every film."""
    recs = list(scan_source(key, fixtures[key]))
    assert len(recs) == 6 and all(r.path.parent.name == "CXR_png" for r in recs)
    assert not any(r.error for r in recs)


def test_jsrt_png_conversions_keep_the_labels_and_an_img_wins_over_its_png(tmp_path):
    from tests.builders import build_jsrt

    pngs = list(scan_source("jsrt", build_jsrt(tmp_path / "png", png=True)))
    assert sorted((r.patient_key, r.labels["nodule"], r.fmt) for r in pngs) == [
        ("JPCLN001", 1, ""), ("JPCLN002", 1, ""), ("JPCNN001", 0, ""), ("JPCNN002", 0, "")]
    both = build_jsrt(tmp_path / "both")
    build_jsrt(both / "png", png=True)
    recs = list(scan_source("jsrt", both))
    assert len(recs) == 4 and {r.fmt for r in recs} == {"jsrt"}


def test_a_gzipped_table_is_inflated_in_steps_and_stops_at_the_cap(tmp_path, monkeypatch):
    """Issue 27: a .csv.gz that inflates to 64 MB (a small gzip bomb) under a 4 MB table cap is
    refused after reading just past the cap, never inflated whole; a real one reads as before."""
    import gzip
    import tracemalloc

    import raycxr.sources as sources
    from raycxr.sources import read_rows

    good = tmp_path / "manifest.csv.gz"
    good.write_bytes(gzip.compress(b"path,patient_id,labels\na.png,p1,normal\n"))
    assert [r["path"] for r in read_rows(good, source="csv", required=["path"])] == ["a.png"]
    bomb = tmp_path / "bomb.csv.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"path,patient_id,labels\n")
        for _ in range(64):
            f.write(b"\0" * 2**20)
    assert bomb.stat().st_size < 2**20
    monkeypatch.setattr(sources, "MAX_TABLE_BYTES", 4 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than 4 MB of table once decompressed"):
            read_rows(bomb, source="csv", required=["path"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # the cap and a step, not the 64 MB
    (tmp_path / "broken.csv.gz").write_bytes(b"\x1f\x8b\x08\0garbage")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_rows(tmp_path / "broken.csv.gz", source="csv", required=["path"])
