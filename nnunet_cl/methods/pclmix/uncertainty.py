"""PCLMix's uncertainty: the entropy of the two decoders' averaged prediction, a ramped threshold, and the
certainty pseudo-label the pixel contrast samples its anchors from.

Plain torch on (B, C, *spatial) probabilities and (B, *spatial) label maps.
"""
from __future__ import annotations

import math

import torch

__all__ = ["UNCERTAIN", "sigmoid_rampup", "entropy", "uncertainty_threshold", "certainty_labels"]

UNCERTAIN = -1  # the certainty label of a voxel too uncertain to be an anchor


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = clip(current / length, 0, 1) (Laine & Aila's ramp; 1 when length <= 0)."""
    if length <= 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """H = -sum_c p_c log p_c over dim 1: (B, C, *spatial) -> (B, *spatial), in nats."""
    return -(probs * torch.log(probs + eps)).sum(1)


def uncertainty_threshold(iteration: int, max_iterations: int, num_classes: int, paper_ln2: bool = False) -> float:
    """(0.75 + 0.25 * sigmoid_rampup(iteration, max_iterations)) * ln K: from 0.75 ln K to ln K over training.

    The paper uses K = 2 (written for its binary-entropy case, also on 4-class ACDC); ln K is the entropy of a
    uniform prediction over K classes, so K = ``num_classes`` keeps the threshold's meaning for C > 2 classes (our
    default). ``paper_ln2`` gives the paper's ln 2.
    """
    k = 2 if paper_ln2 else num_classes
    return (0.75 + 0.25 * sigmoid_rampup(iteration, max_iterations)) * math.log(k)


def certainty_labels(mean_probs: torch.Tensor, scribbles: torch.Tensor, threshold: float,
                     ignore_label: int | None = None) -> torch.Tensor:
    """argmax of ``mean_probs`` where its entropy is at most ``threshold``, ``UNCERTAIN`` (-1) where above, and the
    scribble's class wherever a scribble exists (every voxel of ``scribbles`` that is not ``ignore_label``).

    Args:
        mean_probs: (B, C, *spatial) average of the decoders' softmax (detached by the caller).
        scribbles: (B, *spatial) or (B, 1, *spatial) integer labels, ``ignore_label`` where unannotated.
    """
    if scribbles.dim() == mean_probs.dim():
        scribbles = scribbles[:, 0]
    labels = mean_probs.argmax(1)
    labels = torch.where(entropy(mean_probs) > threshold, torch.full_like(labels, UNCERTAIN), labels)
    scribbled = torch.ones_like(labels, dtype=torch.bool) if ignore_label is None else scribbles != ignore_label
    return torch.where(scribbled, scribbles.long(), labels)
