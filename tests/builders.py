"""Lay out tiny replicas of each dataset in a temporary folder, with real radiographs as pixels.

Pixels come from the bundled sample (real Kermany films, 128 px) and, for NIH, the two real NIH
PNGs in ../shared/data/nih-png when present. Metadata comes from tests/fixtures/. Planted PHI
values (PHI_*) let tests prove that nothing identifying reaches an artefact.
"""

from __future__ import annotations

import shutil
from itertools import cycle
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "kermany-mini"
SHARED_NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-png"

# Values planted where real datasets carry identity; none may appear in any artefact.
PHI_NAME = "Doe^Planted"
PHI_ID = "PHIPATIENT4711"
PHI_BIRTH = "19230405"
PHI_ACCESSION = "ACC98765PHI"
PHI_FILE_TOKEN = "PHIJANEDOE"
PHI_VALUES = (PHI_NAME, "Planted", PHI_ID, PHI_BIRTH, PHI_ACCESSION, PHI_FILE_TOKEN)


def _readable(f: Path) -> bytes:
    """A file's content as a reader sees it: a Parquet file's decoded column values (its bytes are
    zstd-compressed, where a byte search cannot fail), a gzip file's inflated bytes, else the bytes."""
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(f)
        return "\n".join(f"{name}={v!r}" for name in table.column_names if name != "image"
                         for v in table.column(name).to_pylist()).encode()
    data = f.read_bytes()
    if data[:2] == b"\x1f\x8b":
        import gzip

        return gzip.decompress(data)
    return data


def find_phi(folder: Path) -> list[str]:
    """'file: value' for every planted PHI value found in any file under ``folder``, read the way a
    reader would (see _readable), and for every file whose name carries a planted ID."""
    hits = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = _readable(f)
        hits += [f"{f.relative_to(folder)}: {v}" for v in PHI_VALUES if v.encode() in data]
        if PHI_FILE_TOKEN in f.name or PHI_ID in f.name:
            hits.append(f"file name {f.relative_to(folder)}")
    return hits


def _pixels():
    """An endless cycle of real greyscale radiographs (uint8 arrays), alternating classes."""
    normals = sorted((SAMPLE / "NORMAL").iterdir())
    sick = sorted((SAMPLE / "PNEUMONIA").iterdir())
    pairs = [p for pair in zip(normals, sick) for p in pair]
    for p in cycle(pairs):
        yield np.asarray(Image.open(p).convert("L"))


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def dicom_from_array(path: Path, arr: np.ndarray, *, photometric="MONOCHROME2", view="PA", phi=True,
                     bits_stored=8, signed=False, preamble=True, **tags) -> Path:
    """A valid single-frame DX DICOM with ``arr`` as pixels (and planted PHI unless phi=False)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", view, "CHEST"
    if phi:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PHI_NAME, PHI_ID, PHI_BIRTH, PHI_ACCESSION
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(ds.BitsAllocated, signed)]
    ds.PixelData = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def build_nih(root: Path) -> Path:
    import csv

    px = _pixels()
    root.mkdir(parents=True, exist_ok=True)
    for f in ("Data_Entry_2017_v2020.csv", "test_list.txt", "train_val_list.txt"):
        shutil.copy(FIXTURES / "nih" / f, root / f)
    with open(root / "Data_Entry_2017_v2020.csv") as f:
        names = [r["Image Index"] for r in csv.DictReader(f)]
    for i, name in enumerate(names):
        folder = root / f"images_{1 + i % 2:03d}" / "images"
        real = SHARED_NIH / name
        if real.exists():  # the two real NIH films, when ../shared is present
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(real, folder / name)
        else:
            _png(folder / name, next(px))
    return root


def build_rsna(root: Path) -> Path:
    import csv

    px = _pixels()
    root.mkdir(parents=True, exist_ok=True)
    for f in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        shutil.copy(FIXTURES / "rsna" / f, root / f)
    with open(root / "stage_2_train_labels.csv") as f:
        ids = sorted({r["patientId"] for r in csv.DictReader(f)})
    for i, pid in enumerate(ids):
        dicom_from_array(root / "stage_2_train_images" / f"{pid}.dcm", next(px), view="PA" if i % 2 else "AP")
    return root


def build_mimic(root: Path) -> Path:
    import csv

    px = _pixels()
    root.mkdir(parents=True, exist_ok=True)
    for f in ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-metadata.csv"):
        shutil.copy(FIXTURES / "mimic" / f, root / f)
    with open(root / "mimic-cxr-2.0.0-metadata.csv") as f:
        for r in csv.DictReader(f):
            s, st = r["subject_id"], r["study_id"]
            path = root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{r['dicom_id']}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(next(px)).save(path, quality=92)
    return root


def build_openi(root: Path) -> Path:
    import csv

    px = _pixels()
    root.mkdir(parents=True, exist_ok=True)
    for f in ("indiana_reports.csv", "indiana_projections.csv"):
        shutil.copy(FIXTURES / "openi" / f, root / f)
    with open(root / "indiana_projections.csv") as f:
        names = [r["filename"] for r in csv.DictReader(f)]
    for name in names[:-1]:  # the last projection's file is missing on purpose
        _png(root / "images" / "images_normalized" / name, next(px))
    return root


def lung_mask(arr: np.ndarray, side: str) -> np.ndarray:
    """A binary lung-field mask the size of ``arr`` (one half lit), as the NLM sets ship them."""
    mask = np.zeros_like(arr)
    h, w = arr.shape
    cols = slice(w // 8, w // 2 - w // 16) if side == "left" else slice(w // 2 + w // 16, w - w // 8)
    mask[h // 6:h - h // 8, cols] = 255
    return mask


def build_tb(root: Path, prefix: str) -> Path:
    """Montgomery (``MontgomerySet/``) or Shenzhen (``ChinaSet_AllFiles/``) as shipped: films in
    ``CXR_png/``, ``ClinicalReadings/*.txt``, and lung masks: Montgomery's of the same names in
    ``ManualMask/{left,right}Mask/``, Shenzhen's (published separately) as ``mask/*_mask.png``."""
    px = _pixels()
    top = root / ("MontgomerySet" if prefix == "MCUCXR" else "ChinaSet_AllFiles")
    for i in range(1, 7):
        name = f"{prefix}_{i:04d}_{i % 2}"
        film = next(px)
        _png(top / "CXR_png" / f"{name}.png", film)
        (top / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (top / "ClinicalReadings" / f"{name}.txt").write_text(
            f"Patient's Sex: {'FM'[i % 2]}\nPatient's Age: 0{30 + i}Y\n{'TB' if i % 2 else 'normal'}\n")
        if prefix == "MCUCXR":
            for side in ("left", "right"):
                _png(top / "ManualMask" / f"{side}Mask" / f"{name}.png", lung_mask(film, side))
        else:
            _png(root / "mask" / f"{name}_mask.png", lung_mask(film, "left") | lung_mask(film, "right"))
    return root


def jsrt_raw(arr: np.ndarray) -> bytes:
    """Encode a uint8 image as a JSRT film: 2048x2048 12-bit big-endian, 0 = white (inverted)."""
    big = np.asarray(Image.fromarray(arr).resize((2048, 2048), Image.BILINEAR), dtype=np.uint16)
    return (4095 - big.astype(np.uint16) * 16).astype(">u2").tobytes()


def build_jsrt(root: Path, png: bool = False) -> Path:
    """JSRT as shipped (headerless ``.IMG``), or as its common 8-bit PNG conversion."""
    px = _pixels()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"):
        if png:
            _png(root / f"{name}.png", next(px))
        else:
            (root / f"{name}.IMG").write_bytes(jsrt_raw(next(px)))
    return root


def build_csv(root: Path) -> Path:
    """A KIT-style collection: images with identifying names, and a manifest CSV."""
    px = _pixels()
    rows = ["path,patient_id,labels,view"]
    for i in range(8):
        name = f"images/{PHI_FILE_TOKEN}_{i}.png"
        _png(root / name, next(px))
        rows.append(f"{name},{PHI_ID}-{i // 2},{'pneumonia' if i % 2 else 'normal'},PA")
    rows.append(f"images/{PHI_FILE_TOKEN}_missing.png,{PHI_ID}-9,pneumonia,PA")
    rows.append(f"images/{PHI_FILE_TOKEN}_0.png,{PHI_ID}-10,alien_disease,PA")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def build_all(base: Path) -> dict[str, Path]:
    """Every adapter's replica under ``base``: {source key: PATH for --source KEY=PATH}."""
    return {
        "kermany": SAMPLE,
        "nih": build_nih(base / "nih"),
        "rsna": build_rsna(base / "rsna"),
        "mimic": build_mimic(base / "mimic"),
        "openi": build_openi(base / "openi"),
        "montgomery": build_tb(base / "montgomery", "MCUCXR"),
        "shenzhen": build_tb(base / "shenzhen", "CHNCXR"),
        "jsrt": build_jsrt(base / "jsrt"),
        "csv": build_csv(base / "kit"),
    }


def promoted_model(directory: Path, *, head_scale: float = 1.0, stored_size: int = 64, image_size: int = 32,
                   calibration: dict | None = None, threshold: float = 0.5, tta: bool = False) -> Path:
    """A promoted-model folder written through raycxr's own PromotedModel, without a search: a
    tiny timm network with random weights (its classifier scaled by ``head_scale``, so logits can
    be made as large as a test needs)."""
    import torch
    from safetensors.torch import save_file

    from raycxr.labels import FINDINGS
    from raycxr.models import ModelSpec, PromotedModel

    torch.manual_seed(0)
    spec = ModelSpec(architecture="test_resnet", findings=FINDINGS, target="pneumonia", image_size=image_size,
                     stored_size=stored_size, resize="pad", mean=0.5, std=0.25)
    net = spec.network()
    head = net.get_classifier()
    with torch.no_grad():
        head.weight.mul_(head_scale)
        head.bias.mul_(head_scale)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    PromotedModel(spec=spec, threshold=threshold, threshold_rule="youden",
                  calibration=calibration or {"method": "platt", "scale": 1.0, "bias": 0.0},
                  class_names=("not_pneumonia", "pneumonia"), tta=tta, operating_points={"youden": threshold},
                  selection={"rule": "test", "kind": "single", "why": "built by the tests"}).save(directory)
    return directory
