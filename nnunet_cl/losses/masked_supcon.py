"""The one masked contrastive loss every method reuses (METHODS_SPEC §1.1 and §7.1).

Every method in the package (SuperCL, PolyCL, PCLMix, DCL-Seg, SimCLR-style InfoNCE) is this loss with a
different boolean positive mask, optionally a negative mask and optionally a separate contrast set ("keys":
a memory queue or embeddings gathered from other ranks). Tensors in, scalar out, no hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["masked_supcon", "labels_to_pos_mask"]

_MODES = ("supcon", "pos_vs_negs")


def labels_to_pos_mask(labels_row: torch.Tensor, labels_col: torch.Tensor | None = None) -> torch.Tensor:
    """Same-label mask: ``mask[i, j] = labels_row[i] == labels_col[j]``, shape (N, M), dtype bool.

    ``labels_col`` defaults to ``labels_row`` (square mask). The diagonal is left True; ``masked_supcon``
    removes it itself when no separate keys are given.
    """
    if labels_col is None:
        labels_col = labels_row
    if labels_row.dim() != 1 or labels_col.dim() != 1:
        raise ValueError(f"labels must be 1-D, got {tuple(labels_row.shape)} and {tuple(labels_col.shape)}")
    return labels_row[:, None] == labels_col[None, :]


def masked_supcon(
    z: torch.Tensor,
    pos_mask: torch.Tensor | None = None,
    temperature: float = 0.1,
    base_temperature: float | None = None,
    neg_mask: torch.Tensor | None = None,
    mode: str = "supcon",
    keys: torch.Tensor | None = None,
    chunk_elements: int = 1 << 19,
    labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Masked supervised contrastive loss on L2-normalised embeddings.

    Anchors are the rows of ``z`` (N, D). Contrast set K = ``keys`` (M, D) if given, else ``z`` itself
    (M = N). Both are L2-normalised here and s_ia = <z_i, k_a> / tau.

    P_i = {a : pos_mask[i, a]},  N_i = {a : neg_mask[i, a]} (default: every a not in P_i),
    and when ``keys is None`` the anchor itself (a = i) is removed from both sets. With explicit keys no
    self-exclusion is done: pass masks that exclude the anchor's own key where it is in the set. A pair
    marked in both masks counts as positive only.

    mode "supcon" (Khosla et al. 2020; the denominator runs over A_i = P_i ∪ N_i, i.e. all a != i by default):

        l_i = -(1/|P_i|) sum_{p in P_i} [ s_ip - log sum_{a in A_i} exp(s_ia) ]

    mode "pos_vs_negs" (PCLMix: each positive against the negatives only):

        l_i = -(1/|P_i|) sum_{p in P_i} log( exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in)) )

    loss = (tau / base_tau) * mean_{i : |P_i| > 0} l_i   (factor 1 when ``base_temperature`` is None).

    Rows with no positive are left out of the mean; if no row has one the result is a zero that is still
    attached to the graph (gradient zero, never NaN). Everything is computed in float32 (float64 stays
    float64), with autocast disabled, so fp16/bf16 inputs give a finite result.

    Positives come either from ``pos_mask`` or, for dense methods with thousands of sampled voxels, from
    ``labels``: P_i = {a : labels[i] == key_labels[a]}, built one block of rows at a time, so no (N, M) mask
    is ever held in memory (8192 anchors: a 64 MiB bool mask, 420 MiB at 20480).

    Args:
        z: (N, D) anchor embeddings (need not be normalised).
        pos_mask: (N, M) bool positive mask; with ``keys is None`` M = N and the diagonal is ignored.
            Give this or ``labels``.
        temperature: tau.
        base_temperature: tau_b; the loss is scaled by tau / tau_b (SupContrast convention).
        neg_mask: optional (N, M) bool negative mask; pairs in neither mask are ignored entirely.
        mode: "supcon" or "pos_vs_negs".
        keys: optional (M, D) contrast set (queue, gathered embeddings).
        chunk_elements: anchors are processed in blocks of about this many (anchor, key) pairs, each
            recomputed in the backward pass; the result does not depend on it. The default (2 MiB of float32
            logits per block) keeps the peak memory of a 4096-voxels-per-patch loss within 1.2x of a plain
            nnU-Net step (benchmarks/step_cost.py) and is no slower than larger blocks on CPU.
        labels: (N,) integer labels instead of ``pos_mask`` (same label = positive).
        key_labels: (M,) labels of ``keys``; default ``labels`` (only without keys).

    Returns:
        Scalar loss tensor (float32, or float64 for float64 inputs).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z.dim() != 2:
        raise ValueError(f"z must be (N, D), got shape {tuple(z.shape)}")
    if keys is not None and (keys.dim() != 2 or keys.shape[1] != z.shape[1]):
        raise ValueError(f"keys must be (M, {z.shape[1]}), got shape {tuple(keys.shape)}")
    n = z.shape[0]
    m = n if keys is None else keys.shape[0]
    if (pos_mask is None) == (labels is None):
        raise ValueError("give exactly one of pos_mask and labels")
    if labels is not None:
        if key_labels is None and keys is not None:
            raise ValueError("with keys, labels need key_labels (the labels of the keys)")
        key_labels = labels if key_labels is None else key_labels
        if tuple(labels.shape) != (n,) or tuple(key_labels.shape) != (m,):
            raise ValueError(f"labels must be ({n},) and key_labels ({m},), got {tuple(labels.shape)} and "
                             f"{tuple(key_labels.shape)}")
    elif tuple(pos_mask.shape) != (n, m):
        raise ValueError(f"pos_mask must be ({n}, {m}), got {tuple(pos_mask.shape)}")
    if neg_mask is not None and tuple(neg_mask.shape) != (n, m):
        raise ValueError(f"neg_mask must be ({n}, {m}), got {tuple(neg_mask.shape)}")

    # Half precision overflows in exp(s/tau) for small tau and loses the small differences that matter
    # in log-softmax, so upcast; autocast would silently downcast the matmul again, hence disable it.
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        anchors = F.normalize(z.to(dtype), dim=1)
        contrast = anchors if keys is None else F.normalize(keys.to(device=z.device, dtype=dtype), dim=1)
        if pos_mask is not None:
            pos_mask = pos_mask.to(device=z.device, dtype=torch.bool)
        else:
            labels, key_labels = labels.to(z.device), key_labels.to(z.device)
        neg_mask = None if neg_mask is None else neg_mask.to(device=z.device, dtype=torch.bool)
        # Rows are processed in chunks, each recomputed in the backward pass (checkpointing), so autograd keeps
        # no (N, M) intermediates between forward and backward (8192 sampled voxels: 256 MiB each in float32).
        rows_per_chunk = max(1, chunk_elements // max(m, 1))
        checkpointing = torch.is_grad_enabled() and n > rows_per_chunk and (
            anchors.requires_grad or contrast.requires_grad)
        total, count = anchors.sum() * 0, anchors.new_zeros(())  # connected even with no anchors
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            pos_rows = pos_mask[rows] if pos_mask is not None else (labels[rows], key_labels)
            args = (anchors[rows], contrast, pos_rows, None if neg_mask is None else neg_mask[rows],
                    start if keys is None else None, temperature, mode)
            part, rows_with_pos = checkpoint(_chunk_loss, *args, use_reentrant=False) if checkpointing \
                else _chunk_loss(*args)
            total, count = total + part, count + rows_with_pos
        # Mean over rows with positives without a data-dependent branch (no host sync on GPU); with no such
        # row this is 0 * (graph), i.e. a connected zero.
        loss = total / count.clamp_min(1)
    if base_temperature is not None:
        loss = loss * (temperature / base_temperature)
    return loss


def _chunk_loss(anchors, contrast, pos_mask, neg_mask, self_offset, temperature, mode):
    """Summed row losses of one block of anchors and the number of those rows that have a positive.

    ``self_offset`` is the index of the block's first anchor in the contrast set when anchors are their own
    keys (the anchor itself is then excluded), None with separate keys. ``pos_mask`` is the block's rows of
    the mask, or (row labels, key labels).
    """
    logits = anchors @ contrast.T / temperature  # (rows, M)
    pos = pos_mask[0][:, None] == pos_mask[1][None, :] if isinstance(pos_mask, tuple) else pos_mask
    if self_offset is not None:
        rows = torch.arange(self_offset, self_offset + anchors.shape[0], device=anchors.device)
        not_self = rows[:, None] != torch.arange(contrast.shape[0], device=anchors.device)[None, :]
        pos = pos & not_self
    neg = ~pos if neg_mask is None else neg_mask & ~pos
    if self_offset is not None:
        neg = neg & not_self

    if mode == "supcon":
        pair_loss = _masked_logsumexp(logits, pos | neg)[:, None] - logits
    else:
        # -log(e^s_ip / (e^s_ip + S_neg)) = softplus(log S_neg - s_ip); log S_neg = -inf without negatives
        pair_loss = F.softplus(_masked_logsumexp(logits, neg)[:, None] - logits)

    n_pos = pos.sum(dim=1)
    # masked_fill (not multiply) so that no 0 * inf can reach the sum
    row_loss = pair_loss.masked_fill(~pos, 0.0).sum(dim=1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    return row_loss.masked_fill(~has_pos, 0.0).sum(), has_pos.sum().to(row_loss.dtype)


def _masked_logsumexp(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{a: keep[i, a]} exp(logits[i, a]); -inf for rows with nothing kept.

    torch.logsumexp subtracts the row max internally. Empty rows are evaluated on a finite dummy and then
    replaced by -inf through ``where``, because logsumexp over all -inf has a NaN gradient.
    """
    has_any = keep.any(dim=1)
    masked = logits.masked_fill(~keep, float("-inf"))
    masked = masked.masked_fill(~has_any[:, None], 0.0)
    lse = torch.logsumexp(masked, dim=1)
    return torch.where(has_any, lse, torch.full_like(lse, float("-inf")))
