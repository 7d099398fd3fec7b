"""Decode any supported file (DICOM, PNG, JPEG) to one greyscale uint8 array, and resize it.

This module is the single place where pixels enter raycxr: ``ingest`` uses it to build shards
and ``predict`` uses the very same functions, so a promoted model sees exactly the
preprocessing it was trained with.

DICOM follows the standard's pixel pipeline with pydicom's own functions: modality LUT
(rescale slope/intercept), then VOI LUT or window, then MONOCHROME1 inversion so that air is
always dark. Compressed transfer syntaxes decode through pydicom's pixel handlers
(pylibjpeg / OpenJPEG). Colour and multi-frame images are rejected with a reason.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from raycxr.errors import DecodeError

log = logging.getLogger(__name__)

RESIZE_POLICIES = ("pad", "squash")
# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that. Chest films are at most
# ~4300x3500 px (14x17 in at 0.1 mm); 64 MPx leaves room and still stops decompression bombs.
MAX_PIXELS = 64_000_000
_DICOM_MAGIC_OFFSET = 128


def _is_dicom(path: Path, head: bytes) -> bool:
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    # No preamble (older writers): the data set starts with a group 0x0002 or 0x0008 tag.
    return path.suffix.lower() in {".dcm", ".dicom"} or head[:2] in (b"\x02\x00", b"\x08\x00")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any numeric greyscale array to 0..255 by its own range (after LUTs).

    In float32, in place: a 4000x4000 film stays at 64 MB of temporaries instead of float64's 128 MB
    per copy (decoding near the pixel cap peaked at 1.66 GB per worker with float64).
    """
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(np.shape(arr), dtype=np.uint8)
    out = np.asarray(arr, dtype=np.float32).copy() if np.asarray(arr).dtype != np.float32 else np.array(arr)
    out -= lo
    out *= 255.0 / (hi - lo)
    np.rint(out, out=out)
    return out.astype(np.uint8)


def blank_reason(arr: np.ndarray) -> str:
    """Why an image carries no picture ("" if it does): every pixel (nearly) the same value."""
    lo, hi = int(arr.min()), int(arr.max())
    return f"blank image: every pixel is within {hi - lo} grey level(s) of {lo}" if hi - lo < 4 else ""


def _infer_transfer_syntax(ds) -> None:
    """Give a data set read without its file meta group the transfer syntax its bytes were parsed
    with (what dcmtk and pydicom's ``force=True`` users do): implicit or explicit VR, little or big
    endian. Only uncompressed pixel data can be stored that way."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


class _BoundedReader:
    """A binary file whose ``read(n)`` never asks for more than the file still holds.

    pydicom reads each element with ``read(declared length)``, and Python's buffered ``read(n)``
    allocates ``n`` bytes up front: a 7 KB DICOM whose element declared 4 GB made one 4 GB
    allocation (found by scripts/bench/fuzz.py). Everything else is the file's own.
    """

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._size - self._f.tell())
        return self._f.read(left if n is None or n < 0 or n > left else n)

    def __getattr__(self, name):
        return getattr(self._f, name)


def read_dicom_header(path: str | Path):
    """A DICOM's attributes without its pixels, through the bounded reader (an element that
    declares more bytes than the file holds costs nothing); pydicom's warnings, which quote the
    file's values, are kept out of the logs. Raises what pydicom raises for a broken file."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as f:
            return pydicom.dcmread(_BoundedReader(f, os.fstat(f.fileno()).st_size), stop_before_pixels=True,
                                   force=True)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    with warnings.catch_warnings(record=True) as caught:  # pydicom's warnings name files and quote values
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as f:
                ds = pydicom.dcmread(_BoundedReader(f, os.fstat(f.fileno()).st_size), force=True)
        except Exception as exc:  # pydicom raises many types for broken files
            raise DecodeError(f"not a readable DICOM file ({type(exc).__name__})") from exc
        try:
            _infer_transfer_syntax(ds)
            out = _dicom_pixels(ds)
        except DecodeError:
            raise
        except Exception as exc:  # a malformed LUT, window or count: this file, not the run, fails
            raise DecodeError(f"DICOM pixel pipeline failed ({type(exc).__name__}): a malformed attribute "
                              "(LUT, window, frame count or bit depth)") from exc
    if caught:
        log.debug("pydicom warned %d time(s) while reading a DICOM (%s)", len(caught),
                  ", ".join(sorted({w.category.__name__ for w in caught})))
    return out


# DICOM's colour interpretations (PS3.3 C.7.6.3.1.2): named in a reason; any other value is the
# file's own text and is not quoted
_COLOUR_PHOTOMETRIC = {"RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
                       "ARGB", "CMYK", "HSV", "YBR_PARTIAL_422"}


def _dicom_pixels(ds) -> np.ndarray:
    if "PixelData" not in ds:
        raise DecodeError("DICOM has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        named = photometric if photometric in _COLOUR_PHOTOMETRIC else "non-standard" if photometric else "missing"
        raise DecodeError(f"unsupported PhotometricInterpretation {named}: "
                          "only greyscale (MONOCHROME1/2) radiographs are supported")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DecodeError("multi-frame DICOM: a chest radiograph is one frame")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise DecodeError(f"image too large ({cols}x{rows} px > {MAX_PIXELS} px): possible decompression bomb")
    from pydicom.uid import JPEGBaseline8Bit

    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    _check_compressed_frame(ds, syntax, rows, cols)
    if syntax == JPEGBaseline8Bit:
        # Pillow (libjpeg-turbo), not pylibjpeg's libjpeg: that one leaks about 0.3 MB per corrupt
        # JPEG frame it decodes (measured: 54 -> 143 MB over 300 such files; Pillow stays at 54 MB),
        # which a long predict or a fuzzer turns into an out-of-memory. Pillow reads 8-bit baseline only.
        ds.pixel_array_options(decoding_plugin="pillow")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise DecodeError(f"DICOM pixel data could not be decoded (transfer syntax "
                          f"{syntax or '?'}, {type(exc).__name__})") from exc
    del ds.PixelData  # the encoded bytes (as large as the array when uncompressed) are no longer needed
    out = _luts_to_uint8(arr, ds)
    if photometric == "MONOCHROME1":  # MONOCHROME1: high values are dark; invert so air is black.
        np.subtract(255, out, out=out)
    return out


def _check_compressed_frame(ds, syntax: str | None, rows: int, cols: int) -> None:
    """Refuse a compressed frame whose own header declares another size than Rows x Columns.

    JPEG and JPEG 2000 decoders allocate what the codestream declares (up to 65535 x 65535 px
    for JPEG), not what the DICOM header says: a 1.3 KB file whose JPEG stream declared a huge
    frame made pylibjpeg allocate gigabytes (found by fuzzing). pydicom would refuse the
    mismatch only after decoding, so the codestream's size is read first, from its SOF (JPEG,
    JPEG-LS) or SIZ (JPEG 2000) segment.
    """
    from pydicom.encaps import get_frame
    from pydicom.pixels.utils import _get_jpg_parameters  # pydicom's own SOF parser (used by its decoders)
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    jpeg = syntax in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes)
    if not (jpeg or syntax in JPEG2000TransferSyntaxes):
        return
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    if jpeg:
        info = _get_jpg_parameters(frame)
        size = (info["height"], info["width"]) if "height" in info else None
    else:
        size = _j2k_size(frame)
    if size is None:
        raise DecodeError("DICOM pixel data: the compressed frame has no readable size header (SOF/SIZ)")
    if size != (rows, cols):
        raise DecodeError(f"DICOM pixel data: the compressed frame declares {size[1]}x{size[0]} px but the header "
                          f"says {cols}x{rows}: not decoded")


def _j2k_size(frame: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG 2000 codestream's SIZ segment (ISO/IEC 15444-1 A.5.1), or None.
    A JP2 file's boxes are skipped to its codestream, as pydicom's get_j2k_parameters does."""
    import struct

    offset = 0
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):
        offset = 12
        while offset + 8 <= len(frame) and frame[offset + 4:offset + 8] != b"jp2c":
            length = int.from_bytes(frame[offset:offset + 4], "big")
            if length < 8:
                return None
            offset += length
        offset += 8
    siz = frame[offset:offset + 26]
    if len(siz) < 26 or siz[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", siz[8:24])
    return (ysiz - yosiz, xsiz - xosiz) if xsiz > xosiz and ysiz > yosiz else None


_STRIP_PIXELS = 1 << 17  # pydicom's LUT functions work in float64: 1 MB per temporary per strip


def _luts_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """pydicom's modality LUT then VOI LUT/window, scaled to 0..255 by the result's own range.

    The LUTs are elementwise, so they run on strips of rows, twice (once for the range, once to
    write uint8): a worker's peak stays near the stored array plus the uint8 result instead of
    whole-image float64 copies (a windowed 4000x4000 12-bit film peaked at 34x its uint8 size).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    def strips():
        rows = max(1, _STRIP_PIXELS // max(1, arr.shape[1]))
        for start in range(0, arr.shape[0], rows):
            part = apply_modality_lut(arr[start:start + rows], ds)
            yield start, apply_voi_lut(part, ds, prefer_lut=True)

    lo, hi = np.inf, -np.inf
    for _, values in strips():
        lo, hi = min(lo, float(np.min(values))), max(hi, float(np.max(values)))
    out = np.zeros(arr.shape, dtype=np.uint8)
    if not hi > lo:  # constant (or empty): blank_reason quarantines it
        return out
    scale = 255.0 / (hi - lo)
    for start, values in strips():
        part = np.asarray(values, dtype=np.float32)
        part -= lo
        part *= scale
        np.rint(part, out=part)
        out[start:start + len(part)] = part
    return out


# The only formats Pillow may open: what the datasets ship (Pillow's JPEG plugin also opens the MPO
# variant some cameras write). Not EPS (Ghostscript), GIF, TIFF, WebP or the dozens of others
# Pillow knows, whatever the file's name says.
PILLOW_FORMATS = ("PNG", "JPEG")


def _read_pillow(path: Path, draft_size: int | None, data: bytes | None = None) -> tuple[np.ndarray, tuple]:
    import io

    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path, formats=PILLOW_FORMATS) as im:
                original = (im.size[1], im.size[0])  # before draft() shrinks it
                if draft_size and im.format == "JPEG":
                    # Decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) that still covers the
                    # target size: 3-8x less decode work for original-resolution films.
                    im.draft("L", (draft_size, draft_size))
                im.load()
                if im.mode in {"I;16", "I;16B", "I;16L", "I"}:
                    return _to_uint8(np.asarray(im)), original
                return np.asarray(im.convert("L")), original
    except UnidentifiedImageError as exc:
        raise DecodeError("not a PNG, JPEG or DICOM file (its bytes say otherwise, whatever its name)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image too large: possible decompression bomb ({type(exc).__name__})") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        # the type, never the text: a decoder's message may quote a path or the file's own bytes
        raise DecodeError(f"not a readable image ({type(exc).__name__})") from exc


JSRT_SIZE = 2048  # JSRT films: 2048 x 2048 px, 12 bits in big-endian 16-bit words, no header


def _read_jsrt(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=">u2")
    if raw.size != JSRT_SIZE * JSRT_SIZE:
        raise DecodeError(f"not a JSRT raw film: {raw.size * 2} bytes, expected {JSRT_SIZE * JSRT_SIZE * 2} "
                          f"(headerless {JSRT_SIZE}x{JSRT_SIZE}, 16-bit big-endian)")
    # JSRT values grow with film darkness (0 is white bone, 4095 black air): the opposite of
    # MONOCHROME2, so invert as for MONOCHROME1 (the usual JSRT loaders compute 1 - x/4096).
    arr = (raw & 0x0FFF).reshape(JSRT_SIZE, JSRT_SIZE)
    return 255 - _to_uint8(arr)


# The most one member of an .npz archive may hold (MedMNIST+'s largest, 224 px train images, is
# about 0.3 GB): checked from the member's .npy header before anything is inflated.
MAX_NPZ_MEMBER_BYTES = 4 * 2**30


def npz_member(path: str | Path, key: str, *, max_bytes: int = MAX_NPZ_MEMBER_BYTES) -> np.ndarray:
    """One array of an ``.npz`` archive, loaded alone (not every member) after its ``.npy`` header
    says it fits: a hostile archive that declares a huge array, or holds a zip bomb in another
    member, is a DecodeError, never an allocation. Object arrays (pickles) are refused."""
    import zipfile

    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = npy.read_magic(f)
            shape, _, dtype = (npy.read_array_header_1_0(f) if version == (1, 0) else npy.read_array_header_2_0(f))
    except KeyError:
        raise DecodeError(f"npz archive has no array {key}") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DecodeError(f"not a readable npz archive ({type(exc).__name__})") from exc
    if dtype.hasobject:
        raise DecodeError("npz archive holds an object array (a pickle): not read")
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if nbytes > max_bytes:
        raise DecodeError(f"npz array too large ({nbytes / 2**30:.1f} GiB declared, over {max_bytes / 2**30:g} GiB): "
                          "not read")
    with np.load(path, allow_pickle=False) as npz:
        return npz[key]


@functools.lru_cache(maxsize=2)
def _npz(path: str, key: str) -> np.ndarray:
    return npz_member(path, key)


def _read_npz(path: Path, fmt: str) -> np.ndarray:
    _, key, index = fmt.split(":")
    arr = _npz(str(path), key)[int(index)]
    return arr if arr.ndim == 2 else arr[..., 0]


def read_image(path: str | Path, *, draft_size: int | None = None, fmt: str = "",
               data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` to a 2-D uint8 greyscale array in which air is dark.

    ``draft_size`` lets JPEG decoding skip detail finer than a ``draft_size`` square needs.
    ``fmt="jsrt"`` reads a headerless JSRT film; ``fmt="npz:KEY:INDEX"`` one image of a MedMNIST
    ``.npz`` archive. ``data``: the file's bytes, if already read.

    Raises :class:`DecodeError` with a one-line reason for anything it cannot read.
    """
    return decode(path, draft_size=draft_size, fmt=fmt, data=data)[0]


def not_regular(path: str | Path) -> str:
    """Why ``path`` is not read ('' for a regular file): a FIFO, socket or device would block or
    stream for ever when opened, so they are refused from their metadata alone."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot stat the file: {exc.strerror or type(exc).__name__}"
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        return f"{kind}, not a regular file: not read"
    return ""


def decode(path: str | Path, *, draft_size: int | None = None, fmt: str = "",
           data: bytes | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_image`, and the file's true (height, width) (a JPEG drafted smaller keeps its own)."""
    path = Path(path)
    if fmt.startswith("npz:"):
        arr = _read_npz(path, fmt)
        return arr, arr.shape
    if data is not None:
        head = data[:_DICOM_MAGIC_OFFSET + 4]
    else:
        if why := not_regular(path):
            raise DecodeError(why)
        try:
            with open(path, "rb") as f:
                head = f.read(_DICOM_MAGIC_OFFSET + 4)
        except OSError as exc:
            raise DecodeError(f"cannot open file: {exc.strerror}") from exc
    if not head:
        raise DecodeError("empty file (0 bytes)")
    if fmt == "jsrt":
        arr = _read_jsrt(path)
        original = arr.shape
    elif _is_dicom(path, head):
        arr = _read_dicom(path)
        original = arr.shape
    else:
        arr, original = _read_pillow(path, draft_size, data)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise DecodeError(f"unexpected image shape {arr.shape}")
    return arr, tuple(int(v) for v in original)


def resize(arr: np.ndarray, size: int, *, policy: str = "pad") -> np.ndarray:
    """Resize a greyscale uint8 array to ``size`` x ``size``.

    ``pad`` keeps the aspect ratio and pads the short side with black (air); ``squash``
    stretches to a square. Antialiased (Pillow's bilinear with a reducing filter).
    """
    from PIL import Image

    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy {policy!r} is not one of {RESIZE_POLICIES}")
    im = Image.fromarray(arr)
    if policy == "squash":
        return np.array(im.resize((size, size), Image.BILINEAR, reducing_gap=3.0))
    h, w = arr.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(small, ((size - nw) // 2, (size - nh) // 2))
    return np.array(canvas)


def load_for_model(path: str | Path, size: int, *, policy: str, fmt: str = "") -> np.ndarray:
    """Read and resize one file exactly as ingest does: what predict feeds a model."""
    return resize(read_image(path, draft_size=size, fmt=fmt), size, policy=policy)
