import numpy as np
import pytest
from PIL import Image

from raycxr.errors import DecodeError
from raycxr.imaging import load_for_model, read_image, resize
from tests.conftest import shared


def test_reads_bundled_jpeg(sample_dir):
    arr = read_image(next((sample_dir / "NORMAL").iterdir()))
    assert arr.dtype == np.uint8 and arr.shape == (128, 128)
    assert arr.std() > 10  # a real radiograph, not a flat image


@pytest.mark.parametrize("policy", ["pad", "squash"])
def test_resize_policies(policy):
    arr = np.full((100, 200), 200, dtype=np.uint8)
    out = resize(arr, 64, policy=policy)
    assert out.shape == (64, 64)
    if policy == "pad":  # aspect kept: black bands above and below
        assert out[0].max() == 0 and out[-1].max() == 0 and out[32].min() == 200
    else:
        assert out.min() == 200


def test_16bit_png_is_scaled_not_rejected(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "x.png")
    arr = read_image(tmp_path / "x.png")
    assert arr.min() == 0 and arr.max() == 255 and arr[0, 0] < arr[-1, -1]


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not a readable image"),
])
def test_bad_files_raise_decode_error(tmp_path, content, reason):
    f = tmp_path / "bad.jpeg"
    f.write_bytes(content)
    with pytest.raises(DecodeError, match=reason):
        read_image(f)


def test_truncated_jpeg(tmp_path, sample_dir):
    data = next((sample_dir / "NORMAL").iterdir()).read_bytes()
    (tmp_path / "t.jpeg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DecodeError):
        read_image(tmp_path / "t.jpeg")


def _lung_vs_mediastinum(arr: np.ndarray) -> tuple[float, float]:
    """Mean of the lung fields (left/right thirds, middle rows) vs the central column."""
    h, w = arr.shape
    rows = slice(int(h * 0.3), int(h * 0.6))
    lungs = np.concatenate([arr[rows, int(w * 0.2):int(w * 0.35)], arr[rows, int(w * 0.65):int(w * 0.8)]], axis=1)
    centre = arr[rows, int(w * 0.45):int(w * 0.55)]
    return float(lungs.mean()), float(centre.mean())


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "siim_cr_chest_jpeg_baseline.dcm"])
def test_real_dicoms_lungs_dark(name):
    """Genuine MONOCHROME1 (RG1, also JPEG 2000) and JPEG-baseline MONOCHROME2: lungs darker than the spine."""
    arr = read_image(shared(f"dicom/{name}"))
    lungs, centre = _lung_vs_mediastinum(arr)
    assert lungs < centre, f"{name}: lungs {lungs:.0f} should be darker than mediastinum {centre:.0f}"


def test_jpeg2000_matches_uncompressed():
    a = read_image(shared("dicom/RG1_UNCR.dcm")).astype(int)
    b = read_image(shared("dicom/RG1_J2KR.dcm")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # lossless J2K


def test_load_for_model_size(sample_dir):
    assert load_for_model(next((sample_dir / "PNEUMONIA").iterdir()), 48, policy="pad").shape == (48, 48)
