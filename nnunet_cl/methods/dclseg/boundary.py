"""Voxels near a label change, and the anchor sampling of DCL-Seg's voxel contrast that oversamples them.

Plain torch on label maps (B, *spatial); all randomness goes through an optional ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["boundary_mask", "sample_anchors"]


def boundary_mask(labels: torch.Tensor, distance: int = 2, ignore_label: int | None = None) -> torch.Tensor:
    """True where a voxel of another label lies within ``distance`` voxels (Chebyshev distance: the
    (2d+1)^n cube around the voxel). ``labels``: (B, *spatial) integers. Voxels with ``ignore_label`` are never
    boundary voxels and never make their neighbours ones (they are no class)."""
    if distance < 1:
        raise ValueError(f"distance must be >= 1 voxel, got {distance}")
    pool = {2: F.max_pool1d, 3: F.max_pool2d, 4: F.max_pool3d}[labels.dim()]
    lab = labels.unsqueeze(1).float()
    ignored = torch.zeros_like(lab, dtype=torch.bool) if ignore_label is None else lab == ignore_label
    inf = torch.tensor(float("inf"), device=lab.device)
    k = 2 * distance + 1
    hi = pool(torch.where(ignored, -inf, lab), k, stride=1, padding=distance)
    lo = -pool(torch.where(ignored, -inf, -lab), k, stride=1, padding=distance)
    return ((hi > lo) & ~ignored)[:, 0]


def _draw(candidates: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    order = torch.randperm(candidates.numel(), generator=generator,
                           device=generator.device if generator is not None else "cpu").to(candidates.device)
    return candidates[order[:k]]


def sample_anchors(labels: torch.Tensor, n: int, boundary_fraction: float = 0.5, distance: int = 2,
                   ignore_label: int | None = None, generator=None):
    """Up to ``n`` distinct voxels per sample, ``round(boundary_fraction * n)`` of them from the boundary voxels
    (``boundary_mask``) and the rest from the other labelled voxels; a sample short of either kind takes more of
    the other. Ignored voxels are never drawn. ``generator``: one ``torch.Generator`` for all samples, a list of
    one per sample (draws that do not depend on which other samples share the batch), or None.

    Returns (batch_idx (K,), voxel_idx (K,) into the flattened spatial dims, is_boundary (K,) bool).
    """
    if n < 0 or not 0 <= boundary_fraction <= 1:
        raise ValueError(f"n must be >= 0 and boundary_fraction in [0, 1], got {n} and {boundary_fraction}")
    flat = labels.reshape(labels.shape[0], -1)
    boundary = boundary_mask(labels, distance, ignore_label).reshape(flat.shape)
    valid = torch.ones_like(boundary) if ignore_label is None else flat != ignore_label
    batch_parts, voxel_parts, edge_parts = [], [], []
    for b in range(flat.shape[0]):
        edge = torch.nonzero(boundary[b]).flatten()
        inner = torch.nonzero(valid[b] & ~boundary[b]).flatten()
        k_edge = min(round(boundary_fraction * n), edge.numel())
        k_inner = min(n - k_edge, inner.numel())
        k_edge = min(n - k_inner, edge.numel())  # top up from the boundary when the inside is short
        g = generator[b] if isinstance(generator, (list, tuple)) else generator
        chosen = torch.cat([_draw(edge, k_edge, g), _draw(inner, k_inner, g)])
        voxel_parts.append(chosen)
        batch_parts.append(torch.full((chosen.numel(),), b, dtype=torch.long, device=labels.device))
        edge_parts.append(torch.arange(chosen.numel(), device=labels.device) < k_edge)
    return torch.cat(batch_parts), torch.cat(voxel_parts), torch.cat(edge_parts)
