import pytest
import torch

from raycxr.transforms import AUGMENTATIONS, augment, equalize_histogram, to_model_input, train_input
from tests.conftest import SAMPLE


def _films(size: int, n: int = 8) -> torch.Tensor:
    """n real films of the bundled sample (both classes), uint8 (n, 1, size, size) as ingest stores them."""
    from raycxr.imaging import load_for_model

    files = sorted((SAMPLE / "NORMAL").iterdir())[:n // 2] + sorted((SAMPLE / "PNEUMONIA").iterdir())[:n - n // 2]
    return torch.stack([torch.from_numpy(load_for_model(f, size, policy="pad")) for f in files])[:, None]


def test_model_input_resizes_and_normalises():
    x = torch.full((2, 1, 64, 64), 255, dtype=torch.uint8)
    out = to_model_input(x, image_size=32, mean=0.5, std=0.25)
    assert out.shape == (2, 1, 32, 32) and torch.allclose(out, torch.full_like(out, 2.0))


def test_augment_differs_per_sample_and_none_is_identity(sample_dir):
    from raycxr.imaging import load_for_model

    img = torch.from_numpy(load_for_model(next((sample_dir / "NORMAL").iterdir()), 64, policy="pad"))
    batch = img.expand(4, 1, 64, 64).float() / 255
    assert torch.equal(augment(batch, "none"), batch)
    out = augment(batch, "heavy", generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1])  # each image moved differently
    assert (out - batch).abs().mean() > 0.01


def test_train_input_is_seeded():
    x = torch.randint(0, 255, (3, 1, 40, 40), dtype=torch.uint8)
    a = train_input(x, image_size=32, mean=0.5, std=0.25, strength="light", generator=torch.Generator().manual_seed(1))
    b = train_input(x, image_size=32, mean=0.5, std=0.25, strength="light", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 1, 32, 32)


@pytest.mark.parametrize("shape", [(5, 64, 64), (3, 48, 80)])
def test_affine_grid_matches_torch(shape):
    import torch.nn.functional as F

    from raycxr.transforms import affine_grid

    n, h, w = shape
    theta = torch.randn(n, 2, 3, generator=torch.Generator().manual_seed(1))
    expect = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    assert affine_grid(theta, h, w).shape == expect.shape
    assert torch.allclose(affine_grid(theta, h, w), expect, atol=1e-5)


def test_mixup_mixes_pairs_and_keeps_unknown_labels_masked():
    from raycxr.transforms import mixup

    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    y = torch.tensor([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    mx, my = mixup(x, y, lam=0.7, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(4))  # a real pairing, so the check below means something
    for i, j in enumerate(perm.tolist()):
        assert torch.allclose(mx[i], 0.7 * x[i] + 0.3 * x[j])
        for k in range(2):
            if y[i, k] < 0 or y[j, k] < 0:
                assert my[i, k] == -1  # unknown in either partner: still masked
            else:
                assert my[i, k] == pytest.approx(0.7 * y[i, k].item() + 0.3 * y[j, k].item())
    assert torch.equal(mixup(x, y, lam=1.0)[0], x)


def test_test_time_augment_is_the_mean_logit_over_its_views():
    import torch.nn.functional as F

    from raycxr.transforms import TTA_VIEWS, TestTimeAugment

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x01 = torch.rand(3, 1, 32, 32)
    x01[..., :, :4] = 1.0  # a bright edge, so rotations and zooms change what the net sees
    mean, std = 0.4, 0.2
    with torch.no_grad():
        net((x01 - mean) / std)
        expect = []
        for deg, scale in TTA_VIEWS:  # each view built independently, with torch's own affine_grid
            a = torch.deg2rad(torch.tensor(deg))
            theta = torch.tensor([[torch.cos(a) / scale, -torch.sin(a) / scale, 0.0],
                                  [torch.sin(a) / scale, torch.cos(a) / scale, 0.0]]).expand(3, 2, 3)
            view = F.grid_sample(x01, F.affine_grid(theta, [3, 1, 32, 32], align_corners=False),
                                 align_corners=False)  # zero padding = black, as in training
            expect.append(net((view - mean) / std))
        got = TestTimeAugment(net, image_size=32, mean=mean, std=std)((x01 - mean) / std)
    assert got.shape == (3, 2)
    assert torch.allclose(got, torch.stack(expect).mean(0), atol=1e-5)
    assert not torch.allclose(got, expect[0], atol=1e-3)  # the views changed the answer
    assert list(TestTimeAugment(net, image_size=32, mean=mean, std=std).state_dict()) == \
        ["model." + k for k in net.state_dict()]  # the grids are not saved with the weights


@pytest.mark.parametrize("strength", [s for s in AUGMENTATIONS if s != "none"])
def test_every_strength_is_per_sample_seeded_and_in_range_on_real_films(strength):
    batch = _films(64)[:1].expand(6, 1, 64, 64).float() / 255  # one film six times: differences are the augmentation

    def run(seed):
        return augment(batch, strength, generator=torch.Generator().manual_seed(seed))

    out = run(0)
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 6))  # each image changed differently
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))


def _expected_erased_fraction(h: int, w: int) -> float:
    """E[erased share of an image] under random erasing's documented law, integrated on a fine grid
    (independently of the module's sampling code): p * E[rectangle area], rectangle sides rounded
    to pixels and clipped to the image."""
    import numpy as np

    from raycxr.transforms import _ERASE_AREA, _ERASE_P, _ERASE_RATIO

    area = np.linspace(*_ERASE_AREA, 801)[:, None]
    ratio = np.exp(np.linspace(np.log(_ERASE_RATIO[0]), np.log(_ERASE_RATIO[1]), 801))[None, :]
    eh = np.clip(np.round(np.sqrt(area * ratio) * h), 1, h)
    ew = np.clip(np.round(np.sqrt(area / ratio) * w), 1, w)
    return _ERASE_P * float(np.mean(eh * ew)) / (h * w)


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80), (128, 128)])
def test_random_erasing_covers_the_expected_share_of_the_image(h, w):
    from raycxr.transforms import _ERASE_P, _erase_masks

    n = 4000
    masks = _erase_masks(torch.rand(5, n, generator=torch.Generator().manual_seed(0)), h, w)
    assert masks.shape == (n, 1, h, w)
    erased = masks.flatten(1).any(1).float().mean().item()
    assert erased == pytest.approx(_ERASE_P, abs=0.03)  # one rectangle in about this share of images
    assert masks.float().mean().item() == pytest.approx(_expected_erased_fraction(h, w), rel=0.05)
    rows, cols = masks.any(-1).flatten(1).sum(1), masks.any(-2).flatten(1).sum(1)
    assert torch.equal(masks.flatten(1).sum(1), rows * cols)  # each mask is one axis-aligned rectangle


def test_robust_fills_the_erased_rectangle_with_the_image_mean():
    from raycxr.transforms import _erase_masks

    batch = _films(64).float() / 255
    out = augment(batch, "robust", generator=torch.Generator().manual_seed(2))
    draws = torch.rand(13, len(batch), generator=torch.Generator().manual_seed(2))  # _robust's one draw
    masks = _erase_masks(draws[8:], 64, 64)
    assert masks.flatten(1).any(1).sum() >= 2  # the check below has rectangles to look at
    for img, mask in zip(out, masks):
        if mask.any():
            assert (img[mask] == img[mask][0]).all()  # one flat fill, not image content
            assert 0.05 < img[mask][0] < 0.95


@pytest.mark.parametrize("size", [64, 128])
def test_equalize_matches_pil_on_real_films(size):
    import numpy as np
    from PIL import Image, ImageOps

    films = _films(size)
    got = equalize_histogram(films)  # the whole batch in one call: per-image histograms
    for film, eq in zip(films, got):
        expect = np.asarray(ImageOps.equalize(Image.fromarray(film[0].numpy())))
        assert np.abs(eq[0].numpy().astype(int) - expect.astype(int)).max() <= 1
    assert not torch.equal(got, films)


@pytest.mark.parametrize("case", ["constant", "two levels", "blank with one bright pixel"])
def test_equalize_matches_pil_on_degenerate_images(case):
    """Cases no real film has, where PIL leaves the image as it is or nearly so."""
    import numpy as np
    from PIL import Image, ImageOps

    img = np.full((32, 32), 90, np.uint8)
    if case == "two levels":
        img[:, :16] = 200
    elif case == "blank with one bright pixel":
        img[3, 5] = 255
    got = equalize_histogram(torch.from_numpy(img)[None, None])[0, 0].numpy()
    assert np.array_equal(got, np.asarray(ImageOps.equalize(Image.fromarray(img))))


def test_equalize_refuses_floats_and_unknown_names():
    with pytest.raises(TypeError, match="uint8"):
        equalize_histogram(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="'clahe' is not one of"):
        to_model_input(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), image_size=8, mean=0.5, std=0.25, equalize="clahe")


def test_equalize_is_applied_alike_by_training_validation_and_predict():
    """The model's input with equalize="hist" is the same tensor whichever path makes it: by hand
    (PIL's equalize, then the usual resize and normalisation), to_model_input, training's
    train_input without augmentation, and predict.logits with a spec that says hist."""
    import numpy as np
    from PIL import Image, ImageOps

    from raycxr.labels import FINDINGS
    from raycxr.models import ModelSpec
    from raycxr.predict import logits

    films, size, mean, std = _films(64), 32, 0.45, 0.22
    by_hand = torch.from_numpy(np.stack([np.asarray(ImageOps.equalize(Image.fromarray(f[0].numpy())))
                                         for f in films]))[:, None]
    expect = to_model_input(by_hand, image_size=size, mean=mean, std=std)
    hist = to_model_input(films, image_size=size, mean=mean, std=std, equalize="hist")
    assert torch.allclose(hist, expect, atol=1e-6)
    assert not torch.allclose(hist, to_model_input(films, image_size=size, mean=mean, std=std), atol=1e-2)
    trained = train_input(films, image_size=size, mean=mean, std=std, strength="none", equalize="hist")
    assert torch.equal(trained, hist)

    class Spy(torch.nn.Module):  # records what the scoring path feeds the network
        def forward(self, x):
            self.seen = x
            return torch.zeros(len(x), len(FINDINGS))

    spy = Spy()
    spec = ModelSpec(architecture="test_resnet", findings=FINDINGS, target="pneumonia", image_size=size,
                     stored_size=64, resize="pad", mean=mean, std=std, equalize="hist")
    logits(spy, spec, films.numpy(), batch_size=len(films))
    assert torch.equal(spy.seen, hist)


def test_an_ensemble_member_trained_on_equalised_films_sees_them_equalised():
    from raycxr.transforms import Ensemble

    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)) for _ in "ab")
    films = _films(64, n=4)
    with torch.no_grad():
        xa = to_model_input(films, image_size=32, mean=0.5, std=0.25, equalize="hist")
        xb = to_model_input(films, image_size=48, mean=0.4, std=0.3)
        expect = (a(xa) + b(xb)) / 2
        ens = Ensemble([a, b], image_sizes=[32, 48], means=[0.5, 0.4], stds=[0.25, 0.3], equalizes=["hist", "none"])
        got = ens(to_model_input(films, image_size=64, mean=0.0, std=1.0))
    assert torch.allclose(got, expect, atol=1e-5)
