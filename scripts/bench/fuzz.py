"""Coverage-guided fuzzing of raycxr's readers with atheris (libFuzzer for Python), as Pillow and
pydicom are fuzzed under OSS-Fuzz.

Targets, and the only errors each may raise (anything else, a hang or running out of memory is a
crash):
  image   bytes -> raycxr.imaging.load_for_model (DICOM, PNG, JPEG; sniffed by content)   DecodeError
  space   bytes -> raycxr.config.load_space (a search-space YAML file)                     ConfigError
  model   bytes -> a promoted model's config.json -> PromotedModel.load + load_network     ConfigError
  table   bytes -> one label table of a CSV adapter (NIH, RSNA, MIMIC, Open-I, a CSV manifest;
          the first byte picks which, the rest is the table, gzipped when it starts like gzip)
          -> every record the adapter yields over a replica of that dataset         DataError

Seeds: the bundled sample's JPEGs, small DICOMs written here (MONOCHROME1, 12-bit with a window,
rescale, a VOI LUT) and those in ../shared/data when present (under 1 MB), the shipped search
spaces, a promoted model's config.json, the tables of tests/builders.py's dataset replicas (the
real layouts, with real films). The image target mutates DICOMs element by element half
the time (pixel-pipeline attributes set to hostile values), and bytes otherwise.

Each target runs in its own process under RLIMIT_AS (2 GB; 6 GB for the space and model targets,
which import torch: its CUDA build maps over 4 GB of address space on import) with libFuzzer's
per-input timeout (10 s) and RSS limit (2 GB). A DecodeError caused by a MemoryError counts as a
crash: a file that makes the reader run out of memory is not merely "unreadable". So does an input
during which the process's peak RSS passes PEAK_RSS_MB: under the address-space cap, a C library
that cannot allocate may end the process (libFuzzer: "fuzz target exited") with no trace of which
input did it; the peak check names the input before that happens. Crashing inputs
are written to OUT/crash-*; make each a regression test.

Usage:
  .venv/bin/python scripts/bench/fuzz.py                      # every target, 10 minutes each
  .venv/bin/python scripts/bench/fuzz.py --target image --seconds 60
  .venv/bin/python scripts/bench/fuzz.py --runs 100           # a smoke run (what the tests do)
Prints per target: executions, crashes found, and the libFuzzer log's last lines.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
TARGETS = ("image", "space", "model", "table")
MEMORY_LIMIT = {"image": 2 << 30, "space": 6 << 30, "model": 6 << 30, "table": 2 << 30}
# Peak resident memory an input may bring the fuzzing process to (its own ~200 MB included). The
# largest readable image (64 Mpx, imaging.MAX_PIXELS) decodes within about 750 MB.
PEAK_RSS_MB = {"image": 1200, "space": 3000, "model": 3000, "table": 1200}
# The table target: (adapter, the table the input replaces) by the input's first byte.
TABLES = (("nih", "Data_Entry_2017_v2020.csv"), ("rsna", "stage_2_train_labels.csv"),
          ("mimic", "mimic-cxr-2.0.0-metadata.csv"), ("mimic", "mimic-cxr-2.0.0-chexpert.csv"),
          ("openi", "indiana_projections.csv"), ("openi", "indiana_reports.csv"), ("csv", "manifest.csv"))


def _replicas(folder: Path) -> dict[str, Path]:
    """tests/builders.py's replica of each CSV adapter's dataset (real films, the shipped layout)."""
    sys.path.insert(0, str(ROOT))
    from tests import builders

    built = builders.build_all(folder)
    return {key: (built[key].parent if key == "csv" else built[key]) for key, _ in TABLES}

# DICOM attributes the pixel pipeline reads, and values a hostile file could give them.
_DICOM_TAGS = ["PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
               "PixelRepresentation", "SamplesPerPixel", "PlanarConfiguration", "NumberOfFrames", "WindowCenter",
               "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType", "VOILUTFunction", "Modality"]
_HOSTILE = [0, 1, -1, 2, 7, 8, 12, 16, 17, 32, 65535, 2**31 - 1, -(2**31), "0", "", "ab", "-1", "1e309", "nan",
            "MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "SIGMOID", "LINEAR_EXACT", "\\\\",
            "1\\2\\3", "4000"]


def _seed_dicoms(folder: Path) -> None:
    import numpy as np
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)

    def write(name, arr, bits, **tags):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", *arr.shape, 1
        ds.PhotometricInterpretation = tags.pop("photometric", "MONOCHROME2")
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits <= 8 else 16), bits, bits - 1, 0
        ds.PixelData = arr.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(folder / name, enforce_file_format=True)

    img = rng.integers(0, 4096, (48, 40))
    write("plain8.dcm", img // 16, 8)
    write("mono1.dcm", img, 12, photometric="MONOCHROME1")
    write("window.dcm", img, 12, WindowCenter=2048, WindowWidth=1000, RescaleSlope=1, RescaleIntercept=-1024)
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 8]
    lut.add_new(0x00283006, "OW", (np.arange(4096) // 16).astype(np.uint16).tobytes())
    write("voilut.dcm", img, 12, VOILUTSequence=Sequence([lut]))


def _seed_model(folder: Path) -> Path:
    """A promoted model's folder (tiny network, random weights) whose config.json seeds the model target."""
    import torch
    from safetensors.torch import save_file

    from raycxr.labels import FINDINGS
    from raycxr.models import ModelSpec, PromotedModel

    torch.manual_seed(0)
    spec = ModelSpec(architecture="test_resnet", findings=FINDINGS, target="pneumonia", image_size=32,
                     stored_size=64, resize="pad", mean=0.5, std=0.25)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in spec.network().state_dict().items()}, str(folder / "model.safetensors"))
    PromotedModel(spec=spec, threshold=0.5, threshold_rule="youden", calibration={"method": "platt", "scale": 1.0,
                  "bias": 0.0}, class_names=("not_pneumonia", "pneumonia"), tta=False,
                  operating_points={"youden": 0.5}, selection={"rule": "fuzz", "kind": "single"}).save(folder)
    return folder


def seeds(target: str, folder: Path, work: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if target == "image":
        _seed_dicoms(folder)
        for p in sorted((ROOT / "sample" / "kermany-mini").rglob("*.jpeg"))[:6]:
            (folder / p.name).write_bytes(p.read_bytes())
        for p in sorted(SHARED.glob("dicom/*.dcm")) + sorted(SHARED.glob("nih*/**/*.png"))[:4]:
            if p.stat().st_size < 1 << 20:
                (folder / p.name).write_bytes(p.read_bytes())
    elif target == "space":
        for p in sorted((ROOT / "search_spaces").glob("*.yaml")):
            (folder / p.name).write_bytes(p.read_bytes())
    elif target == "table":
        replicas = _replicas(work / "seed-replicas")
        for i, (key, name) in enumerate(TABLES):
            (folder / f"{i}-{name}").write_bytes(bytes([i]) + (replicas[key] / name).read_bytes())
    else:
        (folder / "config.json").write_bytes((_seed_model(work / "model") / "config.json").read_bytes())


# --- the fuzzing process -------------------------------------------------------------------------

def _mutate_dicom(data: bytes, seed: int) -> bytes | None:
    """One pixel-pipeline attribute of a DICOM set to a hostile value (None: not a DICOM pydicom parses)."""
    import pydicom

    rnd = random.Random(seed)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            return None
        tag = rnd.choice(_DICOM_TAGS)
        value = rnd.choice(_HOSTILE)
        if rnd.random() < 0.3 and tag in ds:
            del ds[tag]
        else:
            setattr(ds, tag, value)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=False)
        return out.getvalue()
    except Exception:
        return None


def run_target(target: str, libfuzzer_args: list[str], work: Path) -> None:
    import atheris

    with atheris.instrument_imports():
        import raycxr.config
        import raycxr.imaging
        import raycxr.models
        import raycxr.sources
    from raycxr.errors import ConfigError, DataError, DecodeError

    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    if target == "model":
        model_dir = _seed_model(scratch / "model")
    if target == "table":
        replicas = _replicas(scratch / "replicas")
        originals = {(key, name): (replicas[key] / name).read_bytes() for key, name in TABLES}

    count = [0]

    def one_input(data: bytes) -> None:
        _one_input(data)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # KB -> MB, monotonic
        count[0] += 1
        if count[0] % 20000 == 0:  # the process's memory over the run, in fuzz.log: a leak shows as a climb
            print(f"raycxr-fuzz: {count[0]} inputs, RSS {_vm('VmRSS')} MB, peak RSS {peak} MB, "
                  f"address space {_vm('VmSize')} MB", file=sys.stderr, flush=True)
        if peak > PEAK_RSS_MB[target]:
            raise MemoryError(f"this input took the process's peak RSS to {peak} MB (> {PEAK_RSS_MB[target]} MB)")

    def _one_input(data: bytes) -> None:
        if target == "image":
            path = scratch / "input"
            path.write_bytes(data)
            try:
                raycxr.imaging.load_for_model(path, 64, policy="pad")
            except DecodeError as exc:
                if isinstance(exc.__cause__, MemoryError):  # reported as a bad file, but it ran out of memory
                    raise exc.__cause__
        elif target == "space":
            path = scratch / "space.yaml"
            path.write_bytes(data)
            try:
                raycxr.config.load_space(path)
            except ConfigError:
                pass
        elif target == "table":
            if not data:
                return
            for (key, name), text in originals.items():  # every input sees the replicas as built
                (replicas[key] / f"{name}.gz").unlink(missing_ok=True)
                (replicas[key] / name).write_bytes(text)
            key, name = TABLES[data[0] % len(TABLES)]
            root, body = replicas[key], data[1:]
            table = root / (f"{name}.gz" if body[:2] == b"\x1f\x8b" else name)
            (root / name).unlink()
            table.write_bytes(body)
            try:
                for _ in raycxr.sources.scan_source(key, table if key == "csv" else root):
                    pass
            except DataError:
                pass
        else:
            (model_dir / "config.json").write_bytes(data)
            try:
                raycxr.models.PromotedModel.load(model_dir).load_network(model_dir)
            except ConfigError:
                pass

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        if target == "image" and seed % 2:
            mutated = _mutate_dicom(data, seed)
            if mutated is not None and len(mutated) <= max_size:
                return mutated
        return atheris.Mutate(data, max_size)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input, custom_mutator=mutator if target == "image" else None)
    atheris.Fuzz()


def _vm(field: str) -> int:
    """A /proc/self/status memory figure in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) >> 10
    return -1


def _limit(target: str):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT[target], MEMORY_LIMIT[target]))
    return apply


def fuzz(target: str, *, seconds: int | None, runs: int | None, out: Path) -> dict:
    work = out / target
    corpus, crashes = work / "corpus", work / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    if not corpus.exists():
        seeds(target, corpus, work)
    args = [str(corpus), f"-artifact_prefix={crashes}/", "-timeout=10", "-rss_limit_mb=2048", "-max_len=1048576",
            "-print_final_stats=1"]
    args += [f"-max_total_time={seconds}"] if seconds else []
    args += [f"-runs={runs}"] if runs else []
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--worker", target, "--", *args], capture_output=True, text=True,
                          preexec_fn=_limit(target), cwd=work,
                          env={**os.environ, "RAYCXR_SALT": "fuzz", "PYTHONWARNINGS": "ignore"})
    log = proc.stdout + proc.stderr
    (work / "fuzz.log").write_text(log)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    memory = re.findall(r"raycxr-fuzz: .*", log)
    found = sorted(p.name for p in crashes.iterdir())
    return {"target": target, "seconds": round(time.monotonic() - t0, 1), "executions": int(execs[-1]) if execs else 0,
            "crashes": found, "exit": proc.returncode, "memory": memory[-3:],
            "tail": log.strip().splitlines()[-6:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    p.add_argument("--seconds", type=int, help="per target (default 600, or none with --runs)")
    p.add_argument("--runs", type=int, help="stop each target after this many inputs")
    p.add_argument("--out", type=Path, help="work folder (default a new temporary one)")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return run_target(args.worker, [a for a in rest if a != "--"], Path.cwd())
    out = args.out or Path(tempfile.mkdtemp(prefix="raycxr-fuzz-"))
    seconds = args.seconds if args.seconds else (None if args.runs else 600)
    results = []
    for target in TARGETS if args.target == "all" else [args.target]:
        r = fuzz(target, seconds=seconds, runs=args.runs, out=out)
        results.append(r)
        print(f"{target}: {r['executions']} executions in {r['seconds']} s, exit {r['exit']}, "
              f"crashes: {r['crashes'] or 'none'}  ({out / target})")
        if r["crashes"] or r["exit"]:
            print("  " + "\n  ".join(r["tail"]))
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
    sys.exit(1 if any(r["crashes"] or r["exit"] for r in results) else 0)


if __name__ == "__main__":
    main()
