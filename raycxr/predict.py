"""Scoring: :func:`logits`, the one path from uint8 pixels to a model's logits, and predict().

:func:`logits` is what validation during training, promote, evaluate and predict all call;
calibration is then applied once, to the target's logit (:func:`raycxr.metrics.calibrate_logits`).

predict() classifies DICOM / PNG / JPEG files with a promoted model. It loads ``config.json``
(validated by :class:`raycxr.models.PromotedModel`) and ``model.safetensors`` (never a pickle),
reads each file with the same functions ingest used (:func:`raycxr.imaging.load_for_model`),
scores it with :func:`logits` and applies the model's calibration and validation-chosen threshold.
Each row carries the calibrated probability and the calibrated logit it is the sigmoid of: in
float64 the sigmoid rounds to exactly 1.0 past a logit of about 37 (and its steps near 1 are
1.1e-16 wide well before that), so only the logit keeps every film's rank.
Every input gets one row: a file that cannot be read, for whatever reason, gets an error row and
every other file is still predicted; a FIFO, socket or device is refused without being opened.
Warnings flag inputs unlike the training data (a lateral view, another body part, a small image,
a blank or near-constant image). ``saliency_dir`` writes a Grad-CAM overlay per image
(captum's LayerGradCam on the last convolution).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raycxr.errors import DecodeError
from raycxr.imaging import resize
from raycxr.models import ModelSpec, PromotedModel

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}


@dataclass
class Prediction:
    file: str
    probability: float | None
    label: str | None
    error: str = ""
    warning: str = ""
    saliency: str = ""
    logit: float | None = None  # calibrated, scale * z + bias: probability is its sigmoid; ranks where that saturates


def _warnings(path: Path, stored_size: int) -> str:
    """Why this input may not be like the training data ('' if nothing, or if the header cannot say)."""
    try:
        return _header_warnings(path, stored_size)
    except Exception:  # a header odd enough to break these checks: the pixels were read; say nothing
        return ""


def _pixel_warnings(image: np.ndarray) -> str:
    """Warnings about the pixels the model sees: a blank or near-blank image still gets a probability,
    which means nothing (a black frame, a RescaleSlope of 0, a window that clips everything)."""
    spread = int(image.max()) - int(image.min()) if image.size else 0
    if spread <= _NEAR_CONSTANT:
        return (f"near-constant image (darkest to brightest pixel: {spread} of 255 grey levels): nothing to "
                "classify; check the file and its DICOM rescale/window")
    return ""


# At most this many grey levels (of 255) between the darkest and brightest pixel: a blank image.
_NEAR_CONSTANT = 4


def _header_warnings(path: Path, stored_size: int) -> str:
    out = []
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return ""
    if head[128:132] == b"DICM" or path.suffix.lower() in {".dcm", ".dicom"}:
        from raycxr.imaging import read_dicom_header

        try:
            ds = read_dicom_header(path)
        except Exception:
            return ""
        from raycxr.sources import normalise_view

        if normalise_view(ds.get("ViewPosition")) == "LATERAL":
            out.append("lateral view: the model was trained on frontal films")
        part = str(ds.get("BodyPartExamined", "") or "").upper()
        if part and part not in {"CHEST", "THORAX", "LUNG"}:  # a code string (CS): at most 16 of A-Z, 0-9, _
            shown = part[:16] if part.replace("_", "").replace(" ", "").isalnum() and part.isascii() else "non-standard"
            out.append(f"body part {shown}, not chest")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    else:
        from PIL import Image

        try:
            with Image.open(path) as im:
                cols, rows = im.size
        except Exception:
            return ""
    if rows and cols and min(rows, cols) < stored_size:
        out.append(f"small image ({cols}x{rows} px) upsampled to {stored_size} px")
    return "; ".join(out)


def _last_conv(model):
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1]


def grad_cam(model, x, target: int, size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM (captum) of ``model``'s ``target`` logit for input ``x``, resized to ``size`` (the
    film's), each map scaled to a maximum of 1: (N, H, W). Of the network itself under test-time
    augmentation, not of the averaged views; of an :class:`~raycxr.transforms.Ensemble`, the mean of
    its members' maps, each taken at the member's own input size through its own preprocessing."""
    from raycxr.transforms import Ensemble, TestTimeAugment

    if isinstance(model, TestTimeAugment):
        model = model.model
    if isinstance(model, Ensemble):
        return np.mean([_scaled(_cam(lambda v, i=i: model.member_logits(v, i), model.members[i], x, target, size))
                        for i in range(len(model.members))], axis=0)
    return _scaled(_cam(model, model, x, target, size))


def _cam(forward, network, x, target: int, size) -> np.ndarray:
    import torch.nn.functional as F
    from captum.attr import LayerGradCam

    cam = LayerGradCam(forward, _last_conv(network)).attribute(x, target=target, relu_attributions=True)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False).detach().numpy()[:, 0]


def _scaled(maps: np.ndarray) -> np.ndarray:
    peak = maps.max(axis=(1, 2), keepdims=True)
    return maps / np.where(peak > 0, peak, 1)  # an all-zero map stays as it is


def _write_saliency(model, x, target: int, images: np.ndarray, names: list[str], out_dir: Path) -> list[str]:
    """Grad-CAM heat maps (:func:`grad_cam`) over the input images, as PNG overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam = grad_cam(model, x, target, images.shape[-2:])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, heat, name in zip(images, cam, names):
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.imshow(img, cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35)
        ax.set_axis_off()
        # Named by a hash of the input's full path, never its name: file names can carry patient IDs
        # (NIH's, MIMIC's, a clinic's), and two inputs with one name in two folders must not collide.
        # The output's saliency column maps each input to its overlay.
        path = out_dir / f"{hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:16]}_saliency.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))
    return paths


def _expand(paths: list[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def logits(model, spec: ModelSpec, images, *, batch_size: int = 128, device="cpu", progress: str = "") -> np.ndarray:
    """(N, K) float64 logits of uint8 images (N, 1, H, W) or (N, H, W): the one scoring path.

    ``images`` is a NumPy array or a torch tensor (training's validation batches, already on the
    device). The input is made as in training (:func:`raycxr.transforms.to_model_input` with the
    spec's equalisation, size and normalisation); calibration is not applied here. ``progress``: a tqdm bar's
    label (none if empty, or when stderr is not a terminal).
    """
    import torch

    from raycxr.progress import bar
    from raycxr.transforms import to_model_input

    if images.ndim == 3:
        images = images[:, None]
    out = []
    model.eval()
    starts = range(0, len(images), batch_size)
    with torch.no_grad():
        for i in bar(starts, desc=progress, unit="batch", leave=False, show=bool(progress)):
            part = images[i:i + batch_size]
            x = part.to(device) if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part)).to(device)
            x = to_model_input(x, image_size=spec.image_size, mean=spec.mean, std=spec.std, equalize=spec.equalize)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(spec.findings)))


def target_logits(model, spec: ModelSpec, images, **kwargs) -> np.ndarray:
    """The target finding's raw logits (N,) for uint8 images: :func:`logits`' target column."""
    return logits(model, spec, images, **kwargs)[:, spec.target_index]


def write_predictions(path: Path, *, sources, groups, y, probabilities, logits=None) -> Path:
    """One row per scored image (in shard order): source, salted group hash (the split group), label and calibrated
    probability, and with ``logits`` (calibrated, scale * z + bias) a logit column that keeps the
    ranking where the probability rounds to 1.0. Full float64 precision (repr round-trips). No file
    names: they can carry IDs."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["row", "source", "group_hash", "label", "probability"]
        w.writerow(header if logits is None else [*header, "logit"])
        zs = [None] * len(probabilities) if logits is None else logits
        for i, (src, g, label, p, z) in enumerate(zip(sources, groups, y, probabilities, zs)):
            w.writerow([i, src, g, int(label), repr(float(p))] + ([] if z is None else [repr(float(z))]))
    return path


def load_promoted(model_dir: str | Path) -> tuple:
    """(network in eval mode, :class:`PromotedModel`) of a promoted model folder, validated."""
    promoted = PromotedModel.load(model_dir)
    return promoted.load_network(model_dir), promoted


class Model:
    """A promoted model, for notebooks and services: calibrated P(target) and labels.

    >>> model = raycxr.Model.load("models/best")            # device="cuda" for a GPU
    >>> model.predict_proba(["a.dcm", "b.png"])             # array([0.93, 0.08]): calibrated P(target)
    >>> model.predict_logit(["a.dcm", "b.png"])             # array([2.6, -2.4]): its logit, to rank by
    >>> model.predict(["a.dcm", "b.png"])                   # ['pneumonia', 'not_pneumonia']

    Inputs: file or folder paths (DICOM, PNG, JPEG; read exactly as ingest and ``raycxr predict``
    read them), greyscale arrays (H, W) or a stack (N, H, W), PIL images, or a list of any of
    these. Arrays of uint8 are pixels as they are; other dtypes are scaled by their own range.
    Each image is resized to the stored size with the model's resize policy, scored with the
    network (and test-time augmentation if promote chose it), and calibrated with the Platt
    scaling promote fitted on validation. The threshold is the one promote fixed on validation.
    A file that cannot be read raises :class:`raycxr.errors.DecodeError` naming it; ``raycxr
    predict`` is the per-file, never-stopping path.
    """

    def __init__(self, network, promoted: PromotedModel, *, directory: Path, device: str = "cpu"):
        self.network, self.config, self.directory, self.device = network.to(device).eval(), promoted, directory, device

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "cpu") -> "Model":
        """Load a folder written by ``raycxr promote`` (config.json and model.safetensors; no pickle)."""
        network, promoted = load_promoted(directory)
        return cls(network, promoted, directory=Path(directory), device=device)

    @property
    def target(self) -> str:
        return self.config.spec.target

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def class_names(self) -> tuple[str, str]:
        return self.config.class_names

    def __repr__(self) -> str:
        return (f"Model({str(self.directory)!r}: {self.config.spec.architecture}, P({self.target}) >= "
                f"{self.threshold:.4f} -> {self.class_names[1]!r}, device {self.device!r})")

    def pixels(self, images_or_paths) -> np.ndarray:
        """The uint8 images (N, S, S) at the stored size S that the network is fed."""
        spec, size = self.config.spec, self.config.spec.stored_size
        arrays = [a if a.shape == (size, size) else resize(a, size, policy=spec.resize)
                  for a in _arrays(images_or_paths, spec)]
        return np.stack(arrays) if arrays else np.zeros((0, size, size), dtype=np.uint8)

    def predict_proba(self, images_or_paths, *, batch_size: int = 32) -> np.ndarray:
        """Calibrated P(target) per image, shape (N,)."""
        from raycxr.metrics import calibrate_logits

        return calibrate_logits(self._target_logits(images_or_paths, batch_size), self.config.calibration)

    def predict_logit(self, images_or_paths, *, batch_size: int = 32) -> np.ndarray:
        """Calibrated logit per image, shape (N,): scale * z + bias, whose sigmoid is
        :meth:`predict_proba`. Rank by this: the float64 sigmoid is exactly 1.0 past about 37."""
        from raycxr.metrics import calibrated_logits

        return calibrated_logits(self._target_logits(images_or_paths, batch_size), self.config.calibration)

    def _target_logits(self, images_or_paths, batch_size: int) -> np.ndarray:
        """The network's raw target logits (N,), before calibration."""
        return target_logits(self.network, self.config.spec, self.pixels(images_or_paths), batch_size=batch_size,
                             device=self.device)

    def predict(self, images_or_paths, *, batch_size: int = 32) -> list[str]:
        """The label per image at the model's threshold (``class_names[1]`` at or above it)."""
        return [self.class_names[int(p >= self.threshold)]
                for p in self.predict_proba(images_or_paths, batch_size=batch_size)]

    def export_onnx(self, path: str | Path, *, check_with=None, quantize: str = "none", calibration=None,
                    labels=None, groups=None) -> dict:
        """Write a serving ONNX graph: uint8 images (N, 1, S, S) at the stored size S in (resized
        to S x S with the model's policy, as ingest stores them), calibrated P(target) (N,) out,
        with the pixel scaling, resize to the network's input, normalisation, test-time
        augmentation and calibration inside. Checked against :meth:`predict_proba` on
        ``check_with`` (uint8 (N, S, S); default: a few synthetic films); returns
        {"path", "input", "output", "max_abs_diff"}.

        ``quantize="int8"``: the graph at ``path`` is the int8 one (:func:`raycxr.serving.quantize_int8`,
        activation ranges from ``calibration``, validation films (N, S, S) uint8), written only if it
        keeps the fp32 graph's AUC on those films (``labels`` 0/1, ``groups`` patient ids, default one
        per film): :func:`raycxr.serving.int8_rule`, else ExportError with the measured drop. The
        result gains "int8" (the rule's figures)."""
        from raycxr.errors import ExportError
        from raycxr.models import EXPORT_TOLERANCE, export_onnx
        from raycxr.transforms import ServingGraph

        spec = self.config.spec
        graph = ServingGraph(self.network, image_size=spec.image_size, mean=spec.mean, std=spec.std,
                             target_index=spec.target_index, calibration=self.config.calibration,
                             equalize=spec.equalize).cpu().eval()
        sample = np.asarray(check_with if check_with is not None else _synthetic_films(spec.stored_size), np.uint8)
        sample = sample.reshape(len(sample), *sample.shape[-2:])  # (N, S, S), also from (N, 1, S, S)
        served = export_onnx(graph, sample[:, None].copy(), path, output=f"p_{spec.target}")
        cpu = Model(self.network, self.config, directory=self.directory, device="cpu") if self.device != "cpu" else self
        diff = float(np.abs(served - cpu.predict_proba(sample)).max())
        if self.device != "cpu":
            self.network.to(self.device)
        if not diff <= EXPORT_TOLERANCE:
            raise ExportError(f"the serving ONNX graph differs from predict_proba by {diff:.2e} (> {EXPORT_TOLERANCE}): "
                              "not trustworthy; report this with the model's architecture")
        result = {"path": str(path), "input": f"uint8 (N, 1, {spec.stored_size}, {spec.stored_size})",
                  "output": f"P({spec.target}), float32 (N,)", "max_abs_diff": diff}
        if quantize == "int8":
            result["int8"] = _quantize_serving(Path(path), calibration, labels, groups)
        elif quantize != "none":
            raise ValueError(f"quantize={quantize!r}: allowed: none, int8")
        return result


def _quantize_serving(path: Path, films, labels, groups) -> dict:
    """Replace the fp32 serving graph at ``path`` by its int8 version if it keeps the AUC on ``films``."""
    from scipy.special import logit

    from raycxr.errors import ExportError
    from raycxr.serving import int8_rule, onnx_outputs, quantize_int8

    if films is None or labels is None:
        raise ValueError("quantize='int8' needs calibration= (validation films, uint8 (N, S, S)) and labels= "
                         "(their 0/1 labels): the int8 graph is kept only if it keeps the AUC on them")
    films = np.asarray(films, np.uint8)
    x = films.reshape(len(films), 1, *films.shape[-2:])
    fp32 = path.with_name(path.stem + ".fp32.onnx")
    path.replace(fp32)
    try:
        quantize_int8(fp32, path, x[:256])
        # probabilities out: compared as logits (a sigmoid keeps the ranking; the bootstrap ranks)
        z32, z8 = (logit(np.clip(onnx_outputs(f, x), 1e-7, 1 - 1e-7)) for f in (fp32, path))
        y = np.asarray(labels).astype(int)
        rule = int8_rule(y, np.arange(len(y)) if groups is None else np.asarray(groups), z32, z8)
        if not rule["accepted"]:
            path.unlink()
            raise ExportError(f"the int8 graph loses AUC on these films: int8 - fp32 {rule['difference']:+.4f}, 95% CI "
                              f"lower bound {rule['difference_ci95'][0]:+.4f} < -{rule['tolerance']}; the checked fp32 "
                              f"graph stays at {path}")
        return rule
    except BaseException:
        if not path.exists():
            fp32.replace(path)  # leave the checked fp32 graph where it was asked for
        raise
    finally:
        fp32.unlink(missing_ok=True)


def _arrays(images_or_paths, spec: ModelSpec):
    """Each input as a greyscale uint8 array (files read and resized as ingest does)."""
    from raycxr.imaging import _to_uint8, load_for_model

    items = list(images_or_paths) if isinstance(images_or_paths, (list, tuple)) else [images_or_paths]
    for item in items:
        if isinstance(item, (str, Path)):
            for f in _expand([item]):
                yield load_for_model(f, spec.stored_size, policy=spec.resize)
            continue
        if type(item).__module__.startswith("PIL."):
            item = np.asarray(item.convert("L"))
        arr = np.asarray(item)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            raise ValueError(f"an image of shape {arr.shape} looks like colour (H, W, channels): chest films are "
                             "greyscale; pass arr.mean(-1) or a PIL image (converted with .convert('L'))")
        if arr.ndim == 3 and arr.shape[0] != 1:
            for a in arr:
                yield a if a.dtype == np.uint8 else _to_uint8(a)
            continue
        arr = arr.reshape(arr.shape[-2:]) if arr.ndim == 3 else arr
        if arr.ndim != 2:
            raise ValueError(f"an image must be a greyscale array (H, W) or a stack (N, H, W), got shape {arr.shape}")
        yield arr if arr.dtype == np.uint8 else _to_uint8(arr)


def _synthetic_films(size: int, n: int = 6) -> np.ndarray:
    """A few deterministic greyscale images (sinusoidal gradients and noise) to check an export on."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = [np.clip(255 * (0.3 + 0.5 * np.sin(6 * xx + k) * np.cos(4 * yy - k) ** 2 + 0.1 * rng.standard_normal(
        (size, size))), 0, 255) for k in range(n)]
    return np.stack(out).astype(np.uint8)


def predict(model_dir: str | Path, paths: list[str | Path], *, batch_size: int = 32,
            saliency_dir: str | Path | None = None, progress: bool = True) -> list[Prediction]:
    """One :class:`Prediction` per input file (folders expanded), in order; see the module docstring."""
    import torch

    from raycxr.imaging import load_for_model
    from raycxr.metrics import calibrate_logits, calibrated_logits
    from raycxr.progress import bar
    from raycxr.transforms import to_model_input

    model = Model.load(model_dir)
    spec, promoted = model.config.spec, model.config
    results: list[Prediction] = []
    pending: list[tuple[int, np.ndarray]] = []

    def score(batch: list[tuple[int, np.ndarray]]) -> None:
        images = np.stack([a for _, a in batch])
        z = model._target_logits(images, batch_size)  # one pass of the network for both columns
        probs, cal_z = calibrate_logits(z, promoted.calibration), calibrated_logits(z, promoted.calibration)
        for (i, _), prob, logit in zip(batch, probs, cal_z):
            results[i].probability, results[i].logit = float(prob), float(logit)
            results[i].label = promoted.class_names[int(prob >= promoted.threshold)]
        if saliency_dir is not None:
            x = to_model_input(torch.from_numpy(images[:, None]), image_size=spec.image_size, mean=spec.mean,
                               std=spec.std, equalize=spec.equalize)
            maps = _write_saliency(model.network, x, spec.target_index, images, [results[i].file for i, _ in batch],
                                   Path(saliency_dir))
            for (i, _), path in zip(batch, maps):
                results[i].saliency = path

    def flush():
        try:
            if pending:
                score(pending)
        except Exception:  # one image the batch cannot take: score each alone, so only that one fails
            for item in pending:
                try:
                    score([item])
                except Exception as exc:
                    results[item[0]].probability = results[item[0]].label = results[item[0]].logit = None
                    results[item[0]].error = _error_text(exc)
        pending.clear()

    files = _expand(paths)
    for f in bar(files, desc="predict", unit="img", leave=False, show=progress):
        results.append(Prediction(file=str(f), probability=None, label=None))
        try:
            image = load_for_model(f, spec.stored_size, policy=spec.resize)
        except Exception as exc:  # whatever a hostile or broken file raises is this row's error, not the run's
            results[-1].error = _error_text(exc)
            continue
        pending.append((len(results) - 1, image))
        results[-1].warning = "; ".join(w for w in (_warnings(f, spec.stored_size), _pixel_warnings(image)) if w)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def _error_text(exc: BaseException) -> str:
    """A row's error: raycxr's own message, or the exception's type and first line."""
    if isinstance(exc, DecodeError):
        return str(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"cannot read this file ({type(exc).__name__}{': ' + first[:200] if first else ''})"
