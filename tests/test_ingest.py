import csv
import hashlib
import json
import os
import shutil

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycxr.data import (SCHEMA, SPLITS, decode_images, label_matrix, read_manifest, read_split, split_arrays,
                         target_labels)
from raycxr.errors import ConfigError, DataError
from raycxr.ingest import IngestConfig, assign_splits, ingest
from raycxr.labels import FINDINGS, UNKNOWN
from raycxr.sources.kermany import patient_key


def _all_rows(data_dir):
    return {s: read_split(data_dir, s) for s in SPLITS}


def test_patients_never_straddle_splits(dataset, sample_dir):
    tables = _all_rows(dataset)
    seen = {}
    for split, t in tables.items():
        for ph in set(t.column("patient_hash").to_pylist()):
            assert ph not in seen, f"patient {ph} in {seen.get(ph)} and {split}"
            seen[ph] = split
    # The same holds for the raw keys, which shards never hold: map files back by content hash.
    name_of = {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in sample_dir.rglob("*.jpeg")}
    key_split = {}
    for split, t in tables.items():
        for h in t.column("content_hash").to_pylist():
            key = patient_key(name_of[h])
            assert key_split.setdefault(key, split) == split, key
    assert sum(t.num_rows for t in tables.values()) == 300


def test_shards_follow_schema_and_hold_real_pixels(dataset):
    t = read_split(dataset, "train")
    assert t.schema.remove_metadata().equals(SCHEMA.remove_metadata())
    imgs = decode_images(t.slice(0, 8).to_pydict())
    assert imgs.shape == (8, 1, 64, 64) and imgs.dtype == np.uint8 and imgs.std() > 10
    assert set(t.column("split").to_pylist()) == {"train"}
    assert set(target_labels(t, "pneumonia").tolist()) == {0, 1}
    assert set(t.column("view").to_pylist()) == {"AP"}
    m = read_manifest(dataset)
    assert m.files_in == m.rows_written + m.quarantined == 300
    # stratified: each split holds both classes, near the pooled 50/50
    for split in SPLITS:
        by = m.counts[split]["by_label"]
        assert 0.3 < by["1"] / (by["0"] + by["1"]) < 0.7


def test_no_raw_identity_in_shards(dataset):
    for split in SPLITS:
        t = read_split(dataset, split)
        hashes = t.column("patient_hash").to_pylist()
        assert all(len(h) == 16 and "person" not in h for h in hashes)


def test_bad_files_are_quarantined_and_counted(sample_copy, tmp_path):
    cls = sample_copy / "train" / "NORMAL"
    good = next(cls.iterdir()).read_bytes()
    (cls / "IM-9001-0001.jpeg").write_bytes(good[: len(good) // 3])  # truncated
    (cls / "IM-9002-0001.jpeg").write_bytes(b"")                      # zero bytes
    (cls / "IM-9003-0001.jpeg").write_text("not an image")            # text
    s = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "out", image_size=32))
    assert s.files_in == 303 and s.rows_written == 300 and s.quarantined == 3
    rows = list(csv.DictReader(open(tmp_path / "out" / "quarantine.csv")))
    assert len(rows) == 3 and not any("IM-900" in r["path"] for r in rows)  # names pseudonymised
    reasons = {path.split("/")[-1]: reason for _, path, reason in s.quarantined_files}
    assert set(reasons) == {"IM-9001-0001.jpeg", "IM-9002-0001.jpeg", "IM-9003-0001.jpeg"}
    assert reasons["IM-9002-0001.jpeg"].startswith("empty file")
    assert reasons["IM-9003-0001.jpeg"].startswith("not a PNG, JPEG or DICOM file")
    assert sorted(r["reason"] for r in rows) == sorted(reasons.values())
    assert sum(s.quarantine_reasons.values()) == 3


def test_same_input_and_seed_give_identical_shards(sample_dir, tmp_path):
    outs = []
    for name in ("a", "b"):
        ingest(IngestConfig(sources={"kermany": sample_dir}, out=tmp_path / name, image_size=32, seed=3, workers=1))
        outs.append(tmp_path / name)
    for split in SPLITS:
        fa, fb = sorted((outs[0] / split).glob("*.parquet")), sorted((outs[1] / split).glob("*.parquet"))
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
    assert json.loads((outs[0] / "manifest.json").read_text()) == json.loads((outs[1] / "manifest.json").read_text())
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=tmp_path / "c", image_size=32, seed=4, workers=1))
    assert read_manifest(tmp_path / "c").fingerprint != read_manifest(outs[0]).fingerprint


def test_byte_identical_images_share_a_split(sample_copy, tmp_path, dataset):
    already = read_manifest(dataset).exact_duplicates  # the sample holds one within-patient copy
    src = sample_copy / "train"
    normals = sorted((src / "NORMAL").iterdir())
    # Copy each of 20 normal images under a new patient's name: copies must follow the original.
    for i, f in enumerate(normals[:20]):
        shutil.copyfile(f, src / "NORMAL" / f"IM-{8000 + i}-0001.jpeg")
    s = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "o", image_size=32))
    assert already == 1
    assert s.merged_duplicate_groups == 20 and s.exact_duplicates == already + 20
    split_of, group_of, patients_of = {}, {}, {}
    for split in SPLITS:
        t = read_split(tmp_path / "o", split, columns=["content_hash", "split", "patient_hash", "group_hash"])
        for h, patient, group in zip(*(t.column(c).to_pylist() for c in ("content_hash", "patient_hash", "group_hash"))):
            assert split_of.setdefault(h, split) == split
            assert group_of.setdefault(h, group) == group  # a copy is in its original's group
            patients_of.setdefault(h, set()).add(patient)
    # the bootstrap's clusters are the split groups (issue 26): two patients who share a film are one
    # group_hash (a salted patient hash, never a raw ID), their own patient_hash kept apart
    shared = [h for h, ps in patients_of.items() if len(ps) == 2]
    assert len(shared) == 20
    for split in SPLITS:  # promote's and evaluate's arrays resample by group, not by patient
        t = read_split(tmp_path / "o", split, columns=["patient_hash", "group_hash"])
        groups = split_arrays(tmp_path / "o", split, "pneumonia").groups
        assert set(groups) == set(t.column("group_hash").to_pylist())
        merged = sum(split_of[h] == split for h in shared)
        assert len(set(groups)) == len(set(t.column("patient_hash").to_pylist())) - merged


def test_assign_splits_is_whole_group_and_near_fractions():
    rng = np.random.default_rng(0)
    groups = {f"g{i}": (int(rng.integers(1, 4)), ("src", int(i % 3 == 0))) for i in range(3000)}
    out = assign_splits(groups, val_fraction=0.2, holdout_fraction=0.1, seed=1)
    assert set(out) == set(groups)
    total = sum(n for n, _ in groups.values())
    share = {s: sum(groups[g][0] for g in out if out[g] == s) / total for s in SPLITS}
    assert abs(share["train"] - 0.7) < 0.02 and abs(share["val"] - 0.2) < 0.02 and abs(share["holdout"] - 0.1) < 0.02


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 8}, "image_size"),
    ({"resize": "crop"}, "resize"),
    ({"val_fraction": 0.5, "holdout_fraction": 0.45}, "at least 10%"),
    ({"sources": {}}, "--source"),
])
def test_ingest_config_errors(tmp_path, sample_dir, kwargs, message):
    base = {"sources": {"kermany": sample_dir}, "out": tmp_path / "o"}
    with pytest.raises(ConfigError, match=message):
        IngestConfig(**{**base, **kwargs})


def test_refuses_to_overwrite_foreign_folder(tmp_path, sample_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("x")
    with pytest.raises(DataError, match="not a raycxr dataset"):
        ingest(IngestConfig(sources={"kermany": sample_dir}, out=tmp_path / "o"))
    # a file merely named manifest.json (issue 27) is not a dataset either: nothing is replaced
    (tmp_path / "o" / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(DataError, match="not a raycxr dataset"):
        ingest(IngestConfig(sources={"kermany": sample_dir}, out=tmp_path / "o"))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.json", "precious.txt"]


def test_parquet_is_readable_without_raycxr(dataset):
    f = sorted((dataset / "val").glob("*.parquet"))[0]
    t = pq.read_table(f)
    assert t.num_rows > 0 and "image" in t.column_names


# --- every adapter pooled into one dataset ------------------------------------------------

@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    from tests.builders import build_all

    base = tmp_path_factory.mktemp("pool")
    fixtures = build_all(base / "src")
    summary = ingest(IngestConfig(sources=fixtures, out=base / "data", image_size=32, workers=1,
                                  source_options={"csv": {"name": "kit"}}))
    return fixtures, summary, base / "data"


def test_pooled_dataset_holds_every_source(pooled):
    _, s, data = pooled
    m = read_manifest(data)
    assert set(m.sources) == {"kermany", "nih", "rsna", "mimic", "openi", "montgomery", "shenzhen", "jsrt", "kit"}
    assert m.files_in == m.rows_written + m.quarantined
    written = Counter()
    for split in SPLITS:
        written.update(read_split(data, split, columns=["source"]).column("source").to_pylist())
    assert written == {"kermany": 300, "nih": 18, "rsna": 8, "mimic": 4, "openi": 3, "montgomery": 6,
                       "shenzhen": 6, "jsrt": 4, "kit": 8}
    # one lateral (MIMIC) and one Open-I lateral excluded; bad rows quarantined with their reasons
    assert m.quarantine_reasons == {"excluded": 2, "missing file": 1, "no labels": 2, "unknown label": 1}


def test_pooled_labels_unknown_where_a_source_is_silent(pooled):
    _, _, data = pooled
    t = pa.concat_tables([read_split(data, s, columns=["source", "labels"]) for s in SPLITS])
    labels, sources = label_matrix(t.column("labels")), np.array(t.column("source").to_pylist())
    pneu, tb, nodule = (FINDINGS.index(f) for f in ("pneumonia", "tuberculosis", "nodule"))
    assert (labels[sources == "montgomery", pneu] == UNKNOWN).all()
    assert set(labels[sources == "montgomery", tb]) == {0, 1}
    assert (labels[sources == "kermany", tb] == UNKNOWN).all()
    assert set(labels[sources == "jsrt", nodule]) == {0, 1}
    assert set(labels[sources == "nih", pneu]) == {0, 1}


def test_pooled_patients_disjoint_and_official_test_list_in_holdout(pooled):
    fixtures, _, data = pooled
    seen = {}
    for split in SPLITS:
        for ph in set(read_split(data, split, columns=["patient_hash"]).column("patient_hash").to_pylist()):
            assert seen.setdefault(ph, split) == split
    test_names = (fixtures["nih"] / "test_list.txt").read_text().split()
    test_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in fixtures["nih"].rglob("*.png")
                   if p.name in test_names}
    holdout = set(read_split(data, "holdout", columns=["content_hash"]).column("content_hash").to_pylist())
    assert test_hashes and test_hashes <= holdout
    others = set(read_split(data, "train", columns=["content_hash"]).column("content_hash").to_pylist())
    assert not test_hashes & others


def test_no_planted_phi_in_any_dataset_artefact(pooled):
    from tests.builders import find_phi

    _, _, data = pooled
    assert find_phi(data) == []


def test_near_duplicates_are_merged_into_one_split(sample_copy, tmp_path):
    from PIL import Image

    src = sample_copy / "train" / "NORMAL"
    originals = sorted(src.iterdir())[:12]
    for i, f in enumerate(originals):  # re-encoded, slightly brighter copies under new patients
        im = Image.open(f).convert("L").point(lambda v: min(255, v + 3))
        im.save(src / f"IM-{7000 + i}-0001.jpeg", quality=70)
    s = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "o", image_size=64))
    assert s.near_duplicate_pairs >= 12
    off = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "off", image_size=64,
                              near_duplicate_bits=-1))
    assert off.near_duplicate_pairs == 0 and off.merged_duplicate_groups < s.merged_duplicate_groups
    pairs = {hashlib.sha256(f.read_bytes()).hexdigest(): hashlib.sha256((src / f"IM-{7000 + i}-0001.jpeg").read_bytes()).hexdigest()
             for i, f in enumerate(originals)}
    split_of = {}
    for split in SPLITS:
        for h in read_split(tmp_path / "o", split, columns=["content_hash"]).column("content_hash").to_pylist():
            split_of[h] = split
    assert all(split_of[a] == split_of[b] for a, b in pairs.items())


def test_a_fifo_named_as_an_input_is_quarantined_not_read(tmp_path):
    """A FIFO (or device) in a manifest would block ingest's read for ever: refused from its metadata."""
    import os

    from raycxr.ingest import _decode_one

    fifo = tmp_path / "film.png"
    os.mkfifo(fifo)
    *_, reason = _decode_one((str(fifo), 64, "pad", "", True, False, 512.0))
    assert reason == "a FIFO, not a regular file: not read"


def test_a_file_over_the_size_limit_is_quarantined_unread(sample_copy, tmp_path):
    """Issue 27: a per-file size cap (ingest --max-file-mb) quarantines a file too large to be a chest
    film with the reason, instead of reading it whole; the others are ingested."""
    big = sample_copy / "train" / "NORMAL" / "IM-7777-0001.jpeg"
    shutil.copyfile(sorted((sample_copy / "train" / "NORMAL").iterdir())[0], big)
    with open(big, "ab") as f:
        f.write(b"\0" * (3 * 2**20))  # a 3 MB film (JPEG ignores what follows its end marker)
    s = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "o", image_size=32, max_file_mb=2))
    rows = list(csv.DictReader(open(tmp_path / "o" / "quarantine.csv")))
    assert s.quarantined == 1 and s.rows_written == 300 and "over the 2 MB limit" in rows[0]["reason"]
    with pytest.raises(ConfigError, match="max_file_mb"):
        IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "p", max_file_mb=0)


def test_the_salt_file_is_made_private_in_one_step_and_an_empty_salt_is_refused(tmp_path, monkeypatch):
    """Issue 27: the per-user salt is created 0600 (never readable by others, even for an instant) and
    kept; an empty salt (file or environment) would make patient hashes guessable and is refused."""
    import stat

    import raycxr.ingest as ingest_module

    salt_file = tmp_path / "cfg" / "salt"
    monkeypatch.setattr(ingest_module, "_SALT_FILE", salt_file)
    monkeypatch.delenv("RAYCXR_SALT")
    old = os.umask(0)  # a permissive umask must not leak into the file's mode
    try:
        first = ingest_module._resolve_salt(None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600 and len(first) == 64
    assert ingest_module._resolve_salt(None) == first  # kept
    salt_file.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        ingest_module._resolve_salt(None)
    monkeypatch.setenv("RAYCXR_SALT", "")
    with pytest.raises(ConfigError, match="RAYCXR_SALT is empty"):
        ingest_module._resolve_salt(None)


def test_quarantine_reasons_are_raycxrs_own_words(sample_copy, tmp_path):
    """Issue 27: quarantine.csv and manifest.json are shared with the dataset, so a reason is a fixed
    text (an exception's type at most): never a decoder's message, a DICOM attribute's value or a
    path, whatever a hostile file holds."""
    import pydicom
    from PIL import Image

    from raycxr.ingest import QUARANTINE_REASONS, written_reason
    from tests.builders import dicom_from_array

    cls = sample_copy / "train" / "NORMAL"
    film = np.asarray(Image.open(sorted(cls.iterdir())[0]).convert("L"))
    dcm = dicom_from_array(tmp_path / "x.dcm", film)
    ds = pydicom.dcmread(dcm)
    ds.PhotometricInterpretation = "DOE^JOHN MRN998877"  # a value the file chose: not quoted back
    ds.save_as(cls / "IM-9100-0001.jpeg")
    png = cls / "IM-9101-0001.jpeg"
    Image.fromarray(film).save(png, format="PNG")
    raw = bytearray(png.read_bytes())
    idat = raw.index(b"IDAT")
    raw[idat + 40: idat + 400] = bytes(range(256)) + bytes(104)  # a broken deflate stream inside a valid header
    png.write_bytes(bytes(raw))
    (cls / "IM-9102-0001.jpeg").write_bytes(b"\x89PNG\r\n\x1a\n" + str(tmp_path).encode())
    s = ingest(IngestConfig(sources={"kermany": sample_copy}, out=tmp_path / "o", image_size=32))
    assert s.quarantined == 3 and s.rows_written == 300
    text = (tmp_path / "o" / "quarantine.csv").read_text() + (tmp_path / "o" / "manifest.json").read_text()
    for leak in ("DOE", "JOHN", "MRN998877", str(tmp_path), "IM-910"):
        assert leak not in text, leak
    rows = list(csv.DictReader(open(tmp_path / "o" / "quarantine.csv")))
    assert all(r["reason"].startswith(QUARANTINE_REASONS) for r in rows), rows
    assert any(r["reason"].startswith("unsupported PhotometricInterpretation non-standard") for r in rows), rows
    # a message raycxr did not word itself is never written
    assert written_reason("cannot identify image file '/home/alice/DOE_JOHN.png'") == "unclassified"
    assert written_reason("decoder failed (ValueError)") == "decoder failed (ValueError)"


_KILLED_INGEST = """
import sys
from pathlib import Path
import raycxr.ingest as ingest
ingest.BATCH = 20  # small batches, so that a kill lands between two of them
ingest.ingest(ingest.IngestConfig(sources={"kermany": Path(sys.argv[1])}, out=Path(sys.argv[2]), image_size=224,
                                  salt="s", workers=1, resume=sys.argv[3] == "resume"))
"""


def test_an_ingest_killed_midway_leaves_the_old_dataset_and_resume_reuses_its_batches(sample_dir, tmp_path):
    """A real SIGKILL of an ingest over an existing dataset: the old dataset is as it was, the
    decoded batches stay beside it, and --resume reuses them to write what a fresh ingest writes."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "data"
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=32, salt="s"))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_INGEST, str(sample_dir), str(out), "fresh"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [p for d in tmp_path.glob(".data.staging-*") for p in d.glob("batch-*.parquet")]
        if len(staged) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(30) == -signal.SIGKILL, "the ingest ended before it could be killed midway"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    (staging,) = tmp_path.glob(".data.staging-*")
    kept = {p.name: p.stat().st_mtime_ns for p in staging.glob("batch-*.parquet")}
    assert len(kept) >= 3

    subprocess.run([sys.executable, "-c", _KILLED_INGEST.replace("ingest.BATCH = 20", "ingest.BATCH = 20\n"
                    "import logging; logging.basicConfig(level=logging.INFO)"), str(sample_dir), str(out), "resume"],
                   check=True)
    assert not list(tmp_path.glob(".data.staging-*")), "the staging folder is removed once the dataset is in place"
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-c", _KILLED_INGEST, str(sample_dir), str(fresh), "fresh"], check=True)
    assert read_manifest(out).fingerprint == read_manifest(fresh).fingerprint
    for split in SPLITS:
        assert read_split(out, split).equals(read_split(fresh, split))
    assert (out / "manifest.json").read_text() == (fresh / "manifest.json").read_text()


def test_shards_are_the_ones_the_manifest_lists(dataset):
    """Readers start from the manifest's list (an ingest at a URI leaves an older dataset's shards
    until its manifest is written): a stray shard beside them is not read."""
    manifest = read_manifest(dataset)
    listed = [n for names in manifest.shards.values() for n in names]
    assert listed and all((dataset / n).is_file() for n in listed)
    rows = read_split(dataset, "val").num_rows
    stray = dataset / "val" / "part-99999-ffffffff.parquet"
    shutil.copyfile(dataset / manifest.shards["val"][0], stray)
    try:
        assert read_split(dataset, "val").num_rows == rows
    finally:
        stray.unlink()


@pytest.mark.slow
def test_an_ingest_decoded_by_ray_tasks_equals_a_local_one(sample_dir, tmp_path):
    """--address: each batch decoded by a Ray task (a Ray of its own here, in a subprocess); the
    manifest and every split are those of the process-pool ingest of the same files."""
    import subprocess
    import sys

    script = _KILLED_INGEST.replace("ingest.BATCH = 20", "ingest.BATCH = 50").replace(
        'resume=sys.argv[3] == "resume"', 'address=sys.argv[3] or None')
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    for out, address in ((tmp_path / "on-ray", "local"), (tmp_path / "here", "")):
        subprocess.run([sys.executable, "-c", script, str(sample_dir), str(out), address], check=True, env=env,
                       timeout=300)
    assert (tmp_path / "on-ray" / "manifest.json").read_text() == (tmp_path / "here" / "manifest.json").read_text()
    for split in SPLITS:
        assert read_split(tmp_path / "on-ray", split).equals(read_split(tmp_path / "here", split))
