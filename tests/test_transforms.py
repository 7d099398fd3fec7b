import pytest
import torch

from raycxr.transforms import augment, to_model_input, train_input


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
