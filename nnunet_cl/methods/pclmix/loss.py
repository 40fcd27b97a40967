"""PCLMix's pixel contrast: voxel anchors against a class-wise memory of class-mean embeddings."""
from __future__ import annotations

import torch

__all__ = ["queue_pixel_contrast"]


def queue_pixel_contrast(anchors: torch.Tensor, anchor_labels: torch.Tensor, keys: torch.Tensor,
                         key_labels: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07,
                         background_label: int | None = 0, reduction: str = "mean") -> torch.Tensor:
    r"""For each anchor i of class c, its positives P_i are the keys of class c and its negatives N_i the rest:

        l_i = -(tau / tau_b) (1/|P_i|) sum_{p in P_i} log[ e^{s_ip} / (e^{s_ip} + sum_{n in N_i} e^{s_in}) ],
        s = <anchor, key> / tau   (anchors and keys L2-normalised)

    The memory holds foreground classes only. An anchor of ``background_label`` has one positive of similarity 0
    (the authors' zero rows for class 0), so its term is log(1 + sum_n e^{s_in}): it is pushed away from every
    foreground class. Other anchors whose class has no key yet are left out.

    Args:
        anchors: (K, D) anchor embeddings.  anchor_labels: (K,).
        keys: (M, D) memory embeddings (no gradient).  key_labels: (M,).
        reduction: 'mean' over the anchors that count, 'sum', or 'none' ((K,), 0 for anchors left out).
    """
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors (K, D) and keys (M, D) with the same D, got {tuple(anchors.shape)}, "
                         f"{tuple(keys.shape)}")
    if anchors.dtype in (torch.float16, torch.bfloat16):  # (under autocast) the similarities in float32
        anchors = anchors.float()
    sim = anchors @ keys.to(anchors.dtype).t() / temperature  # (K, M)
    positive = anchor_labels[:, None] == key_labels[None, :]
    neg_inf = torch.tensor(float("-inf"), device=sim.device)
    neg_lse = torch.logsumexp(torch.where(positive, neg_inf, sim), dim=1, keepdim=True)  # (K, 1); -inf: no negative
    per_pair = sim - torch.logaddexp(sim, neg_lse)  # log of each positive's share
    n_pos = positive.sum(1)
    loss = -(per_pair * positive).sum(1) / n_pos.clamp_min(1)
    counts = n_pos > 0
    if background_label is not None:
        is_bg = anchor_labels == background_label
        bg = torch.nn.functional.softplus(neg_lse[:, 0])  # log(1 + sum_n e^{s_in})
        loss = torch.where(is_bg, bg, loss)
        counts = counts | is_bg
    loss = (temperature / base_temperature) * torch.where(counts, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / counts.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
