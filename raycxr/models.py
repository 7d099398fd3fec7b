"""create_model(): allow-listed timm architectures with a 1-channel input and one logit.

A registry in timm's style: a dict and three functions. The allow-list keeps search spaces to
architectures we have checked train and export (TorchScript, ONNX) with one greyscale channel.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# name -> (what it is for, minimum input size in px)
_MODELS: dict[str, tuple[str, int]] = {
    "test_resnet": ("timm's tiny test ResNet (~0.1M params): tests and CPU demos", 16),
    "test_efficientnet": ("timm's tiny test EfficientNet: tests and CPU demos", 16),
    # 16 px: these end in global pooling, so 28 px (MedMNIST) still runs, on 1x1 final maps
    "resnet10t": ("small ResNet (4.9M params): fast on a CPU", 16),
    "mobilenetv3_small_100": ("MobileNetV3-Small (1.5M params): fast on a CPU", 16),
    "resnet18": ("ResNet-18 (11M params)", 16),
    "resnet50": ("ResNet-50 (23M params)", 16),
    "densenet121": ("DenseNet-121 (CheXNet's architecture, 7M params)", 32),
    "efficientnet_b0": ("EfficientNet-B0 (4M params)", 16),
    "vgg16_bn": ("VGG-16 with batch norm (134M params)", 32),
    "inception_v3": ("Inception-v3 (22M params); needs at least 75 px", 75),
}


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


def create_model(name: str, *, pretrained: bool = False, weights_path: str | Path | None = None,
                 drop_rate: float = 0.0, num_classes: int = 1) -> "torch.nn.Module":
    """A timm model with one input channel and ``num_classes`` logits (one per pooled finding).

    ``pretrained=True`` downloads ImageNet weights through timm (online users);
    ``weights_path`` loads them from a local file instead (offline clusters). timm adapts the
    first convolution to one channel by summing the RGB filters.
    """
    import timm

    _check(name)
    kwargs = {}
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"weights file {weights_path} does not exist: download the timm "
                                    f"weights for {name} (.safetensors or .pth) and pass that path")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_path)}
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=1,
                             drop_rate=drop_rate, **kwargs)


def input_stats(model: "torch.nn.Module") -> tuple[float, float]:
    """(mean, std) for 1-channel input: the mean over the RGB stats the weights expect."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.25, 0.25, 0.25))
    return float(sum(mean) / len(mean)), float(sum(std) / len(std))


def load_model(directory: str | Path, meta: dict) -> "torch.nn.Module":
    """Rebuild ``meta["model"]`` and load ``directory/model.safetensors`` (no pickle), in eval mode.

    When ``meta["tta"]`` is true (promote chose test-time augmentation on validation), the model
    comes wrapped in :class:`raycxr.transforms.TestTimeAugment`.
    """
    from safetensors.torch import load_file

    weights = Path(directory) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: is {directory} a raycxr checkpoint or promoted model?")
    model = create_model(meta["model"], drop_rate=meta.get("drop_rate", 0.0), num_classes=len(meta["findings"]))
    model.load_state_dict(load_file(str(weights)))
    if meta.get("tta"):
        from raycxr.transforms import TestTimeAugment

        model = TestTimeAugment(model, image_size=meta["image_size"], mean=meta["mean"], std=meta["std"])
    return model.eval()
