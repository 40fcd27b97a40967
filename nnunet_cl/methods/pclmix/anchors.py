"""PCLMix's anchor sampling: per image and class, hard anchors (the pseudo-label says c, the prediction does not)
and easy ones (both say c), capped per class and per batch.

Plain torch; randomness through one ``torch.Generator`` per sample.
"""
from __future__ import annotations

import torch

__all__ = ["count_class_pairs", "anchors_per_class", "sample_class_anchors"]


def count_class_pairs(labels: torch.Tensor, min_voxels: int = 1) -> int:
    """(image, class) pairs with at least ``min_voxels`` voxels of the class; ``labels``: (B, N), negative = none."""
    return sum(int(((labels[b] == c).sum() >= min_voxels).item())
               for b in range(labels.shape[0]) for c in labels[b].unique().tolist() if c >= 0)


def anchors_per_class(total_pairs: int, max_anchors: int, max_per_class: int) -> int:
    """The authors' n_view: min(max_anchors // total_pairs, max_per_class) (0 when there is no pair)."""
    return 0 if total_pairs <= 0 else min(max_anchors // total_pairs, max_per_class)


def _draw(candidates: torch.Tensor, k: int, generator) -> torch.Tensor:
    order = torch.randperm(candidates.numel(), generator=generator)
    return candidates[order[:k].to(candidates.device)]


def sample_class_anchors(labels: torch.Tensor, predictions: torch.Tensor, n_view: int, min_voxels: int = 1,
                         generators=None):
    """Anchors of every (image, class) pair with at least ``min_voxels`` labelled voxels: ``n_view`` of them, half
    hard (label c, prediction not c) and half easy (both c); a pair short of one kind takes more of the other, and a
    pair with fewer than ``n_view`` voxels gives all it has. Negative labels (uncertain, unannotated) are never drawn.

    Args:
        labels, predictions: (B, N) integer maps (flattened voxels).
        n_view: anchors per (image, class) pair (``anchors_per_class``).
        generators: list of B ``torch.Generator`` or None.
    Returns:
        (b_idx, v_idx, classes, hard): (K,) sample index, voxel index, class and hard flag of each anchor.
    """
    if labels.shape != predictions.shape or labels.dim() != 2:
        raise ValueError(f"labels and predictions must be (B, N) alike, got {tuple(labels.shape)}, "
                         f"{tuple(predictions.shape)}")
    gens = generators if generators is not None else [None] * labels.shape[0]
    out = [[], [], [], []]
    for b in range(labels.shape[0]):
        for c in labels[b].unique().tolist():
            mine = labels[b] == c
            if c < 0 or int(mine.sum()) < min_voxels or n_view <= 0:
                continue
            hard = torch.nonzero(mine & (predictions[b] != c)).flatten()
            easy = torch.nonzero(mine & (predictions[b] == c)).flatten()
            n_hard = min(hard.numel(), n_view // 2)
            n_easy = min(easy.numel(), n_view - n_hard)
            n_hard = min(hard.numel(), n_view - n_easy)  # an easy pool short of its half leaves room for hard ones
            picked = torch.cat([_draw(hard, n_hard, gens[b]), _draw(easy, n_easy, gens[b])])
            out[0].append(torch.full_like(picked, b))
            out[1].append(picked)
            out[2].append(torch.full_like(picked, c))
            out[3].append(torch.arange(picked.numel(), device=picked.device) < n_hard)
    if not out[0]:
        empty = torch.zeros(0, dtype=torch.long, device=labels.device)
        return empty, empty, empty, empty.bool()
    return tuple(torch.cat(x) for x in out)
