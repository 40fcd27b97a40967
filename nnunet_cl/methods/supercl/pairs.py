"""SuperCL's pair generation (METHODS_SPEC §2), plain torch / scipy: which samples and voxels are positives.

* :func:`grid_labels` -- a voxel-level supervoxel map read at the centres of a feature map's voxels, per view;
* :func:`average_supervoxel_map` -- ASP: every voxel of a (channel-mean) feature map replaced by its supervoxel's
  average;
* :func:`component_mask` -- CCL: connected components of the top-1 cosine-similarity graph of the ASP vectors,
  both views of an image joined; the positive mask of the inter-image term;
* :func:`position_mask` -- the positional instance term's positives (|position_i - position_j| < threshold).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["grid_labels", "average_supervoxel_map", "component_mask", "position_mask"]

ASP_MODES = ("mean", "area")


def grid_labels(labels: torch.Tensor, shape: Sequence[int], flips: torch.Tensor | None = None) -> torch.Tensor:
    """(B, *S) integer labels at full resolution -> (B, *shape): the label at the centre of each feature voxel.

    The feature map's stride along axis a is ``s = S_a / shape_a`` (an integer for nnU-Net's U-Net, whose patch is
    divisible by every stage's stride). nnU-Net downsamples with stride-s convolutions padded to the kernel's
    half width, so feature voxel j of an input is centred on input voxel ``s * j``; that label is read.

    flips: (B, ndim) bool, for a view that was mirrored (``nnunet_cl.views.flip_view``) before the network and
    whose feature map was mirrored back (``unflip``): its feature voxel j is centred on voxel ``s * j + s - 1``
    along a mirrored axis. The labels are mirrored, read and mirrored back the same way, so each view gets the
    labels its own features see.
    """
    if labels.dim() != len(shape) + 1:
        raise ValueError(f"labels must be (B, *spatial) with {len(shape)} spatial axes; got {tuple(labels.shape)}")
    index = []
    for full, small in zip(labels.shape[1:], shape):
        if full % small:
            raise ValueError(f"feature grid {tuple(shape)} does not divide the label map {tuple(labels.shape[1:])}")
        index.append(slice(0, None, full // small))
    if flips is None:
        return labels[(slice(None), *index)]
    from nnunet_cl.views import unflip  # mirroring is its own inverse
    return unflip(unflip(labels[:, None], flips)[(slice(None), slice(None), *index)], flips)[:, 0]


def average_supervoxel_map(features: torch.Tensor, labels: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    r"""ASP: the average supervoxel feature map.

    With m = the channel mean of ``features`` (or ``features`` itself when it has no channel axis) and S(v) the
    supervoxel of voxel v in the same image,

        mode "mean":  ASP(v) = (1 / |S(v)|) \sum_{u in S(v)} m(u)     (piecewise-constant input is returned as is)
        mode "area":  ASP(v) = (1 / V)      \sum_{u in S(v)} m(u)     (V = voxels of the map; the authors' code)

    The authors divide by the whole map's pixel count instead of the superpixel's; "area" keeps that for
    comparison, "mean" (the default) is the average the paper describes. Label 0 (outside the body) is one
    region like any other.

    Args:
        features: (B, C, *S) or (B, *S) float.
        labels: (B, *S) integer supervoxel ids (>= 0), e.g. :func:`grid_labels` of the cached map.
        mode: "mean" or "area".

    Returns:
        (B, *S) float tensor.
    """
    if mode not in ASP_MODES:
        raise ValueError(f"mode must be one of {ASP_MODES}; got {mode!r}")
    m = features.mean(1) if features.dim() == labels.dim() + 1 else features
    if m.shape != labels.shape:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
    b = m.shape[0]
    flat, lab = m.reshape(b, -1), labels.reshape(b, -1).long()
    if bool((lab < 0).any()):
        raise ValueError("labels must be >= 0")
    n_lab = int(lab.max()) + 1 if lab.numel() else 1
    ids = lab + n_lab * torch.arange(b, device=lab.device)[:, None]  # one id space per image
    sums = torch.zeros(b * n_lab, dtype=flat.dtype, device=flat.device).index_add_(0, ids.flatten(), flat.flatten())
    if mode == "mean":
        counts = torch.bincount(ids.flatten(), minlength=b * n_lab).to(flat.dtype)
        per_label = sums / counts.clamp_min(1)
    else:
        per_label = sums / flat.shape[1]
    return per_label[ids].reshape(m.shape)


def component_mask(vectors: torch.Tensor, sample: torch.Tensor | None = None,
                   other_samples_only: bool = False) -> torch.Tensor:
    """CCL: (N, N) bool positive mask from the connected components of the top-1 similarity graph.

    Each node (row of ``vectors``, e.g. a flattened ASP map) links to its most cosine-similar other node; the
    components of that graph (weakly connected, scipy) are the positive sets. Nodes of one ``sample`` (the two
    views of an image) are linked as well, so they are always positives and the mask stays an equivalence
    relation: symmetric, reflexive (the diagonal is True; ``masked_supcon`` drops it) and transitive.

    Args:
        vectors: (N, L) float; computed under no_grad by the caller (the mask is not differentiated).
        sample: optional (N,) sample index of each node.
        other_samples_only: pick each node's top-1 among other samples' nodes only (the authors' graph includes
            the node's own other view, which is usually its nearest neighbour).

    Returns:
        (N, N) bool tensor on ``vectors``' device.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = vectors.shape[0]
    if vectors.dim() != 2 or n == 0:
        raise ValueError(f"vectors must be (N, L) with N >= 1; got {tuple(vectors.shape)}")
    v = F.normalize(vectors.detach().float(), dim=1)
    sim = v @ v.T
    sim.fill_diagonal_(-float("inf"))
    if other_samples_only and sample is not None:
        sim = sim.masked_fill(sample[:, None] == sample[None, :], -float("inf"))
    rows = np.arange(n)
    cols = sim.argmax(1).cpu().numpy() if n > 1 else rows
    linked = np.isfinite(sim[rows, cols].cpu().numpy()) if n > 1 else np.zeros(1, bool)
    src, dst = [rows[linked]], [cols[linked]]
    if sample is not None:
        s = sample.cpu().numpy()
        first = {}
        for i, si in enumerate(s.tolist()):  # chain each sample's nodes to its first node
            j = first.setdefault(si, i)
            if j != i:
                src.append(np.array([i]))
                dst.append(np.array([j]))
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
    _, comp = connected_components(graph, directed=True, connection="weak")
    comp = torch.as_tensor(comp, device=vectors.device)
    return comp[:, None] == comp[None, :]


def position_mask(position: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(N, N) bool: ``|position_i - position_j| < threshold`` (positions normalised to [0, 1] along the body
    axis; the authors use the slice index / slice count with threshold 0.1)."""
    if position.dim() != 1:
        raise ValueError(f"position must be (N,); got {tuple(position.shape)}")
    return (position[:, None] - position[None, :]).abs() < threshold
