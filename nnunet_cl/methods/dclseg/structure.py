"""Structure of an image, to keep a positive's geometry: local normalised cross-correlation and edge maps.

Plain torch on (B, C, *spatial) tensors, 2-D or 3-D.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["local_ncc", "structure_penalty", "edge_map", "edge_correlation", "STRUCTURE_WEIGHT"]

# lambda of the generator's objective (contrast - lambda * penalty). Measured on a real MRI patch against a fixed
# network (the set-up of tests/test_dclseg.py run for 300 generator steps at lambda 1, 3, 10): the edge-map correlation
# of x and x+ fell to 0.43 at 1 and 0.87 at 3, and stayed at 0.93 at 10 while the contrast still rose
# (docs/methods/dclseg.md)
STRUCTURE_WEIGHT = 10.0


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
    return pool(x, window, stride=1, padding=window // 2, count_include_pad=False)


def local_ncc(x: torch.Tensor, y: torch.Tensor, window: int = 5, eps: float = 1e-4) -> torch.Tensor:
    r"""Mean over voxels of the windowed normalised cross-correlation, per sample: (B,).

        LNCC(v) = (cov_w(x, y) + eps) / sqrt((var_w(x) + eps) (var_w(y) + eps)),  over the window around v

    1 where y is an increasing affine function of x within every window, which an intensity curve or a smooth bias
    field nearly is, and in windows flat in both; moving an edge, inventing one (in a window flat in x) or flipping
    one lowers it. eps is small against the variance of z-scored images. Channels are averaged.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    mx, my = _box_mean(x, window), _box_mean(y, window)
    cov = _box_mean(x * y, window) - mx * my
    vx = (_box_mean(x * x, window) - mx * mx).clamp_min(0)
    vy = (_box_mean(y * y, window) - my * my).clamp_min(0)
    return ((cov + eps) / torch.sqrt((vx + eps) * (vy + eps))).flatten(1).mean(1)


def structure_penalty(x: torch.Tensor, y: torch.Tensor, window: int = 5) -> torch.Tensor:
    """1 - mean local NCC of x and y (scalar; 0 when y is x, or a locally increasing affine function of it)."""
    return 1 - local_ncc(x, y, window).mean()


def edge_map(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude (central differences, channels summed), each sample scaled to mean 1: (B, *spatial).
    The scaling makes edge maps of an image and of its brighter or darker copy comparable."""
    grads = torch.gradient(x, dim=tuple(range(2, x.dim())))
    magnitude = torch.sqrt(sum(g * g for g in grads).sum(1) + 1e-12)
    return magnitude / magnitude.flatten(1).mean(1).clamp_min(1e-12).view(-1, *([1] * (magnitude.dim() - 1)))


def edge_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the edge maps of x and y, per sample: (B,)."""
    ex, ey = edge_map(x).flatten(1), edge_map(y).flatten(1)
    ex, ey = ex - ex.mean(1, keepdim=True), ey - ey.mean(1, keepdim=True)
    return (ex * ey).sum(1) / (ex.norm(dim=1) * ey.norm(dim=1)).clamp_min(1e-12)
