"""The fuzz harness (scripts/bench/fuzz.py, atheris) in a short run, and every input it ever broke
raycxr with, kept as a regression test (tests/fuzz_regressions/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raycxr.config import load_space
from raycxr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = Path(__file__).with_name("fuzz_regressions")


@pytest.mark.parametrize("case", sorted(REGRESSIONS.glob("space-*")), ids=lambda p: p.stem)
def test_a_search_space_the_fuzzer_broke_is_refused_with_a_config_error(case):
    with pytest.raises(ConfigError):
        load_space(case)


@pytest.mark.slow  # 30 s of mutated inputs: the full tier's
def test_every_fuzz_target_runs_clean_for_a_hundred_inputs(tmp_path):
    """Smoke: each target (image bytes, search-space YAML, promoted-model config.json, a CSV
    adapter's label table) takes 100 mutated inputs under its memory cap, raising only its
    documented error (the 10-minute runs per target are in BENCHMARKS.md)."""
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "fuzz.py"), "--runs", "100",
                          "--out", str(tmp_path / "work"), "--json", str(tmp_path / "fuzz.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {r["target"]: r for r in json.loads((tmp_path / "fuzz.json").read_text())["results"]}
    assert set(results) == {"image", "space", "model", "table"}
    assert all(r["executions"] >= 100 and not r["crashes"] for r in results.values()), results


def test_an_image_the_fuzzer_broke_decodes_or_is_refused_within_two_gigabytes(tmp_path):
    """Under a 2 GB address-space cap (a subprocess): each image input the fuzzer once broke raycxr
    with is read or refused with DecodeError, and never by running out of memory (a 7 KB DICOM
    whose element declared 4 GB used to make pydicom allocate 4 GB)."""
    cases = sorted(REGRESSIONS.glob("image-*"))
    assert cases
    script = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from raycxr.errors import DecodeError
from raycxr.imaging import load_for_model
for path in sys.argv[1:]:
    try:
        load_for_model(path, 64, policy="pad")
        print("read", path)
    except DecodeError as exc:
        print("memory" if isinstance(exc.__cause__, MemoryError) else "refused", path, str(exc).replace(" ", "_"))
"""
    out = subprocess.run([sys.executable, "-c", script, *map(str, cases)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    outcomes = [line.split()[0] for line in out.stdout.splitlines()]
    assert len(outcomes) == len(cases) and "memory" not in outcomes, out.stdout
    # a JPEG frame of height 0 (defined later by a DNL marker): pylibjpeg's libjpeg allocated until it
    # ran out of memory; it is refused before decoding, by the frame's own size
    assert "declares_1024x0_px" in next(line for line in out.stdout.splitlines() if "height-0" in line)


def test_a_jpeg2000_frame_whose_size_is_not_the_headers_is_refused_before_decoding(tmp_path):
    import numpy as np
    from pydicom.uid import JPEG2000Lossless

    from raycxr.errors import DecodeError
    from raycxr.imaging import load_for_model
    from tests.builders import dicom_from_array

    arr = (np.arange(96 * 80).reshape(96, 80) % 4096).astype(np.uint16)
    path = dicom_from_array(tmp_path / "j2k.dcm", arr, phi=False, bits_stored=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.compress(JPEG2000Lossless, arr)
    ds.save_as(path)
    assert load_for_model(path, 64, policy="pad").shape == (64, 64)  # as written: read
    data = bytearray(path.read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51")
    data[siz + 8:siz + 12] = (60000).to_bytes(4, "big")  # Xsiz: 60,000 px wide
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="declares 60000x96 px but the header says 80x96"):
        load_for_model(path, 64, policy="pad")


def test_predict_and_the_rsna_adapter_read_dicom_headers_through_the_bounded_reader():
    """Issue 27: predict's header check and the RSNA adapter's view lookup read a DICOM's header
    themselves; the 7 KB file whose element declares 4 GB made each of them allocate 4 GB (their
    dcmread bypassed the bounded reader). Measured with tracemalloc in a fresh process."""
    case = REGRESSIONS / "image-dicom-element-declares-4gb.bin"
    script = """
import sys, tracemalloc
from pathlib import Path
from raycxr.predict import _header_warnings
from raycxr.sources.rsna import _view
tracemalloc.start()
_header_warnings(Path(sys.argv[1]), 64)
_view(Path(sys.argv[1]))
print(tracemalloc.get_traced_memory()[1])
"""
    out = subprocess.run([sys.executable, "-c", script, str(case)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 64 * 2**20, out.stdout  # megabytes, not the declared 4 GB


def test_a_label_table_the_fuzzer_broke_is_read_or_refused_with_a_data_error(tmp_path):
    """The table target's finds (issue 27): each input is replayed as the fuzzer ran it (first byte:
    which adapter's table, the rest: the table) over a replica of that dataset. The first: an RSNA
    patientId of 300 bytes made os.stat raise 'File name too long' and ended the whole ingest."""
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    import fuzz

    from raycxr.errors import DataError
    from raycxr.sources import scan_source

    cases = sorted(REGRESSIONS.glob("table-*"))
    assert cases
    replicas = fuzz._replicas(tmp_path / "replicas")
    originals = {(key, name): (replicas[key] / name).read_bytes() for key, name in fuzz.TABLES}
    for case in cases:
        data = case.read_bytes()
        for (key, name), text in originals.items():
            (replicas[key] / name).write_bytes(text)
        key, name = fuzz.TABLES[data[0] % len(fuzz.TABLES)]
        (replicas[key] / name).write_bytes(data[1:])
        try:
            records = list(scan_source(key, replicas[key] / name if key == "csv" else replicas[key]))
        except DataError:
            continue
        assert records and all(r.error or r.path.is_file() for r in records), case.name


def test_an_id_cell_cannot_point_an_adapter_outside_its_dataset(tmp_path):
    """An RSNA patientId or a MIMIC dicom_id is joined into a path: one holding '..' or a separator
    would read a file from anywhere on the machine into the shards; such rows are quarantined."""
    from tests import builders

    from raycxr.sources import scan_source

    built = builders.build_all(tmp_path / "b")
    rsna = built["rsna"]
    table = rsna / "stage_2_train_labels.csv"
    table.write_text(table.read_text() + "../../../../etc/passwd,,,,,1\n")
    records = list(scan_source("rsna", rsna))
    bad = [r for r in records if r.error.startswith("unusable row: patientId is not a plain name")]
    assert len(bad) == 1 and bad[0].path == table  # quarantined as its table's row
    assert all(r.path.resolve().is_relative_to(rsna.resolve()) for r in records)
