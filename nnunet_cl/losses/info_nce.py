"""Reference global InfoNCE (SimCLR NT-Xent) on two views, as an instance of ``masked_supcon``."""
from __future__ import annotations

import torch

from nnunet_cl.distributed import gather_with_grad, rank, world_size
from nnunet_cl.losses.masked_supcon import labels_to_pos_mask, masked_supcon

__all__ = ["info_nce_two_views"]


def info_nce_two_views(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = False
) -> torch.Tensor:
    r"""SimCLR NT-Xent over the 2B views of a batch.

    With u = [z1; z2] (2B, D), L2-normalised, s_ab = <u_a, u_b> / tau and pos(a) the other view of a's sample:

        L = (1 / 2B) sum_a -log( exp(s_{a,pos(a)}) / sum_{b != a} exp(s_ab) )

    i.e. each view has one positive and the 2B - 2 other views as negatives; this is ``masked_supcon`` with
    positives = same sample index.

    gather=True with an initialised process group of W > 1 ranks, each holding B samples: keys are the 2WB
    views gathered with gradient (``gather_with_grad``), anchors are this rank's own 2B views, and the
    return value is L_r = mean over this rank's anchors. Then, exactly:
      * mean_r L_r equals L computed in one process on the concatenated W*B batch;
      * after every rank calls L_r.backward(), z1.grad / z2.grad on rank r equal d(sum_s L_s)/dz_r
        = W * dL/dz_r, so DDP's division of summed parameter gradients by W gives dL/dtheta.
    All ranks must use the same B. Without a process group (or W == 1) gather is a no-op.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    anchors = torch.cat([z1, z2], dim=0)
    w = world_size() if gather else 1
    if w == 1:
        sample = torch.arange(b, device=z1.device).repeat(2)
        return masked_supcon(anchors, labels_to_pos_mask(sample), temperature=temperature)

    # Keys: [view1 of all ranks; view2 of all ranks]; key index of sample j of rank r is r*B + j (+ W*B).
    keys = torch.cat([gather_with_grad(z1), gather_with_grad(z2)], dim=0)  # (2WB, D)
    own_sample = rank() * b + torch.arange(b, device=z1.device)  # global sample index of local rows
    anchor_sample = own_sample.repeat(2)
    key_sample = torch.arange(w * b, device=z1.device).repeat(2)
    own_key = torch.cat([own_sample, own_sample + w * b])  # key index of each anchor's own copy
    self_mask = torch.zeros(2 * b, 2 * w * b, dtype=torch.bool, device=z1.device)
    self_mask[torch.arange(2 * b, device=z1.device), own_key] = True
    # keys mode does no self-exclusion, so remove the anchor's own copy from both sets here
    pos = labels_to_pos_mask(anchor_sample, key_sample) & ~self_mask
    neg = ~pos & ~self_mask
    return masked_supcon(anchors, pos, temperature=temperature, neg_mask=neg, keys=keys)
