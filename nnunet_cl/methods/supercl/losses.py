"""SuperCL's losses (METHODS_SPEC §2), each an instance of the package's one contrastive core ``masked_supcon``.

* :func:`ilcp_loss` -- intra-image local pairs: voxels of one supervoxel (in either view) are positives;
* :func:`masked_rows_loss` -- anchors against a contrast set with a given positive mask: the inter-image term
  (IGCP, positives from CCL) and the positional instance term, also with keys gathered from other ranks or a
  queue.

Tensors in, scalar out, no hidden state.
"""
from __future__ import annotations

import torch

from nnunet_cl.losses import masked_supcon
from nnunet_cl.sampling import stratified_sample

__all__ = ["ilcp_loss", "masked_rows_loss"]


def _sample_image(labels: torch.Tensor, n_labels: int, per_label: int, generator: torch.Generator | None):
    """Flat voxel indices of one image: ``n_labels`` supervoxels drawn uniformly (not by size), up to
    ``per_label`` voxels each; label 0 (outside the body) never."""
    present = torch.unique(labels)
    present = present[present != 0]
    if present.numel() == 0:
        return labels.new_zeros(0)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    chosen = present[torch.randperm(present.numel(), generator=generator, device=gen_device)[:n_labels]
                     .to(present.device)]
    keep = torch.isin(labels, chosen)
    masked = torch.where(keep, labels, torch.zeros_like(labels))
    return stratified_sample(masked, per_label, generator=generator, ignore_index=0)


def ilcp_loss(f1: torch.Tensor, f2: torch.Tensor, labels: torch.Tensor, n_labels: int = 64, per_label: int = 8,
              temperature: float = 0.1, base_temperature: float | None = 0.07,
              generator: torch.Generator | None = None, labels2: torch.Tensor | None = None) -> torch.Tensor:
    r"""ILCP, the intra-image local term.

    For each image b, K voxels v_1..v_K are drawn (``n_labels`` supervoxels chosen uniformly, at most
    ``per_label`` voxels each, so large supervoxels do not dominate); the 2K anchors are the projected features
    of both views at those voxels, z = [f1_b(v_k); f2_b(v_k)], with label y = the supervoxel id each view's
    feature voxel is centred on (``labels`` for view 1, ``labels2`` for view 2; voxels where view 2 sees the
    outside are dropped), and

        L_b = masked_supcon(z, positives = {same supervoxel id}, tau, tau_b),    L = mean_b L_b

    over the images that have a positive (the authors: every 16th pixel in raster order, per image, then the
    batch mean).

    Args:
        f1, f2: (B, C, *S) projected feature maps of two voxel-aligned views.
        labels: (B, *S) supervoxel ids at the feature grid (:func:`~.pairs.grid_labels`), 0 = outside the body.
        labels2: the same for view 2 when it differs (a view mirrored and mirrored back); default ``labels``.
        n_labels, per_label: the sampling budget per image (at most n_labels * per_label voxels per view).
        temperature, base_temperature: tau and tau_b (the loss is scaled by tau / tau_b; None: 1).
        generator: optional torch.Generator for the voxel draw.

    Returns:
        scalar; a zero attached to the graph when no image has a positive.
    """
    labels2 = labels if labels2 is None else labels2
    if f1.shape != f2.shape or f1.shape[0] != labels.shape[0] or f1.shape[2:] != labels.shape[1:] \
            or labels2.shape != labels.shape:
        raise ValueError(f"f1 {tuple(f1.shape)}, f2 {tuple(f2.shape)} and labels {tuple(labels.shape)} / "
                         f"{tuple(labels2.shape)} do not match")
    losses = []
    for b in range(f1.shape[0]):
        lab, lab2 = labels[b].reshape(-1), labels2[b].reshape(-1)
        idx = _sample_image(lab, n_labels, per_label, generator)
        idx = idx[lab2[idx] != 0]
        if idx.numel() < 2:
            continue
        z = torch.cat([f1[b].reshape(f1.shape[1], -1)[:, idx].T, f2[b].reshape(f2.shape[1], -1)[:, idx].T])
        y = torch.cat([lab[idx], lab2[idx]])
        losses.append(masked_supcon(z, labels=y, temperature=temperature, base_temperature=base_temperature))
    if not losses:
        return (f1.sum() + f2.sum()) * 0.0
    return torch.stack(losses).mean()


def masked_rows_loss(anchors: torch.Tensor, keys: torch.Tensor, pos_mask: torch.Tensor, anchor_key: torch.Tensor,
                     temperature: float = 0.1, base_temperature: float | None = 0.07) -> torch.Tensor:
    r"""SupCon of ``anchors`` (N, D) against ``keys`` (M, D) with positives ``pos_mask`` (N, M), where anchor i is
    key ``anchor_key[i]`` itself (removed from both sets). Every other key is a negative:

        l_i = -(1/|P_i|) \sum_{p in P_i} [ s_ip - log \sum_{a != anchor_key[i]} exp(s_ia) ],  L = mean_i l_i

    This is IGCP with the CCL mask (keys: this step's nodes of every rank, then a queue) and the positional
    instance term. With keys gathered from W ranks and equal shares, the mean over ranks of L equals L on the
    whole batch in one process.
    """
    n, m = pos_mask.shape
    if anchors.shape[0] != n or keys.shape[0] != m or anchor_key.shape != (n,):
        raise ValueError(f"anchors {tuple(anchors.shape)}, keys {tuple(keys.shape)}, pos_mask {(n, m)} and "
                         f"anchor_key {tuple(anchor_key.shape)} do not match")
    own = torch.zeros(n, m, dtype=torch.bool, device=pos_mask.device)
    own[torch.arange(n, device=pos_mask.device), anchor_key] = True
    pos = pos_mask & ~own
    return masked_supcon(anchors, pos, temperature=temperature, base_temperature=base_temperature,
                         neg_mask=~pos & ~own, keys=keys)
