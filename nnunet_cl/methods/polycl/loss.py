"""PolyCL losses: the paper's single-negative form and the many-negatives generalisation (METHODS_SPEC §4).

Temperature. The paper and its code give no value (the configs leave it out). We default to
``DEFAULT_TEMPERATURE = 0.1``: it is the default of the package's shared ``masked_supcon`` core and of
SupCon / pytorch-metric-learning, so the triplet and InfoNCE forms of PolyCL and the other methods in this
package are compared at one temperature unless a user sweeps it (the spec suggests 0.1-0.5). At 0.1 the
single-negative loss keeps a useful gradient until cos(a,p) - cos(a,n) is about 0.3-0.5, i.e. it asks for
a clear but not extreme separation of cosine similarities that live in [-1, 1].

Two variants of the authors' repository are deliberately *not* ported:

* ``ContrastiveLossEuclidean`` minimises (1 - sigmoid(d_pos)) + sigmoid(d_neg): it rewards a *larger*
  anchor-positive distance and a smaller anchor-negative distance, i.e. the sign is inverted
  (tests/test_polycl_loss.py keeps a regression test documenting this).
* ``ContrastiveLossSimCLR`` wraps its result in ``torch.Tensor(...)``, which detaches it from the graph.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_cl.losses.masked_supcon import masked_supcon
from nnunet_cl.methods.polycl.pairs import strategy_masks, valid_anchor_mask

__all__ = ["DEFAULT_TEMPERATURE", "polycl_triplet_loss", "polycl_infonce_loss", "polycl_masks"]

DEFAULT_TEMPERATURE = 0.1


def polycl_triplet_loss(z_a: torch.Tensor, z_p: torch.Tensor, z_n: torch.Tensor,
                        temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    r"""The paper's loss with one positive and one negative per anchor (``ContrastiveLossCosine``):

        L = mean_i -log( e^{cos(a_i,p_i)/tau} / (e^{cos(a_i,p_i)/tau} + e^{cos(a_i,n_i)/tau}) )
          = mean_i softplus( (cos(a_i,n_i) - cos(a_i,p_i)) / tau )

    The softplus form is the same number, written so that it cannot overflow for small tau.

    Args:
        z_a, z_p, z_n: (B, D) anchor, positive and negative embeddings (row i belongs together), e.g.
            ``z[anchor_idx], z[pos_idx], z[neg_idx]`` from ``pairs.sample_triplets``.
        temperature: tau (see the module docstring for the default).

    Returns:
        Scalar mean over the B anchors (the repository returns per-anchor values; the mean is what its
        training loop optimises). With B = 0 (no valid anchor) a zero still attached to the graph.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (z_a.shape == z_p.shape == z_n.shape) or z_a.dim() != 2:
        raise ValueError(f"z_a, z_p, z_n must all be (B, D); got {tuple(z_a.shape)}, {tuple(z_p.shape)}, "
                         f"{tuple(z_n.shape)}")
    # Same precision policy as masked_supcon: fp16 loses the small cosine differences that matter here.
    dtype = torch.float64 if z_a.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a, p, n = (F.normalize(t.to(dtype), dim=1) for t in (z_a, z_p, z_n))
        if a.shape[0] == 0:
            return (a.sum() + p.sum() + n.sum()) * 0.0
        cos_ap = (a * p).sum(dim=1)
        cos_an = (a * n).sum(dim=1)
        return F.softplus((cos_an - cos_ap) / temperature).mean()


def polycl_masks(case_ids, organ_present, strategy: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Strategy masks as torch bool tensors, with anchors lacking a positive or a negative cleared.

    The paper skips an anchor that has no valid pair; ``masked_supcon`` already skips rows with no
    positive, so clearing the positives of rows without a negative gives the same skip (otherwise such
    a row would contribute a zero loss and dilute the mean).
    """
    pos, neg = strategy_masks(case_ids, organ_present, strategy)
    valid = valid_anchor_mask(pos, neg)
    pos = pos & valid[:, None]
    return (torch.as_tensor(np.ascontiguousarray(pos), device=device),
            torch.as_tensor(np.ascontiguousarray(neg), device=device))


def polycl_infonce_loss(z: torch.Tensor, case_ids, organ_present=None, strategy: str = "S",
                        temperature: float = DEFAULT_TEMPERATURE, mode: str = "pos_vs_negs") -> torch.Tensor:
    r"""PolyCL with every valid in-batch negative (the 3-D adaptation of METHODS_SPEC §4).

    Equals ``masked_supcon(z, pos, temperature, neg_mask=neg, mode=mode)`` with the masks of
    ``polycl_masks`` (S/O/M, unknown-presence fallback documented in ``pairs``).

    Default mode ``"pos_vs_negs"``: each positive p is scored against the anchor's negatives only,

        l_i = -(1/|P_i|) sum_p log( e^{s_ip} / (e^{s_ip} + sum_{n in N_i} e^{s_in}) ).

    Why this mode: with exactly one positive and one negative it *is* the paper's triplet loss, and patches
    that are neither positive nor negative (under M: another scan's organ patches; same-scan patches of
    the other presence) never enter a denominator. In "supcon" mode the other positives of the anchor
    also sit in the denominator, which is a different objective than the paper's.

    Args:
        z: (N, D) patch embeddings (normalised inside).
        case_ids: (N,) ints; organ_present: (N,) presence flags or None (all unknown -> S behaviour).
        strategy: "S", "O" or "M".
        temperature: tau (module docstring).
        mode: "pos_vs_negs" (default) or "supcon".

    Returns:
        Scalar loss; a graph-attached zero when no anchor has both a positive and a negative.
    """
    pos, neg = polycl_masks(case_ids, organ_present, strategy, device=z.device)
    return masked_supcon(z, pos, temperature=temperature, neg_mask=neg, mode=mode)
