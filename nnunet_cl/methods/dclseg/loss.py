"""The supervised voxel contrast of DCL-Seg between an image and its learned positive."""
from __future__ import annotations

import torch

from nnunet_cl.distributed import gather_with_grad
from nnunet_cl.losses.masked_supcon import masked_supcon

__all__ = ["two_view_supcon"]


def two_view_supcon(e1: torch.Tensor, e2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                    base_temperature: float | None = None, gather: bool = False) -> torch.Tensor:
    r"""SupCon over the voxel embeddings of both views: anchors and keys are Z = [e1; e2] (2K, D), labels [y; y].

        l_i = -(1/|P_i|) sum_{p in P_i} [ s_ip - log sum_{a != i} exp(s_ia) ],  s = cos / tau,
        P_i = {p != i : y_p = y_i}   (the same voxel in the other view and every voxel of its class in both)

    Args:
        e1, e2: (K, D) embeddings of the same K voxels in x and in x+.
        labels: (K,) class of each voxel.
        gather: with torch.distributed, contrast against every rank's voxels (gradients flow back to each rank).
    """
    if e1.shape != e2.shape or labels.shape != e1.shape[:1]:
        raise ValueError(f"e1, e2 must be (K, D) alike and labels (K,), got {tuple(e1.shape)}, {tuple(e2.shape)}, "
                         f"{tuple(labels.shape)}")
    z, y = torch.cat([e1, e2]), torch.cat([labels, labels])
    if gather:
        z, y = gather_with_grad(z), gather_with_grad(y)
    return masked_supcon(z, labels=y, temperature=temperature, base_temperature=base_temperature)
