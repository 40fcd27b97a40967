"""SuperCL's pair generation (METHODS_SPEC §2), plain torch / scipy: which samples and voxels are positives.

* :func:`grid_labels` -- a voxel-level supervoxel map read at the centres of a feature map's voxels, per view;
* :func:`average_supervoxel_map` -- ASP: every voxel of a (channel-mean) feature map replaced by its supervoxel's
  average;
* :func:`component_mask` -- CCL: connected components of a top-1 cosine-similarity graph of the ASP vectors
  (over nodes, as the authors, or over samples), both views of an image joined; the inter-image positives;
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
                   other_samples_only: bool = False, center: bool = False) -> torch.Tensor:
    """CCL: (N, N) bool positive mask from the connected components of a top-1 similarity graph.

    The authors' graph (``other_samples_only=False``): each node (row of ``vectors``, e.g. a flattened ASP map)
    links to its most cosine-similar other node. Nodes of one ``sample`` (the two views of an image) are linked
    as well, so they are always positives.

    ``other_samples_only=True`` (needs ``sample``): the graph is over samples. Each sample is the mean of its
    nodes' normalised vectors and links to its most similar *other* sample; a node's component is its sample's.
    Each component then holds at least two samples (benchmarks/supercl_ccl_components.py measures the sizes on
    real patches).

    The components (weakly connected, scipy) are the positive sets; the mask is an equivalence relation:
    symmetric, reflexive (the diagonal is True; ``masked_supcon`` drops it) and transitive.

    Args:
        vectors: (N, L) float; computed under no_grad by the caller (the mask is not differentiated).
        sample: optional (N,) sample index of each node.
        other_samples_only: the graph over samples, each linked to its most similar other sample.
        center: subtract the nodes' mean vector before the cosine. ASP maps of different patches share a large
            common part (the layout every patch has); raw cosines then make a few nodes everybody's top-1 (hubs)
            and join most nodes in one component.

    Returns:
        (N, N) bool tensor on ``vectors``' device.
    """
    n = vectors.shape[0]
    if vectors.dim() != 2 or n == 0:
        raise ValueError(f"vectors must be (N, L) with N >= 1; got {tuple(vectors.shape)}")
    if other_samples_only and sample is None:
        raise ValueError("other_samples_only needs the sample index of each node")
    v = vectors.detach().float()
    if center:  # the cosine of the deviations from the nodes' mean: a component every vector shares is ignored
        v = v - v.mean(0, keepdim=True)
    v = F.normalize(v, dim=1)
    if other_samples_only:
        _, node_of = torch.unique(sample, return_inverse=True)  # node -> its sample, 0..M-1
        m = int(node_of.max()) + 1
        per_sample = F.normalize(v.new_zeros(m, v.shape[1]).index_add_(0, node_of, v), dim=1)
        comp = _components(m, np.arange(m), _top1(per_sample))[node_of.cpu().numpy()]
    else:
        src, dst = [np.arange(n)], [_top1(v)]
        if sample is not None:  # chain each sample's nodes to its first node
            first = {}
            for i, si in enumerate(sample.cpu().tolist()):
                src.append(np.array([i]))
                dst.append(np.array([first.setdefault(si, i)]))
        comp = _components(n, np.concatenate(src), np.concatenate(dst))
    comp = torch.as_tensor(comp, device=vectors.device)
    return comp[:, None] == comp[None, :]


def _top1(v: torch.Tensor) -> np.ndarray:
    """Index of each normalised row's most similar other row (itself when it is alone)."""
    if v.shape[0] == 1:
        return np.zeros(1, dtype=np.int64)
    sim = v @ v.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1).cpu().numpy()


def _components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Weakly connected component label of each of n nodes of the graph with edges src -> dst (scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    graph = coo_matrix((np.ones(src.size), (src, dst)), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def position_mask(position: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(N, N) bool: ``|position_i - position_j| < threshold`` (positions normalised to [0, 1] along the body
    axis; the authors use the slice index / slice count with threshold 0.1)."""
    if position.dim() != 1:
        raise ValueError(f"position must be (N,); got {tuple(position.shape)}")
    return (position[:, None] - position[None, :]).abs() < threshold
