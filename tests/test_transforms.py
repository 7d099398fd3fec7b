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
