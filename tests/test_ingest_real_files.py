"""Ingest on files as users really have them (issue 12): per-source splits, CSVs in every shape
seen, DICOMs without a meta group, defensible labels, nothing destroyed or leaked, readers that
refuse what they should. Each test failed before its fix."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from raycxr.data import SPLITS, read_manifest, read_split
from raycxr.errors import DataError
from raycxr.ingest import IngestConfig, ingest
from tests.builders import build_nih, build_rsna, dicom_from_array
from tests.conftest import shared


def _first_png(sample_dir, n=8):
    return [np.asarray(Image.open(f).convert("L")) for f in sorted((sample_dir / "NORMAL").iterdir())[:n]]


# --- 1. splits per source -------------------------------------------------------------------

def test_a_sources_official_test_list_does_not_take_other_sources_holdout(sample_dir, tmp_path):
    """NIH's test_list.txt pins NIH images to the holdout; Kermany, pooled beside it, must still get
    its own validation and holdout (it used to go entirely to train)."""
    nih = build_nih(tmp_path / "nih")
    assert (nih / "test_list.txt").exists()
    s = ingest(IngestConfig(sources={"kermany": sample_dir, "nih": nih}, out=tmp_path / "o", image_size=32,
                            workers=1))
    for split in ("val", "holdout"):
        assert s.counts[split]["by_source"].get("kermany", 0) > 20, (split, s.counts[split]["by_source"])
        assert s.counts[split]["patients_by_source"]["kermany"] > 10
    m = read_manifest(tmp_path / "o")
    assert m.counts["holdout"]["patients_by_source"]["nih"] >= 1


def test_an_empty_split_is_refused_with_the_reason_or_written_on_request(tmp_path, sample_dir):
    src = tmp_path / "csv"
    src.mkdir()
    rows = ["path,patient_id,labels"]
    for i, arr in enumerate(_first_png(sample_dir, 3)):
        Image.fromarray(arr).save(src / f"{i}.png")
        rows.append(f"{i}.png,p{i},{'pneumonia' if i else 'normal'}")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"split (val|holdout) has no images \(3 images of 3 patient"):
        ingest(IngestConfig(sources={"csv": src / "m.csv"}, out=tmp_path / "o", image_size=32, workers=1))
    assert not (tmp_path / "o").exists()
    s = ingest(IngestConfig(sources={"csv": src / "m.csv"}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    assert s.rows_written == 3


def test_a_source_with_no_usable_row_fails_and_says_why(tmp_path):
    rsna = build_rsna(tmp_path / "rsna")
    shutil.rmtree(rsna / "stage_2_train_images")  # labels downloaded, images not
    with pytest.raises(DataError, match=r"source rsna: none of its \d+ files or rows could be used \(\d+ x missing "
                                        r"file: listed in stage_2_train_labels.csv but not found"):
        ingest(IngestConfig(sources={"rsna": rsna}, out=tmp_path / "o", image_size=32, workers=1))


# --- 3. every CSV a user really has -----------------------------------------------------------

def _manifest_source(tmp_path, sample_dir, *, delimiter=",", encoding="utf-8", bom=False, gz=False, extra=()):
    folder = tmp_path / "kit"
    folder.mkdir()
    lines = [delimiter.join(["path", "patient_id", "labels", "view"])]
    for i, arr in enumerate(_first_png(sample_dir, 8)):
        Image.fromarray(arr).save(folder / f"img{i}.png")
        lines.append(delimiter.join([f"img{i}.png", f"Müller-{i // 2}", "pneumonia" if i % 2 else "normal", "PA"]))
    lines += list(extra)
    text = ("\ufeff" if bom else "") + "\n".join(lines) + "\n"
    data = text.encode(encoding)
    path = folder / ("manifest.csv.gz" if gz else "manifest.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("variant", [
    {"delimiter": ";"},                       # an Excel re-save in a European locale
    {"bom": True},                            # UTF-8 with a byte-order mark
    {"encoding": "cp1252"},                   # Latin-1 / Windows-1252 bytes (the umlaut in the IDs)
    {"gz": True, "delimiter": "\t"},          # gzipped, tab-separated
])
def test_manifest_csv_variants_ingest_the_same_rows(tmp_path, sample_dir, variant):
    manifest = _manifest_source(tmp_path, sample_dir, **variant)
    s = ingest(IngestConfig(sources={"csv": manifest}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    assert s.rows_written == 8 and s.quarantined == 0
    assert sum(c["patients"] for c in s.counts.values()) == 4


def test_short_rows_blank_ids_and_unlisted_images_are_quarantined_with_reasons_not_cells(tmp_path, sample_dir):
    manifest = _manifest_source(tmp_path, sample_dir, extra=[
        "img0.png,,normal,PA",            # blank patient id
        "img1.png,p9",                    # short row
        "img2.png,p10,John Doe MRN998877,PA",  # a label cell holding a name: never quoted back
    ])
    s = ingest(IngestConfig(sources={"csv": manifest}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    reasons = [r for _, _, r in s.quarantined_files]
    assert s.rows_written == 8 and len(reasons) == 3
    assert any("blank patient_id" in r for r in reasons) and any("short row: line 11" in r for r in reasons)
    assert any(r.startswith("unknown label") for r in reasons)
    text = (tmp_path / "o" / "quarantine.csv").read_text()
    assert "John" not in text and "MRN998877" not in text and "MRN998877" not in " ".join(reasons)


def test_missing_columns_are_listed_with_what_the_header_has(tmp_path):
    rsna = tmp_path / "rsna"
    rsna.mkdir()
    (rsna / "stage_2_train_labels.csv").write_text("patient;x;y;width;height;Target\nabc;;;;;0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) patientId \(read with delimiter ';'; its header has: "
                                        r"patient, x, y"):
        ingest(IngestConfig(sources={"rsna": rsna}, out=tmp_path / "o", image_size=32))


def test_rsna_labels_resaved_by_excel_with_semicolons(tmp_path):
    rsna = build_rsna(tmp_path / "rsna")
    f = rsna / "stage_2_train_labels.csv"
    rows = list(csv.reader(open(f)))
    f.write_bytes(("\ufeff" + "\r\n".join(";".join(r) for r in rows) + "\r\n").encode())
    s = ingest(IngestConfig(sources={"rsna": rsna}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    assert s.rows_written == 8


def test_mimic_csvs_as_physionet_ships_them_gzipped(tmp_path):
    from tests.builders import build_mimic

    mimic = build_mimic(tmp_path / "mimic")
    for name in ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv"):
        (mimic / f"{name}.gz").write_bytes(gzip.compress((mimic / name).read_bytes()))
        (mimic / name).unlink()
    s = ingest(IngestConfig(sources={"mimic": mimic}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    assert s.rows_written == 4


def test_images_no_row_lists_are_counted(tmp_path):
    rsna = build_rsna(tmp_path / "rsna")
    extra = rsna / "stage_2_train_images" / "not-in-the-labels.dcm"
    shutil.copy(next((rsna / "stage_2_train_images").iterdir()), extra)
    s = ingest(IngestConfig(sources={"rsna": rsna}, out=tmp_path / "o", image_size=32, workers=1,
                            allow_empty_splits=True))
    assert s.quarantine_reasons.get("unlisted") == 1 and s.files_in == s.rows_written + s.quarantined


# --- 4. DICOM without preamble or meta group --------------------------------------------------

def _strip_meta(src, dst):
    """The data set alone: no 128-byte preamble, no DICM, no group 0002 (as old PACS exports are)."""
    import pydicom

    ds = pydicom.dcmread(src)
    implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    ds.save_as(dst, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    head = open(dst, "rb").read(132)
    assert head[128:132] != b"DICM" and head[:2] != b"\x02\x00"
    return dst


def test_real_monochrome1_dicom_without_meta_group_decodes_like_the_original(tmp_path):
    from raycxr.imaging import read_image

    original = shared("dicom/RG1_UNCR.dcm")
    stripped = _strip_meta(original, tmp_path / "no-meta.dcm")
    a, b = read_image(original), read_image(stripped)
    assert a.shape == b.shape == (1955, 1841) and np.array_equal(a, b)  # rows x columns
    assert a[:50, :50].mean() < a[900:1000, 900:1000].mean() + 200  # decoded, not blank


def test_synthetic_implicit_vr_dicom_without_meta_decodes(tmp_path, sample_dir):
    from raycxr.imaging import read_image

    arr = _first_png(sample_dir, 1)[0]
    src = dicom_from_array(tmp_path / "a.dcm", arr, phi=False)
    stripped = _strip_meta(src, tmp_path / "b.dcm")
    assert np.array_equal(read_image(stripped), read_image(src))


# --- 5. labels you can defend -----------------------------------------------------------------

@pytest.mark.parametrize("mesh,problems,text,expect", [
    ("No Indexing", "No Indexing", "", {}),
    ("normal", "normal", "No acute cardiopulmonary disease.", {"pneumonia": 0, "no_finding": 1}),
    ("Opacity/lung/base/left", "Opacity", "Left basilar opacity concerning for pneumonia.", {"no_finding": 0}),
    ("Opacity", "Opacity", "Atelectasis versus pneumonia.", {"no_finding": 0}),
    ("Opacity", "Opacity", "Cannot exclude early pneumonia.", {"no_finding": 0}),
    ("Cardiomegaly", "Cardiomegaly", "No focal consolidation or pneumonia.", {"pneumonia": 0, "no_finding": 0}),
    ("Pneumonia/upper lobe/right", "Pneumonia", "Right upper lobe pneumonia.", {"pneumonia": 1, "no_finding": 0}),
    ("Cardiomegaly;No Indexing", "Cardiomegaly", "", {"pneumonia": 0, "no_finding": 0}),
])
def test_openi_labels(mesh, problems, text, expect):
    from raycxr.sources.openi import _labels

    assert _labels(mesh, problems, text) == expect


def test_kaggle_kermany_archive_counts_each_film_once(tmp_path, sample_dir):
    from raycxr.sources import scan_source

    root = tmp_path / "archive"
    files = sorted((sample_dir / "NORMAL").iterdir())[:3] + sorted((sample_dir / "PNEUMONIA").iterdir())[:2]
    for top in ("chest_xray", "chest_xray/chest_xray", "__MACOSX/chest_xray"):
        for f in files:
            dst = root / top / "train" / f.parent.name / (("._" if "MACOSX" in top else "") + f.name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst)
    found = list(scan_source("kermany", root))
    assert len(found) == 5 and all(r.rel_path.startswith("chest_xray/train/") for r in found)


def test_true_original_sizes_are_stored(tmp_path, sample_dir):
    src = tmp_path / "k" / "train" / "NORMAL"
    src.mkdir(parents=True)
    for i, f in enumerate(sorted((sample_dir / "NORMAL").iterdir())[:30]):
        Image.open(f).convert("L").resize((1776, 1416)).save(src / f"IM-{5000 + i}-0001.jpeg", quality=90)
    ingest(IngestConfig(sources={"kermany": tmp_path / "k"}, out=tmp_path / "o", image_size=64, workers=1))
    t = read_split(tmp_path / "o", "train", columns=["orig_height", "orig_width"])
    assert set(t.column("orig_height").to_pylist()) == {1416} and set(t.column("orig_width").to_pylist()) == {1776}


# --- 6. ingest never destroys or leaks --------------------------------------------------------

def test_a_failed_reingest_leaves_the_old_dataset_intact(tmp_path, sample_dir):
    out = tmp_path / "data"
    first = ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=32, workers=1))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(DataError):
        ingest(IngestConfig(sources={"kermany": tmp_path / "mistyped"}, out=out, image_size=32, workers=1))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and read_manifest(out).fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folders left beside it
    second = ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=48, workers=1))
    assert read_manifest(out).fingerprint == second.fingerprint != first.fingerprint


def test_file_names_that_are_not_utf8_and_identifying_suffixes(tmp_path, sample_dir):
    root = tmp_path / "k"
    shutil.copytree(sample_dir, root / "train")
    src = next((root / "train" / "NORMAL").iterdir())
    raw_name = os.fsencode(root / "train" / "NORMAL") + b"/IM-9100-0001-\xff\xfe.jpeg"
    with open(raw_name, "wb") as f:
        f.write(src.read_bytes())  # a copy (merged with its original's group, and still written)
    s = ingest(IngestConfig(sources={"kermany": root}, out=tmp_path / "o", image_size=32, workers=1))
    assert s.rows_written == 301

    from raycxr.ingest import _pseudonym
    from raycxr.sources import Record

    rec = Record(path=tmp_path / "x", rel_path="scans/Doe.John-MRN998877", source="csv", patient_key="p")
    assert "mrn" not in _pseudonym("salt", rec).lower() and "." not in _pseudonym("salt", rec)
    assert _pseudonym("salt", Record(path=tmp_path, rel_path="a/b.PNG", source="csv", patient_key="p")).endswith(".png")


# --- 7. readers that refuse what they should --------------------------------------------------

def test_blank_and_mislabelled_files_are_quarantined(tmp_path, sample_dir):
    root = tmp_path / "k"
    shutil.copytree(sample_dir, root / "train")
    normal = root / "train" / "NORMAL"
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(normal / "IM-9200-0001.jpeg")        # all black
    Image.fromarray(np.full((256, 256), 200, np.uint8)).save(normal / "IM-9201-0001.png")     # flat grey
    Image.fromarray(_first_png(sample_dir, 1)[0]).save(normal / "IM-9202-0001.png", format="GIF")   # GIF named .png
    Image.fromarray(_first_png(sample_dir, 2)[1]).save(normal / "IM-9203-0001.jpeg", format="WEBP")  # WebP named .jpeg
    s = ingest(IngestConfig(sources={"kermany": root}, out=tmp_path / "o", image_size=32, workers=1))
    reasons = {p.split("/")[-1]: r for _, p, r in s.quarantined_files}
    assert reasons["IM-9200-0001.jpeg"].startswith("blank image") and reasons["IM-9201-0001.png"].startswith("blank")
    assert reasons["IM-9202-0001.png"].startswith("not a PNG, JPEG or DICOM")
    assert reasons["IM-9203-0001.jpeg"].startswith("not a PNG, JPEG or DICOM")
    assert s.rows_written == 300


@pytest.mark.parametrize("tags", [
    {"NumberOfFrames": "ab"},
    {"WindowCenter": 100, "WindowWidth": 0},
    {"RescaleSlope": "x1", "RescaleIntercept": 0},
])
def test_malformed_dicom_attributes_are_decode_errors(tmp_path, sample_dir, tags):
    from raycxr.errors import DecodeError
    from raycxr.imaging import read_image

    arr = _first_png(sample_dir, 1)[0]
    path = dicom_from_array(tmp_path / "bad.dcm", arr, phi=False)
    import pydicom

    ds = pydicom.dcmread(path)
    for k, v in tags.items():  # text where a number belongs goes in under a text VR, as broken exporters write it
        vr = "LO" if isinstance(v, str) else pydicom.datadict.dictionary_VR(k)
        ds.add_new(pydicom.datadict.tag_for_keyword(k), vr, v)
    ds.save_as(path)
    try:
        out = read_image(path)
    except DecodeError as exc:
        assert str(exc)  # a reason, and no traceback
    else:
        assert out.shape == arr.shape  # or pydicom copes with it


def test_pooled_ingest_manifest_counts_sum(tmp_path, sample_dir):
    nih = build_nih(tmp_path / "nih")
    s = ingest(IngestConfig(sources={"kermany": sample_dir, "nih": nih}, out=tmp_path / "o", image_size=32, workers=1))
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert sum(m["counts"][sp]["images"] for sp in SPLITS) == s.rows_written


def test_a_decode_worker_killed_mid_ingest_costs_no_file(sample_dir, tmp_path, caplog):
    """One decode process SIGKILLed while ingest runs (as the OOM killer would): the pool breaks,
    the files it held are decoded again alone, the rest go on in a fresh pool; nothing is lost."""
    import threading
    import time
    from pathlib import Path

    def children() -> dict[int, bytes]:
        """This process's direct children: pid -> command line (from /proc)."""
        out = {}
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
        return out

    mine = Path("/proc/self/cmdline").read_bytes()
    before = set(children())  # e.g. a test session's Ray: never touched
    killed = []

    def kill_one_worker():
        deadline = time.time() + 60
        while time.time() < deadline:
            # forked pool workers share this process's command line (not multiprocessing's helpers)
            new = [pid for pid, cmd in children().items() if pid not in before and cmd == mine]
            if new:
                time.sleep(0.05)  # the 300 small films take well under a second in all
                os.kill(new[0], 9)
                killed.append(new[0])
                return
            time.sleep(0.01)

    t = threading.Thread(target=kill_one_worker)
    t.start()
    s = ingest(IngestConfig(sources={"kermany": sample_dir}, out=tmp_path / "o", image_size=64, workers=2))
    t.join()
    assert killed, "no decode worker was seen to kill"
    assert "a decode worker died" in caplog.text  # the pool did break, and ingest recovered
    assert s.rows_written == 300 and s.quarantined == 0


@pytest.mark.parametrize("lists", [("train_val_list.txt", "test_list.txt"), ("train_val_list.txt",)])
def test_nih_official_lists_fix_nih_holdout_and_keep_train_val_out_of_it(sample_dir, tmp_path, lists):
    """Images of train_val_list.txt are never held out, even with a large holdout fraction; with
    train_val_list.txt alone, every image it does not list is official test, so held out."""
    import hashlib

    nih = build_nih(tmp_path / "nih")
    for f in {"train_val_list.txt", "test_list.txt"} - set(lists):
        (nih / f).unlink()
    train_val = set((nih / "train_val_list.txt").read_text().split())
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in nih.rglob("*.png")}
    assert train_val <= set(digest) and set(digest) - train_val
    # NIH alone: the fixture's films are copies of the bundled Kermany films, and pooled with them a
    # Kermany patient twinned with both an official test and a train_val image rightly goes to holdout.
    s = ingest(IngestConfig(sources={"nih": nih}, out=tmp_path / "o", image_size=32, workers=1,
                            holdout_fraction=0.5, val_fraction=0.3, allow_empty_splits=True))
    got = {split: set(read_split(s.out, split, columns=["content_hash"]).column("content_hash").to_pylist())
           for split in SPLITS}
    assert not {digest[n] for n in train_val} & got["holdout"]
    assert {digest[n] for n in train_val} <= got["train"] | got["val"]
    assert {digest[n] for n in set(digest) - train_val} <= got["holdout"]
