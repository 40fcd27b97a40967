"""Two-view generation: alignment, determinism, flips and numerical safety."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_cl.views import flip_view, gaussian_blur, intensity_view, two_views, unflip

NO_NOISE = dict(noise_std=(0.0, 0.0))
NO_BLUR_NO_NOISE = dict(noise_std=(0.0, 0.0), p_blur=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blob_batch(spatial=(16, 20, 24), batch=3, channels=1):
    """Zero background with textured foreground blobs in [1, 2], a different blob per sample."""
    g = gen(123)
    x = torch.zeros(batch, channels, *spatial)
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij")
    for b in range(batch):
        centre = [n * (0.35 + 0.1 * b) for n in spatial]
        r2 = sum(((gr - c) / (n * 0.25)) ** 2 for gr, c, n in zip(grid, centre, spatial))
        fg = r2 <= 1
        x[b, :, fg] = 1 + torch.rand(channels, int(fg.sum()), generator=g)
    return x


@pytest.mark.parametrize("shape", [(2, 1, 12, 16, 20), (3, 2, 24, 28)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_kept_and_input_untouched(shape, dtype):
    x = torch.randn(shape, generator=gen(), dtype=dtype)
    before = x.clone()
    v = intensity_view(x, gen(1), p_blur=1.0)
    assert v.shape == x.shape and v.dtype == dtype and v.device == x.device
    assert torch.equal(x, before)
    v1, v2 = two_views(x, gen(2))
    assert v1.shape == v2.shape == x.shape


def test_views_differ_from_input_and_each_other():
    x = torch.randn(2, 1, 16, 16, 16, generator=gen())
    v1, v2 = two_views(x, gen(1))
    assert (v1 - x).abs().mean() > 0.01
    assert (v2 - x).abs().mean() > 0.01
    assert (v1 - v2).abs().mean() > 0.01
    # without noise and blur the steps left are still not the identity
    assert (intensity_view(x, gen(3), **NO_BLUR_NO_NOISE) - x).abs().mean() > 0.01


def test_deterministic_under_generator():
    x = torch.randn(2, 1, 12, 12, 12, generator=gen())
    a1, a2 = two_views(x, gen(7), p_blur=0.5)
    b1, b2 = two_views(x, gen(7), p_blur=0.5)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = two_views(x, gen(8))
    assert not torch.equal(a1, c1)
    # no hidden state: the global RNG does not leak into seeded calls
    torch.rand(10)
    assert torch.equal(intensity_view(x, gen(7)), a1)


def test_global_rng_when_no_generator():
    x = torch.randn(1, 1, 8, 8, generator=gen())
    torch.manual_seed(5)
    a = intensity_view(x)
    torch.manual_seed(5)
    assert torch.equal(intensity_view(x), a)


def test_aligned_without_noise_or_blur():
    """Brightness, contrast and gamma are monotonic per-voxel maps: the zero background stays exactly
    where it was (as each sample's constant minimum) and the voxel order is kept."""
    x = blob_batch()
    for seed in range(5):
        v = intensity_view(x, gen(seed), **NO_BLUR_NO_NOISE)
        for b in range(x.shape[0]):
            bg_in = x[b] == 0
            bg_out = v[b] == v[b].min()
            assert torch.equal(bg_in, bg_out)
            order = torch.argsort(x[b].flatten())
            assert torch.all(torch.diff(v[b].flatten()[order]) >= -1e-6)


def test_aligned_with_blur():
    """Blur softens edges but does not move them: the thresholded foreground keeps its place."""
    x = blob_batch()
    v = intensity_view(x, gen(1), p_blur=1.0, **NO_NOISE)
    for b in range(x.shape[0]):
        fg_in = (x[b, 0] > 0).numpy()
        vb = v[b, 0].numpy()
        level = 0.5 * (np.median(vb[~fg_in]) + np.median(vb[fg_in]))
        fg_out = vb > level
        iou = (fg_in & fg_out).sum() / (fg_in | fg_out).sum()
        assert iou > 0.85
        shift = np.subtract(ndimage.center_of_mass(fg_in), ndimage.center_of_mass(fg_out))
        assert np.abs(shift).max() < 0.1


def test_gamma_matches_nnunet():
    bgv2 = pytest.importorskip("batchgeneratorsv2.transforms.intensity.gamma")
    x = torch.randn(1, 2, 10, 12, 14, generator=gen(), dtype=torch.float64)
    ours = intensity_view(x, gen(), brightness=(1, 1), contrast=(1, 1), gamma=(1.3, 1.3),
                          **NO_BLUR_NO_NOISE)
    # nnU-Net's transform works on one (C, *spatial) sample; gamma fixed, per-channel stats kept
    theirs = bgv2.GammaTransform((1.3, 1.3), p_invert_image=0, synchronize_channels=True,
                                 p_per_channel=1, p_retain_stats=1)(image=x[0].clone())["image"]
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=1e-6)


def test_gamma_without_retain_stats_is_the_plain_formula():
    x = torch.rand(2, 1, 6, 7, 8, generator=gen()) * 4 - 1
    v = intensity_view(x, gen(), brightness=(1, 1), contrast=(1, 1), gamma=(0.7, 0.7),
                       retain_stats=False, **NO_BLUR_NO_NOISE)
    lo = x.amin(dim=(2, 3, 4), keepdim=True)
    hi = x.amax(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(v, ((x - lo) / (hi - lo)) ** 0.7 * (hi - lo) + lo)


def test_contrast_preserves_range():
    x = torch.randn(2, 1, 8, 8, 8, generator=gen())
    v = intensity_view(x, gen(), brightness=(1, 1), contrast=(1.25, 1.25), gamma=(1, 1),
                       retain_stats=False, **NO_BLUR_NO_NOISE)
    torch.testing.assert_close(v.amin(dim=(2, 3, 4)), x.amin(dim=(2, 3, 4)))
    torch.testing.assert_close(v.amax(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4)))
    assert v.std() > x.std()


def test_per_channel_parameters():
    x = torch.randn(1, 1, 8, 8, 8, generator=gen()).expand(1, 3, 8, 8, 8).contiguous()
    shared = intensity_view(x, gen(4), **NO_BLUR_NO_NOISE)
    assert torch.allclose(shared[:, 0], shared[:, 1]) and torch.allclose(shared[:, 1], shared[:, 2])
    separate = intensity_view(x, gen(4), per_channel=True, **NO_BLUR_NO_NOISE)
    assert not torch.allclose(separate[:, 0], separate[:, 1])


@pytest.mark.parametrize("x", [
    torch.zeros(2, 1, 6, 6, 6),                      # constant: zero span and zero std
    torch.full((1, 1, 1, 1, 1), 3.0),                # a single voxel
    torch.randn(2, 1, 8, 8, 8, generator=gen()) * 1e4,  # raw HU-like magnitudes
    torch.randn(2, 1, 8, 8, generator=gen()),
])
def test_no_nan(x):
    for kw in ({}, dict(p_blur=1.0), dict(gamma=(0.7, 0.7)), dict(gamma=(1.5, 1.5), per_channel=True)):
        assert torch.isfinite(intensity_view(x, gen(1), **kw)).all()


def test_half_precision():
    x = torch.randn(2, 1, 8, 8, 8, generator=gen()).half()
    v = intensity_view(x, gen(1), p_blur=1.0)
    assert v.dtype == torch.float16 and torch.isfinite(v).all()


def test_rejects_bad_input():
    with pytest.raises(TypeError):
        intensity_view(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        intensity_view(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="low <= high"):
        intensity_view(torch.zeros(1, 1, 4, 4), contrast=(1.2, 0.8))


def test_blur_matches_scipy_and_keeps_constants():
    x = torch.randn(2, 1, 12, 13, 14, generator=gen(), dtype=torch.float64)
    sigma = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    out = gaussian_blur(x, sigma)
    for b, s in enumerate((1.0, 0.5)):
        # same radius as ours (ceil(3 * 1.0) = 3) so the kernels are identical
        ref = ndimage.gaussian_filter(x[b, 0].numpy(), s, mode="nearest", truncate=3.0 / s)
        np.testing.assert_allclose(out[b, 0].numpy(), ref, atol=1e-10)
    c = torch.full((2, 1, 7, 7), 2.5)
    torch.testing.assert_close(gaussian_blur(c, torch.tensor([[1.0], [0.7]])), c)
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(2, 1)), x)


@pytest.mark.parametrize("shape,axes", [((4, 2, 6, 7, 8), None), ((4, 2, 6, 7, 8), (0, 2)),
                                        ((5, 1, 9, 10), (1,))])
def test_flip_unflip_roundtrip(shape, axes):
    x = torch.randn(shape, generator=gen())
    xf, flips = flip_view(x, axes, gen(3))
    n_axes = x.ndim - 2 if axes is None else len(axes)
    assert flips.shape == (shape[0], n_axes) and flips.dtype == torch.bool
    torch.testing.assert_close(unflip(xf, flips, axes), x, rtol=0, atol=0)
    spatial_axes = range(x.ndim - 2) if axes is None else axes
    for b in range(shape[0]):
        dims = [2 + a - 1 for a, f in zip(spatial_axes, flips[b]) if f]  # -1: x[b] drops the batch dim
        assert torch.equal(xf[b], x[b].flip(dims) if dims else x[b])


def test_unflip_maps_dense_features_back():
    """A voxel-wise 'network' with a different channel count: unflip(f(flip(x))) == f(x)."""
    x = torch.randn(6, 1, 8, 8, 8, generator=gen())

    def features(t):
        return torch.cat([t, t ** 2, torch.sin(t)], dim=1)

    xf, flips = flip_view(x, None, gen(0))
    assert flips.any() and not flips.all()
    torch.testing.assert_close(unflip(features(xf), flips), features(x))


def test_flip_probability_extremes_and_errors():
    x = torch.randn(3, 1, 4, 5, 6, generator=gen())
    xf, flips = flip_view(x, None, gen(), p=0.0)
    assert not flips.any() and torch.equal(xf, x)
    xf, flips = flip_view(x, (1,), gen(), p=1.0)
    assert flips.all() and torch.equal(xf, x.flip(3))
    with pytest.raises(ValueError, match="spatial axes"):
        flip_view(x, (3,), gen())
    with pytest.raises(ValueError, match="flips must have shape"):
        unflip(x, flips[:2], (1,))
