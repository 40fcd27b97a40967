"""Two-view generation for contrastive learning on batched torch tensors.

Plain functions on ``(B, C, *spatial)`` float tensors (2-D or 3-D); nothing here knows about nnU-Net.

* :func:`intensity_view` changes intensities only, so a view stays voxel-aligned with its input:
  voxel ``i`` of the view shows the same anatomy as voxel ``i`` of the input. Dense (voxel- or
  region-level) losses can therefore pair voxels by index and share one supervoxel map (METHODS_SPEC
  §2, "Views").
* :func:`two_views` makes two independent intensity views of the same batch.
* :func:`flip_view` / :func:`unflip` add a cheap spatial jitter and map dense features back to the
  input's voxel grid.

Randomness: every random draw goes through the optional ``generator`` (a ``torch.Generator``); with
the same generator state the outputs are identical. Without one, torch's global RNG is used. No
function keeps state between calls. Parameters are drawn per sample (one value per batch element,
shared by its channels unless ``per_channel=True``); ranges ``(low, high)`` are sampled uniformly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["intensity_view", "two_views", "flip_view", "unflip", "gaussian_blur"]


def _check(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"expected a floating-point torch tensor, got {type(x).__name__}"
                        f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a (B, C, *spatial) tensor with 2 or 3 spatial axes, got shape {tuple(x.shape)}")


def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """U(0, 1) samples drawn on the generator's device (torch requires it), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _uniform(value_range, shape, generator, device, dtype) -> torch.Tensor:
    low, high = (float(v) for v in value_range)
    if low > high:
        raise ValueError(f"range must be (low, high) with low <= high, got {value_range}")
    return (low + (high - low) * _rand(shape, generator, device)).to(dtype)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, truncate: float = 3.0) -> torch.Tensor:
    """Blur each sample and channel with its own isotropic Gaussian (in voxels), separably per axis.

    Parameters
    ----------
    x : tensor (B, C, *spatial)
    sigma : tensor broadcastable to (B, C)
        Standard deviation in voxels; 0 leaves that sample unchanged.
    truncate : float
        Kernel half-width in units of the largest sigma.

    Borders are padded by replication, so a constant image stays constant (zero padding would darken
    the edges and break the intensity-only promise near the border).
    """
    _check(x)
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    # kernel weights in float64 (tiny), cast to x's dtype at the end
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).expand(b, c).reshape(-1)
    radius = int(math.ceil(truncate * float(sigma.max()))) if sigma.numel() else 0
    if radius == 0:
        return x.clone()
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    # sigma == 0 would give a delta anyway after the clamp; normalising keeps the mean intensity
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)  # (B*C, K)

    # one group per (sample, channel) so every sample can have its own sigma in a single conv call
    y = x.reshape(1, b * c, *spatial)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    for axis in range(len(spatial)):
        shape = [b * c, 1] + [1] * len(spatial)
        shape[2 + axis] = 2 * radius + 1
        pad = [0, 0] * len(spatial)
        # F.pad lists padding from the last axis backwards
        pad[2 * (len(spatial) - 1 - axis)] = radius
        pad[2 * (len(spatial) - 1 - axis) + 1] = radius
        y = conv(F.pad(y, pad, mode="replicate"), kernel.reshape(shape), groups=b * c)
    return y.reshape(x.shape)


def intensity_view(x: torch.Tensor, generator: Optional[torch.Generator] = None, *,
                   brightness: Sequence[float] = (0.9, 1.1),
                   contrast: Sequence[float] = (0.75, 1.25),
                   gamma: Sequence[float] = (0.7, 1.5),
                   noise_std: Sequence[float] = (0.0, 0.1),
                   blur_sigma: Sequence[float] = (0.5, 1.0),
                   p_blur: float = 0.5,
                   retain_stats: bool = True,
                   per_channel: bool = False) -> torch.Tensor:
    """A random intensity-only view of a batch; the spatial layout is untouched.

    Meant for z-scored images (nnU-Net's normalised data), where the default ranges are small
    perturbations. Applied in nnU-Net's order: noise, blur, brightness, contrast, gamma. Pass a
    degenerate range such as ``(1, 1)`` or ``(0, 0)`` (or ``p_blur=0``) to switch a step off.

    Parameters
    ----------
    x : tensor (B, C, *spatial), floating point, 2 or 3 spatial axes
        Not modified.
    generator : torch.Generator or None
        Source of all randomness; ``None`` uses torch's global RNG.
    brightness : (low, high)
        Multiplicative factor: ``x * m``.
    contrast : (low, high)
        Factor ``c`` for ``(x - mean) * c + mean`` (mean over the spatial axes), after which values are
        clipped to the previous range, as nnU-Net's ``ContrastTransform(preserve_range=True)``. Mean,
        min and max here and in ``gamma`` are taken per sample and channel.
    gamma : (low, high)
        Exponent ``g``: each image is rescaled to [0, 1] with its min and max, raised to ``g`` and
        rescaled back (nnU-Net's ``GammaTransform``). Values < 1 brighten mid-tones, > 1 darken them.
    noise_std : (low, high)
        Standard deviation of additive Gaussian noise, in the units of ``x`` (z-scores for normalised
        data). Brightness, contrast and gamma are monotonic maps of each voxel's own value; noise and
        blur are the only steps that mix in anything else.
    blur_sigma : (low, high)
        Gaussian blur sigma in voxels (the same on every axis), applied with probability ``p_blur``.
    p_blur : float
        Probability that a sample is blurred.
    retain_stats : bool
        After gamma, restore each image's mean and standard deviation from before gamma (nnU-Net
        does this, so gamma reshapes the histogram without shifting it).
    per_channel : bool
        Draw separate parameters for every channel instead of one set per sample.

    Returns
    -------
    tensor
        Same shape, dtype and device as ``x``.
    """
    _check(x)
    b, c = x.shape[:2]
    n_spatial = x.ndim - 2
    dims = tuple(range(2, x.ndim))
    pshape = (b, c if per_channel else 1)
    kw = dict(generator=generator, device=x.device, dtype=x.dtype)

    def param(value_range):
        return _uniform(value_range, pshape, **kw).reshape(*pshape, *([1] * n_spatial))

    # draw every parameter up front, in a fixed order, so the result depends only on the generator
    # state and not on which steps happen to be no-ops
    noise_sd = param(noise_std)
    sigma = param(blur_sigma)
    blur_on = (_rand(pshape, generator, x.device) < p_blur).reshape(sigma.shape)
    mult = param(brightness)
    contrast_f = param(contrast)
    gamma_g = param(gamma)
    noise_gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=noise_gen_device, dtype=x.dtype).to(x.device)

    y = x + noise * noise_sd
    sigma = torch.where(blur_on, sigma, torch.zeros_like(sigma)).reshape(pshape)
    if bool((sigma > 0).any()):
        y = gaussian_blur(y, sigma)
    y = y * mult

    # statistics are per (sample, channel) as in nnU-Net, whose channels may be different modalities;
    # only the random factors are shared across channels unless per_channel=True
    mean = y.mean(dim=dims, keepdim=True)
    lo, hi = y.amin(dim=dims, keepdim=True), y.amax(dim=dims, keepdim=True)
    y = torch.minimum(torch.maximum((y - mean) * contrast_f + mean, lo), hi)

    eps = 1e-7
    if retain_stats:
        # correction=0 keeps a single-voxel input finite (the unbiased std would be NaN)
        mean_before, std_before = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True, correction=0)
    lo, hi = y.amin(dim=dims, keepdim=True), y.amax(dim=dims, keepdim=True)
    span = hi - lo
    # clamp guards against rounding just below 0 before the fractional power (NaN otherwise)
    y = ((y - lo) / span.clamp_min(eps)).clamp(0, 1) ** gamma_g * span + lo
    if retain_stats:
        mean_after, std_after = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True, correction=0)
        y = (y - mean_after) * (std_before / std_after.clamp_min(eps)) + mean_before
    return y


def two_views(x: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs):
    """Two independent intensity views ``(v1, v2)`` of the same batch, both voxel-aligned with ``x``.

    ``kwargs`` go to :func:`intensity_view`. ``v1`` is drawn first, then ``v2``, from the same
    generator, so a seeded generator reproduces the pair.
    """
    return intensity_view(x, generator, **kwargs), intensity_view(x, generator, **kwargs)


def _flip_axes(x: torch.Tensor, axes) -> tuple:
    n_spatial = x.ndim - 2
    axes = tuple(range(n_spatial)) if axes is None else tuple(int(a) for a in axes)
    for a in axes:
        if not 0 <= a < n_spatial:
            raise ValueError(f"flip axes count spatial axes from 0 (like nnU-Net's mirror_axes); "
                             f"{a} is out of range for {n_spatial} spatial axes")
    return axes


def _apply_flips(x: torch.Tensor, flips: torch.Tensor, axes) -> torch.Tensor:
    if flips.shape != (x.shape[0], len(axes)):
        raise ValueError(f"flips must have shape (B, n_axes) = {(x.shape[0], len(axes))}, got {tuple(flips.shape)}")
    view_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    for i, a in enumerate(axes):
        # torch.where keeps the batch vectorised and differentiable; cost is one flipped copy per axis
        x = torch.where(flips[:, i].to(x.device).reshape(view_shape), x.flip(2 + a), x)
    return x


def flip_view(x: torch.Tensor, axes: Optional[Sequence[int]] = None,
              generator: Optional[torch.Generator] = None, p: float = 0.5):
    """Randomly mirror each sample along some spatial axes.

    Parameters
    ----------
    x : tensor (B, C, *spatial)
    axes : sequence of int or None
        Spatial axes that may be flipped, counted from 0 over the spatial dimensions (0 is tensor
        dim 2), as in nnU-Net's ``mirror_axes``. ``None`` means all spatial axes.
    generator : torch.Generator or None
        Source of randomness; ``None`` uses torch's global RNG.
    p : float
        Probability of flipping each (sample, axis) independently.

    Returns
    -------
    x_flipped : tensor, same shape as ``x``
    flips : bool tensor (B, len(axes)) on ``x.device``
        ``flips[b, i]`` is True where sample ``b`` was mirrored along ``axes[i]``; pass it to
        :func:`unflip` with the same ``axes``.
    """
    if x.ndim < 3:
        raise ValueError(f"expected a (B, C, *spatial) tensor, got shape {tuple(x.shape)}")
    axes = _flip_axes(x, axes)
    flips = _rand((x.shape[0], len(axes)), generator, x.device) < p
    return _apply_flips(x, flips, axes), flips


def unflip(features: torch.Tensor, flips: torch.Tensor, axes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Undo :func:`flip_view` on a dense map computed from the flipped input.

    ``features`` is (B, C', *spatial') with any channel count and spatial size (e.g. a decoder or
    encoder feature map); flips commute and are their own inverse, so the same flips are applied
    again. On a downsampled map this is exact only when the network's down-sampling is mirror
    symmetric (e.g. even sizes with stride-2 pooling); otherwise correspondence is off by less than
    one feature voxel.
    """
    axes = _flip_axes(features, axes)
    return _apply_flips(features, flips, axes)
