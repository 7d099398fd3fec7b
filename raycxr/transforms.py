"""Batch transforms on uint8 tensors, shared by training, evaluation, promote and predict.

Augmentation runs on whole batches on the training device (GPU when present): per-sample
random affine (rotation, scale, shift) through one ``affine_grid``/``grid_sample`` call, and
per-sample brightness/contrast; the "robust" strength (aimed at shortcut learning, issue 24) makes
that affine a random resized crop and adds per-sample gamma and random erasing. torchvision v2
transforms draw one set of parameters per call, so applied to a batch they would move every image
the same way; hence this small module. Histogram equalisation (:func:`equalize_histogram`) is
preprocessing, not augmentation: a model trained on equalised films sees them equalised wherever
it is scored (:func:`to_model_input`'s ``equalize``, from the model's ``ModelSpec``).
Also here: batch mixup; :class:`TestTimeAugment`, the averaged-views wrapper promote may choose;
:class:`Ensemble`, the mean logit of several trained models as one module; and the acquisition
shifts (:func:`acquisition_shift`) that promote's model selection scores validation under.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "light", "heavy", "robust")
# Per-image preprocessing before the resize: "hist" is histogram equalisation (PIL's algorithm).
EQUALIZATIONS = ("none", "hist")

# strength -> (max rotation in degrees, scale range, max shift as a fraction, brightness, contrast)
_AUGMENT = {
    "light": (7.0, (0.95, 1.05), 0.04, 0.10, 0.10),
    "heavy": (15.0, (0.85, 1.15), 0.08, 0.25, 0.25),
}

# "robust": against shortcut learning (a model fitting one collection's look lost ~0.05 AUC on
# another's films; a by-hand crop of 0.8-1 plus +-10 degrees beat every searched candidate, issue
# 24). The crop range here is wider, down to half the area.
_ROBUST_ROTATION = 10.0                            # degrees, +-
_ROBUST_CROP_AREA = (0.5, 1.0)                     # random resized crop: fraction of the image's area
_ROBUST_CROP_RATIO = (3 / 4, 4 / 3)                # its aspect ratio, log-uniform (torchvision's default)
_ROBUST_GAMMA = (0.7, 1.4)                         # log-uniform: another detector's tone curve
_ROBUST_BRIGHTNESS, _ROBUST_CONTRAST = 0.2, 0.2    # +-, between light's 0.10 and heavy's 0.25
# Random erasing (Zhong et al. 2020; torchvision's RandomErasing defaults for area and aspect): one
# rectangle per image with this probability, filled with that image's mean (a fill with no
# further random draws, so no full-size noise tensor per batch), hiding markers and text a model
# could otherwise key on.
_ERASE_P, _ERASE_AREA, _ERASE_RATIO = 0.5, (0.02, 0.33), (0.3, 3.3)


def _resized(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """float (N, 1, H, W) -> (N, 1, image_size, image_size), antialiased bilinear (a no-op at that size)."""
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _scaled(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> float in 0..1 at image_size (antialiased bilinear)."""
    return _resized(images.float().div_(255.0), image_size)


def equalize_histogram(images: torch.Tensor) -> torch.Tensor:
    """Per-image histogram equalisation of uint8 (..., H, W), on the images' device.

    torchvision's ``equalize``: PIL's ``ImageOps.equalize`` algorithm, vectorised over the batch
    (one 256-bin histogram per image by ``scatter_add``, a look-up table from its cumulative sum).
    """
    import torchvision.transforms.v2.functional as TF

    if images.dtype != torch.uint8:
        raise TypeError(f"equalize takes uint8 pixels, got {images.dtype}")
    return TF.equalize(images)


def _preprocessed(images: torch.Tensor, equalize: str) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> uint8, with the model's per-image preprocessing applied."""
    if equalize == "none":
        return images
    if equalize == "hist":
        return equalize_histogram(images)
    raise ValueError(f"equalize {equalize!r} is not one of {EQUALIZATIONS}")


def to_model_input(images: torch.Tensor, *, image_size: int, mean: float, std: float,
                   equalize: str = "none") -> torch.Tensor:
    """uint8 (N, 1, H, W) -> normalised float (N, 1, image_size, image_size).

    The one preprocessing path: training (before augmentation), validation, promote and
    predict all call it. ``equalize`` (one of :data:`EQUALIZATIONS`, a model's ``ModelSpec.equalize``)
    applies to the uint8 image at the size it comes in, before the resize.
    """
    return (_scaled(_preprocessed(images, equalize), image_size) - mean) / std


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, h, w), align_corners=False)``, computed by broadcasting.

    Same values (tested against torch's), about 10x faster on a CPU for a batch: torch's version
    builds an (N, h, w, 3) base grid and multiplies it batch by batch, which cost more than the
    sampling itself and capped the CPU data path (scripts/bench/data_loader.py).
    """
    xs = ((torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1).view(1, h, 1)
    t = theta[:, :, :, None, None]  # (N, 2, 3, 1, 1)
    gx = torch.addcmul(t[:, 0, 2], t[:, 0, 0], xs) + t[:, 0, 1] * ys  # (N, h, w)
    gy = torch.addcmul(t[:, 1, 2], t[:, 1, 0], xs) + t[:, 1, 1] * ys
    return torch.stack([gx, gy], dim=-1)  # contiguous (N, h, w, 2): grid_sample is 3x slower on a strided grid


def similarity_theta(degrees: torch.Tensor, scale: torch.Tensor, shift_x: torch.Tensor,
                     shift_y: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) affine matrices for ``affine_grid``: rotate by ``degrees``, zoom by ``scale`` (>1
    enlarges the content), shift by fractions of the image, per sample."""
    angle = torch.deg2rad(degrees)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift_x * 2], dim=1),
                        torch.stack([sin, cos, shift_y * 2], dim=1)], dim=1)


def augment(x: torch.Tensor, strength: str, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly augment a batch of float images in 0..1 (N, 1, H, W), each sample differently."""
    if strength == "none":
        return x
    if strength == "robust":
        return _robust(x, generator)
    if strength not in _AUGMENT:
        raise ValueError(f"augment {strength!r} is not one of {AUGMENTATIONS}")
    max_rot, (s_lo, s_hi), max_shift, bright, contrast = _AUGMENT[strength]
    n, dev = x.shape[0], x.device

    def u(lo, hi):
        return torch.rand(n, generator=generator, device="cpu").to(dev) * (hi - lo) + lo

    degrees, scale = u(-max_rot, max_rot), u(s_lo, s_hi)
    shift_x, shift_y = u(-max_shift, max_shift), u(-max_shift, max_shift)
    theta = similarity_theta(degrees, scale, shift_x, shift_y)
    x = F.grid_sample(x, affine_grid(theta, x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    c = u(1 - contrast, 1 + contrast).view(n, 1, 1, 1)
    b = u(-bright, bright).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp_(0.0, 1.0)


def _robust(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The "robust" strength: per sample, a random resized crop (area and aspect as torchvision's
    RandomResizedCrop, resized back to the full size) rotated by up to +-10 degrees, in one
    ``grid_sample`` call; then gamma, brightness/contrast and random erasing. All parameters come
    from one draw of ``generator`` (on the CPU, so a seed gives the same batch on any device)."""
    n, h, w, dev = x.shape[0], x.shape[-2], x.shape[-1], x.device
    r = torch.rand(13, n, generator=generator, device="cpu").to(dev)

    def between(u, lo, hi):
        return u * (hi - lo) + lo

    def log_between(u, lo, hi):
        return torch.exp(between(u, math.log(lo), math.log(hi)))

    # Crop sides as fractions of the image's; torchvision retries a crop that does not fit, here
    # it is clipped to the image (only at area near 1 with an extreme aspect).
    area, ratio = between(r[0], *_ROBUST_CROP_AREA), log_between(r[1], *_ROBUST_CROP_RATIO)
    cw, ch = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    cx, cy = between(r[2], -1, 1) * (1 - cw), between(r[3], -1, 1) * (1 - ch)  # centre, in grid units
    angle = torch.deg2rad(between(r[4], -_ROBUST_ROTATION, _ROBUST_ROTATION))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output grid -> input: rotate, then scale by the crop's sides (resize, then rotate the image)
    theta = torch.stack([torch.stack([cw * cos, -cw * sin, cx], dim=1),
                         torch.stack([ch * sin, ch * cos, cy], dim=1)], dim=1)
    x = F.grid_sample(x, affine_grid(theta, h, w), mode="bilinear", padding_mode="zeros", align_corners=False)
    gamma = log_between(r[5], *_ROBUST_GAMMA).view(n, 1, 1, 1)
    x = x.clamp(0.0, 1.0).pow(gamma)
    c = between(r[6], 1 - _ROBUST_CONTRAST, 1 + _ROBUST_CONTRAST).view(n, 1, 1, 1)
    b = between(r[7], -_ROBUST_BRIGHTNESS, _ROBUST_BRIGHTNESS).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean + b).clamp_(0.0, 1.0)
    erase = _erase_masks(r[8:], h, w)
    return torch.where(erase, x.mean(dim=(1, 2, 3), keepdim=True), x)


def _erase_masks(r: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Random erasing's rectangles as a bool mask (N, 1, h, w), from uniform draws ``r`` (5, N):
    whether to erase (probability ``_ERASE_P``), area, aspect, top and left."""
    apply, u_area, u_ratio, u_top, u_left = r
    area = u_area * (_ERASE_AREA[1] - _ERASE_AREA[0]) + _ERASE_AREA[0]
    ratio = torch.exp(u_ratio * (math.log(_ERASE_RATIO[1]) - math.log(_ERASE_RATIO[0])) + math.log(_ERASE_RATIO[0]))
    eh = ((area * ratio).sqrt() * h).round().clamp(1, h)
    ew = ((area / ratio).sqrt() * w).round().clamp(1, w)
    top, left = (u_top * (h - eh + 1)).floor(), (u_left * (w - ew + 1)).floor()
    rows = torch.arange(h, device=r.device, dtype=r.dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=r.device, dtype=r.dtype).view(1, 1, 1, w)

    def v(t):
        return t.view(-1, 1, 1, 1)

    inside = (rows >= v(top)) & (rows < v(top + eh)) & (cols >= v(left)) & (cols < v(left + ew))
    return inside & v(apply < _ERASE_P)


def train_input(images: torch.Tensor, *, image_size: int, mean: float, std: float, strength: str,
                equalize: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 batch -> preprocessed (as :func:`to_model_input`), augmented, resized, normalised float
    batch for a training step."""
    x = _scaled(_preprocessed(images, equalize), image_size)
    return (augment(x, strength, generator=generator) - mean) / std


def mixup(x: torch.Tensor, y: torch.Tensor, *, lam: float, generator: torch.Generator | None = None) -> tuple:
    """Mixup (Zhang et al. 2018) of a batch with weight ``lam`` (draw it from Beta(alpha, alpha)).

    Each sample is mixed with a random partner from the same batch. Labels are (N, K) with -1 for
    unknown; a mixed label is known only where both partners' labels are, so unknown findings
    stay masked out of the loss.
    """
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    known = (y >= 0) & (y[perm] >= 0)
    mixed_y = torch.where(known, lam * y + (1 - lam) * y[perm], torch.full_like(y, -1.0))
    return lam * x + (1 - lam) * x[perm], mixed_y


# Test-time augmentation views: (rotation in degrees, scale), inside the "light" training range;
# the first is the image itself.
TTA_VIEWS = ((0.0, 1.0), (-5.0, 1.0), (5.0, 1.0), (0.0, 1.05))


class TestTimeAugment(torch.nn.Module):
    """A model whose logit is the mean over fixed views of its input (``TTA_VIEWS``).

    Takes and returns what the wrapped model does (normalised (N, 1, S, S) in, logits out), so
    evaluation, predict and the TorchScript/ONNX exports use it unchanged. The views' sampling
    grids are built once for ``image_size``; padding is black, as in training's augmentation.
    """

    def __init__(self, model: torch.nn.Module, *, image_size: int, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, float(mean), float(std)
        degrees, scales = torch.tensor(TTA_VIEWS[1:], dtype=torch.float32).unbind(1)
        no_shift = torch.zeros_like(degrees)
        theta = similarity_theta(degrees, scales, no_shift, no_shift)
        self.register_buffer("grids", affine_grid(theta, image_size, image_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [self.model(x)]
        pixels = x * self.std + self.mean
        for grid in self.grids.unbind(0):  # a fixed number of views
            view = F.grid_sample(pixels, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
            logits.append(self.model((view - self.mean) / self.std))
        return torch.stack(logits).mean(0)


class Ensemble(torch.nn.Module):
    """The mean logit of several trained models, as one module (and one exported graph).

    Its input is the stored image as pixels/255, (N, 1, S, S) at the ingested size S (that is,
    ``to_model_input`` with ``image_size=S, mean=0, std=1``). Each member then equalises (if it
    was trained so: ``equalizes``, default none), resizes and normalises it exactly as it was
    trained, so members of different inputs combine; the antialiased resize exports to ONNX unchanged.

    With ``tta`` (:meth:`with_tta`), each member averages the test-time views of its own input,
    after its own preprocessing, as a single model does. (Views taken of the ensemble's input
    instead put interpolated pixels into a member's histogram equalisation, whose rounding then
    differed between the model and its ONNX export by up to 5e-4 in a logit.)
    """

    def __init__(self, members: list[torch.nn.Module], *, image_sizes: list[int], means: list[float],
                 stds: list[float], equalizes: list[str] | None = None, tta: bool = False):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.inputs = [(int(s), float(m), float(d)) for s, m, d in zip(image_sizes, means, stds)]
        self.equalizes = list(equalizes or ["none"] * len(members))
        for e in self.equalizes:
            _preprocessed(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), e)  # an unknown one fails here, not later
        # each member under test-time augmentation, sharing its weights (saved ensembles are the plain
        # one: promote writes the weights before TTA wraps them)
        self.tta = bool(tta)
        self._tta = torch.nn.ModuleList([TestTimeAugment(m, image_size=s, mean=mu, std=sd)
                                         for m, (s, mu, sd) in zip(self.members, self.inputs)] if tta else [])

    def with_tta(self) -> "Ensemble":
        """The same members (shared weights), each averaging its test-time views."""
        return Ensemble(list(self.members), image_sizes=[s for s, _, _ in self.inputs],
                        means=[m for _, m, _ in self.inputs], stds=[d for _, _, d in self.inputs],
                        equalizes=self.equalizes, tta=True).eval()

    @staticmethod
    def _view(x: torch.Tensor, equalize: str) -> torch.Tensor:
        # x is uint8/255 exactly, so *255 and rounding gives the pixels back
        return x if equalize == "none" else _preprocessed((x * 255).round().to(torch.uint8), equalize).float() / 255

    def _member(self, i: int, view: torch.Tensor, *, tta: bool | None = None) -> torch.Tensor:
        size, mean, std = self.inputs[i]
        net = self._tta[i] if (self.tta if tta is None else tta) else self.members[i]
        return net((_resized(view, size) - mean) / std)

    def member_logits(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s logits for the ensemble's input, through its own preprocessing, without
        test-time views (Grad-CAM explains an ensemble member by member, of the network itself)."""
        return self._member(i, self._view(x, self.equalizes[i]), tta=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = {e: self._view(x, e) for e in sorted(set(self.equalizes))}  # each equalisation once
        return torch.stack([self._member(i, views[e]) for i, e in enumerate(self.equalizes)]).mean(0)


class ServingGraph(torch.nn.Module):
    """The whole scoring path as one module, for a serving export: uint8 images (N, 1, S, S) at the
    stored size S -> calibrated P(target) (N,): equalise (``equalize``, the spec's), pixels/255, resize
    to the network's input size and normalise (:func:`to_model_input`), the network (with its
    test-time augmentation, if any), the target's logit, Platt calibration."""

    def __init__(self, network: torch.nn.Module, *, image_size: int, mean: float, std: float, target_index: int,
                 calibration: dict, equalize: str = "none"):
        super().__init__()
        self.network, self.image_size, self.mean, self.std = network, int(image_size), float(mean), float(std)
        self.equalize = equalize
        self.target_index, self.scale, self.bias = int(target_index), float(calibration["scale"]), float(
            calibration["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.network(to_model_input(x, image_size=self.image_size, mean=self.mean, std=self.std,
                                        equalize=self.equalize))
        return torch.sigmoid(self.scale * z[:, self.target_index].float() + self.bias)


# Acquisition shifts of validation images for model selection (raycxr.select): each a plausible
# difference between one hospital's films and another's, of a size a radiologist would still
# read without trouble. name -> what it does to a float image in 0..1 at the scored model's own
# input size S (raycxr.select.views_of resizes to it first).
ACQUISITION_SHIFTS = ("contrast_0.7", "gamma_0.7", "gamma_1.5", "blur", "noise", "crop_0.85", "lowres_0.5")


def acquisition_shift(x: torch.Tensor, name: str, *, seed: int = 0) -> torch.Tensor:
    """One of :data:`ACQUISITION_SHIFTS` applied to a float batch in 0..1 (N, 1, S, S); deterministic.

    contrast_0.7: contrast reduced to 70% (a flatter exposure); gamma_0.7 / gamma_1.5: a
    brighter / darker tone curve (another detector's look-up table); blur: Gaussian, sigma
    S/128 px (softer detector or motion); noise: Gaussian, sd 0.03 (a noisier, lower-dose
    film; seeded); crop_0.85: the central 85% enlarged to S (tighter collimation); lowres_0.5:
    down to S/2 and back (a lower-resolution source).
    """
    import torchvision.transforms.v2.functional as TF

    size = x.shape[-1]
    if name == "contrast_0.7":
        out = TF.adjust_contrast(x, 0.7)
    elif name.startswith("gamma_"):
        out = TF.adjust_gamma(x, float(name.split("_")[1]))
    elif name == "blur":
        sigma = size / 128
        out = TF.gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    elif name == "noise":
        gen = torch.Generator().manual_seed(seed)
        out = x + 0.03 * torch.randn(x.shape, generator=gen).to(x.device)
    elif name == "crop_0.85":
        out = _resized(TF.center_crop(x, [round(size * 0.85)] * 2), size)
    elif name == "lowres_0.5":
        out = _resized(_resized(x, size // 2), size)
    else:
        raise ValueError(f"unknown acquisition shift {name!r}; use one of {ACQUISITION_SHIFTS}")
    return out.clamp(0.0, 1.0)
