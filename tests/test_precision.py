"""raycxr.precision: what ``precision: auto|fp32|bf16`` trains in, and bf16 training on real films.

Trials reporting the precision they trained in under a real search: test_search_warm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycxr.models import create_model
from raycxr.precision import has_depthwise, native_cpu_bf16, resolve
from raycxr.train import TrialConfig, build_trial, train_one_epoch
from tests.test_train import _batches, _tune_config

CPU = torch.device("cpu")


def test_auto_trains_bf16_where_the_cpu_has_it_except_depthwise_networks():
    resnet, effnet = create_model("test_resnet", num_classes=1), create_model("test_efficientnet", num_classes=1)
    assert not has_depthwise(resnet) and has_depthwise(effnet)
    auto = resolve("auto", device=CPU, model=resnet)
    assert auto.name == ("bf16" if native_cpu_bf16() else "fp32") and auto.channels_last
    # depthwise convolutions: fp32 + channels_last under auto (bf16 does not speed them up on CPU)
    assert (resolve("auto", device=CPU, model=effnet).name, resolve("auto", device=CPU, model=effnet).channels_last) \
        == ("fp32", True)
    assert resolve("fp32", device=CPU, model=resnet).dtype is None
    forced = resolve("bf16", device=CPU, model=effnet)
    assert forced.dtype == torch.bfloat16 and not forced.channels_last
    with pytest.raises(ValueError, match="allowed: auto, fp32, bf16"):
        resolve("fp16", device=CPU, model=resnet)


def test_a_bf16_trial_learns_keeps_fp32_weights_and_scores_as_fp32_does(dataset):
    """Two bf16 epochs on the bundled films lower the loss; the weights (what checkpoints hold) stay
    fp32 and channels_last; the trained network's AUC on the bundled films is the same scored in bf16
    as in fp32 (the precision validation and serving use) within 0.002: all 300 films, as a check of
    the arithmetic, not of the model (on the ~90 films of validation and holdout one tied or swapped
    pair moves the AUC by 0.0005, and bf16's 8-bit mantissa rounds the logits into ties).
    """
    from sklearn.metrics import roc_auc_score

    from raycxr.data import split_arrays
    from raycxr.predict import target_logits

    cfg = TrialConfig.from_tune(_tune_config(precision="bf16", image_size=64))
    t = build_trial(cfg, rank=0, world=1, device=CPU)
    assert t.amp_dtype == torch.bfloat16 and t.precision.channels_last
    train = _batches(dataset, "train")
    losses = [train_one_epoch(t, train)["train_loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses
    params = list(t.evaluated.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in params)

    parts = [split_arrays(dataset, split, "pneumonia") for split in ("train", "val", "holdout")]
    images, y = np.concatenate([p.images for p in parts]), np.concatenate([p.y for p in parts])
    assert min(y.sum(), (1 - y).sum()) >= 100, "too few films of one class to compare AUCs"
    z32 = target_logits(t.evaluated, t.spec, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = target_logits(t.evaluated, t.spec, images)
    auc32, auc16 = roc_auc_score(y, z32), roc_auc_score(y, z16)
    assert 0.5 < auc32 and abs(auc16 - auc32) <= 0.002, (auc32, auc16)
    assert not np.array_equal(z16, z32)  # bf16 did score differently, just not enough to matter
