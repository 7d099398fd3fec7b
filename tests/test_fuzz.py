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


def test_every_fuzz_target_runs_clean_for_a_few_hundred_inputs(tmp_path):
    """Smoke: each target (image bytes, search-space YAML, promoted-model config.json) takes 300
    mutated inputs under its memory cap, raising only its documented error."""
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "fuzz.py"), "--runs", "300",
                          "--out", str(tmp_path / "work"), "--json", str(tmp_path / "fuzz.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = {r["target"]: r for r in json.loads((tmp_path / "fuzz.json").read_text())["results"]}
    assert set(results) == {"image", "space", "model"}
    assert all(r["executions"] >= 300 and not r["crashes"] for r in results.values()), results


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
