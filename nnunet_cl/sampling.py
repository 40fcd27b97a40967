"""Voxel samplers, so that voxel-level losses work on K sampled voxels and never on a V x V matrix.

All randomness goes through an optional ``torch.Generator``; the same seed gives the same indices.
Random draws are made on the generator's device (CPU by default) and the indices moved to the data's device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["VoxelSample", "sample_voxels", "gather_voxels", "stratified_sample"]


class VoxelSample(NamedTuple):
    """K sampled voxels: ``feats`` (K, C), ``batch_idx`` (K,), ``voxel_idx`` (K,) flat index into spatial."""

    feats: torch.Tensor
    batch_idx: torch.Tensor
    voxel_idx: torch.Tensor


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def gather_voxels(x: torch.Tensor, batch_idx: torch.Tensor, voxel_idx: torch.Tensor) -> torch.Tensor:
    """Pick voxels from (B, C, *spatial) -> (K, C), or from (B, *spatial) -> (K,) when ``x`` has no channel.

    Which layout is meant is decided by the caller: pass labels as (B, *spatial) and features as
    (B, C, *spatial). Use it to fetch labels/masks at the positions returned by ``sample_voxels``.
    """
    if x.dim() < 2:
        raise ValueError(f"expected (B, ...) input, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)[batch_idx, voxel_idx]


def sample_voxels(
    features: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> VoxelSample:
    """Draw up to ``n`` distinct voxels per sample, uniformly without replacement among allowed voxels.

    Args:
        features: (B, C, *spatial).
        n: maximum number of voxels per sample; a sample with fewer allowed voxels gives all of them.
        generator: optional torch.Generator for reproducibility.
        mask: optional bool (B, *spatial) or (B, 1, *spatial); only True voxels can be drawn.

    Returns:
        ``VoxelSample(feats (K, C), batch_idx (K,), voxel_idx (K,))`` with K = sum_b min(n, |allowed_b|),
        grouped by sample and in ascending voxel order within each sample. ``voxel_idx`` indexes the
        flattened spatial dims; ``gather_voxels(labels, batch_idx, voxel_idx)`` fetches matching labels.
    """
    if features.dim() < 3:
        raise ValueError(f"features must be (B, C, *spatial), got shape {tuple(features.shape)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    b, c = features.shape[:2]
    spatial = features.shape[2:]
    v = spatial.numel()
    device = features.device
    flat_mask = None
    if mask is not None:
        if mask.dim() == features.dim() and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape) != (b, *spatial):
            raise ValueError(f"mask must be {(b, *spatial)}, got {tuple(mask.shape)}")
        flat_mask = mask.reshape(b, v).to(device=device, dtype=torch.bool)

    batch_parts, voxel_parts = [], []
    for i in range(b):
        candidates = None if flat_mask is None else torch.nonzero(flat_mask[i], as_tuple=False).flatten()
        count = v if candidates is None else candidates.numel()
        k = min(n, count)
        # one draw of ``count`` per sample regardless of k, so results only depend on the seed and counts
        chosen = _randperm(count, generator, device)[:k]
        if candidates is not None:
            chosen = candidates[chosen]
        chosen = torch.sort(chosen).values  # ascending: cache-friendlier gathers, order carries no meaning
        voxel_parts.append(chosen)
        batch_parts.append(torch.full((k,), i, dtype=torch.long, device=device))
    if b == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return VoxelSample(features.new_zeros((0, c)), empty, empty)
    batch_idx = torch.cat(batch_parts)
    voxel_idx = torch.cat(voxel_parts)
    # advanced indices on dims 0 and 2 with a slice between them put K first: (K, C)
    feats = features.reshape(b, c, v)[batch_idx, :, voxel_idx]
    return VoxelSample(feats, batch_idx, voxel_idx)


def stratified_sample(
    labels: torch.Tensor,
    max_per_label: int,
    n_total: int | None = None,
    generator: torch.Generator | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Indices into ``labels`` (V,) with at most ``max_per_label`` per label and at most ``n_total`` in all.

    Each label's voxels are shuffled and given a within-label rank 0, 1, 2, ...; indices are taken level by
    level (every label's rank-0 voxel, then every rank-1 voxel, ..., random order within a level) until
    ``n_total`` is reached or ``max_per_label`` levels are used. So a budget too small for all labels is
    shared evenly ("water-filling") instead of going to the largest labels, which is what SuperCL's
    "at most k voxels per supervoxel" needs. Voxels with ``labels == ignore_index`` are never drawn.

    Returns:
        LongTensor of distinct indices, ascending, on ``labels.device``.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (V,), got shape {tuple(labels.shape)}")
    if max_per_label < 0 or (n_total is not None and n_total < 0):
        raise ValueError("max_per_label and n_total must be >= 0")
    device = labels.device
    perm = _randperm(labels.numel(), generator, device)
    if ignore_index is not None:
        perm = perm[labels[perm] != ignore_index]
    if perm.numel() == 0:
        return perm
    lab = labels[perm]
    # within-label rank in shuffled order: stable sort groups labels and keeps the shuffled order inside
    order = torch.sort(lab, stable=True).indices
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(lab.numel(), device=device) - torch.repeat_interleave(starts, counts)
    within = torch.empty_like(rank_sorted)
    within[order] = rank_sorted
    keep = within < max_per_label
    perm, within = perm[keep], within[keep]
    if n_total is not None and perm.numel() > n_total:
        # level-major order; position in the shuffle breaks ties within a level at random
        position = torch.arange(perm.numel(), device=device)
        level_major = torch.argsort(within * perm.numel() + position)
        perm = perm[level_major[:n_total]]
    return torch.sort(perm).values
