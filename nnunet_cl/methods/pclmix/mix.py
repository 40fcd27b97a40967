"""PCLMix's dynamic mix in 2-D and 3-D: a random box taken from one image, the rest from another (CutMix).

Plain torch; all randomness goes through an optional ``torch.Generator`` per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["box_mask", "box_masks", "mix", "mix_partners", "resize_mask"]


def box_mask(shape, fraction: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """A {0, 1} float mask of ``shape`` (spatial dims only) that is 1 inside one axis-aligned box covering about
    ``fraction`` of the volume, with a random aspect ratio and position.

    The side proportions are p_d = fraction ** w_d with w drawn uniformly on the simplex (sum w_d = 1), so that
    prod p_d = fraction: in 2-D this is the authors' CutMix box (p_y = fraction ** u, p_x = fraction / p_y); in 3-D
    the same log-split over three axes. Sides are rounded to whole voxels (at least 1), so the realised fraction is
    near ``fraction``, not exact.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    shape = tuple(int(s) for s in shape)
    w = -torch.log(torch.rand(len(shape), generator=generator).clamp_min(1e-12))  # Exp(1) -> uniform on the simplex
    w = w / w.sum()
    mask = torch.zeros(shape)
    box = []
    for s, wd in zip(shape, w.tolist()):
        side = min(s, max(1, round(s * fraction ** wd)))
        start = int(torch.randint(0, s - side + 1, (), generator=generator))
        box.append(slice(start, start + side))
    mask[tuple(box)] = 1.0
    return mask


def box_masks(shape, fraction: float = 0.2, generators=None) -> torch.Tensor:
    """(B, 1, *spatial) masks, one ``box_mask`` per sample; ``generators``: a list of B ``torch.Generator`` (draws
    that do not depend on which other samples share the batch) or None. ``shape`` = (B, *spatial)."""
    b, spatial = int(shape[0]), shape[1:]
    gens = generators if generators is not None else [None] * b
    if len(gens) != b:
        raise ValueError(f"{len(gens)} generators for {b} samples")
    return torch.stack([box_mask(spatial, fraction, g) for g in gens]).unsqueeze(1)


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * a + (1 - mask) * b, with ``mask`` broadcast over channels (images, probabilities, label maps: with a
    {0, 1} mask an integer label map stays exact)."""
    mask = mask.to(device=a.device, dtype=a.dtype) if a.is_floating_point() else mask.to(a.device)
    if a.is_floating_point():
        return mask * a + (1 - mask) * b
    return torch.where(mask.bool(), a, b)


def resize_mask(mask: torch.Tensor, spatial) -> torch.Tensor:
    """A (B, 1, *spatial) {0, 1} mask at another resolution ('nearest-exact', as nnU-Net's augmentation downsamples
    label maps for deep supervision), so that a mixed target at every scale is a mix of that scale's targets."""
    if tuple(mask.shape[2:]) == tuple(spatial):
        return mask
    return F.interpolate(mask.float(), size=tuple(spatial), mode="nearest-exact")


def mix_partners(n: int, group: int = 2) -> torch.Tensor:
    """The image each sample is mixed with: within consecutive groups of ``group`` samples, the next one
    (cyclically), so no image is mixed with itself. nnU-Net draws a batch's cases at random, so fixed partners in a
    random batch are random pairs; fixed groups keep the pairs the same however ranks split the batch.
    A batch that ``group`` does not divide puts the leftover samples into the last group."""
    if n < 2:
        raise ValueError(f"mixing needs at least 2 samples per batch, got {n}")
    if group < 2:
        raise ValueError(f"group must be >= 2, got {group}")
    partners = torch.arange(n)
    full = n // group
    bounds = [(g * group, (g + 1) * group) for g in range(full)] or [(0, n)]
    bounds[-1] = (bounds[-1][0], n)  # leftover samples join the last group
    for lo, hi in bounds:
        partners[lo:hi] = torch.roll(torch.arange(lo, hi), -1)
    return partners
